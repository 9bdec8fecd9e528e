"""`dvc repro` runs the same assets as Dagster: it agrees with what `lmforge run` built, and sees the same changes."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Project, copy_project

BIN = REPO / ".venv" / "bin"


needs_dvc = pytest.mark.skipif(not (BIN / "dvc").exists(), reason="DVC is installed by `make install`")


def dvc_stages(project: Project) -> list[str]:
    """The stage names `dvc repro` prints: one per candidate for the foreach stages (pretrain@0, ...)."""
    stages = yaml.safe_load((project.path / "dvc.yaml").read_text())["stages"]
    candidates = project.params()["pretrain"]["candidates"]
    return [f"{name}@{i}" for name, spec in stages.items() for i in (range(len(candidates)) if "foreach" in spec else [None])
            if i is not None] + [name for name, spec in stages.items() if "foreach" not in spec]


@pytest.mark.slow
@needs_dvc
def test_dvc_repro_agrees_that_the_pipeline_dagster_built_is_up_to_date(tiny_project: Project):
    """The session's pipeline was built by `lmforge run`, which recorded it in dvc.lock: `dvc repro` runs
    nothing, so both front doors name the same code, parameters, inputs and outputs for every stage."""
    lock = (tiny_project.path / "dvc.lock").read_text()
    proc = tiny_project.run("dvc", "repro")
    out = proc.stdout + proc.stderr
    assert "Running stage" not in out
    for stage in dvc_stages(tiny_project):
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert (tiny_project.path / "dvc.lock").read_text() == lock
    assert tiny_project.summary("split")["documents_in"] == 20 and tiny_project.summary("pretrain/a")["steps"] == 60


@pytest.mark.slow
@needs_dvc
def test_lmforge_run_records_its_stages_and_nothing_dvc_hashes_names_the_checkout_or_a_timing(tiny_project: Project):
    """No `dvc commit` by hand: `lmforge run` recorded every DVC stage it ran, so `dvc status` is clean.
    What DVC hashes is the same in a checkout at another path and on a slower machine: no file of a
    stage's outputs holds the checkout's absolute path, and no summary a timing (those are in the
    timings.json beside it, which .dvcignore hides)."""
    from lmforge.artifacts import MEASURED

    recorded = next(line for line in tiny_project.first_run.splitlines() if line.startswith("recorded in dvc.lock: "))
    assert {"ingest", "pretrain@0", "pretrain@1", "select", "quantize"} <= set(recorded.split(": ", 1)[1].split(", "))
    assert json.loads(tiny_project.run("dvc", "status", "--json").stdout) == {}
    lock = yaml.safe_load((tiny_project.path / "dvc.lock").read_text())["stages"]
    assert {name.split("@")[0] for name in lock} == set(yaml.safe_load((tiny_project.path / "dvc.yaml").read_text())["stages"])
    hashed = {tiny_project.path / out["path"] for stage in lock.values() for out in stage.get("outs", [])}
    files = {f for path in hashed for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file() and f.name != "timings.json"}
    text = [f for f in files if f.suffix in (".json", ".yaml", ".md", ".jsonl", ".txt")]
    assert len(text) > 50 and [f for f in text if str(tiny_project.path) in f.read_text(errors="replace")] == []

    def keys(value, prefix=""):
        if isinstance(value, dict):
            for k, v in value.items():
                yield f"{prefix}{k}"
                yield from keys(v, f"{prefix}{k}.")

    summaries = [f for f in files if f.name == "summary.json"]
    assert [(f, k) for f in summaries for k in keys(json.loads(f.read_text())) if MEASURED.search(k.rsplit(".", 1)[-1])] == []
    assert tiny_project.summary("quantize")["variants"]["bf16"]["tokens_per_second_b1"] > 0  # read back from timings.json


@pytest.mark.slow
@needs_dvc
def test_recording_all_stages_in_one_reading_writes_what_dvc_commit_writes(tiny_snapshot: Project, tmp_path: Path):
    """`lmforge run` records its stages through dagster_project/cli/dvc_commit.py (one reading of dvc.yaml,
    not one per stage): from no dvc.lock and a changed raw file, it writes what `dvc commit --force`
    writes, byte for byte, a data file's `.dvc` (as ingest's `data.dvc`) included."""
    stages = ["ingest", "data/raw.dvc", "pretrain@0", "evaluate@1", "select", "quantize"]
    ours, theirs = copy_project(tiny_snapshot, tmp_path / "ours"), copy_project(tiny_snapshot, tmp_path / "theirs")
    for project in (ours, theirs):
        project.run("dvc", "add", "--quiet", "data/raw")
        (project.path / "dvc.lock").unlink()
        (project.path / "data/raw/doc0.txt").write_text("Edited after the run.\n")
    theirs.run("dvc", "commit", "--force", "--quiet", *stages)
    from dagster_project.cli.run import _dvc_commit_command

    record = _dvc_commit_command([], ours.path)
    assert record[1:3] == ["-P", str(REPO / "dagster_project/cli/dvc_commit.py")]  # DVC's Python, not `dvc commit`
    ours.run(*record, *stages)
    for name in ("dvc.lock", "data/raw.dvc"):
        assert (ours.path / name).read_text() == (theirs.path / name).read_text(), name
    assert set(yaml.safe_load((ours.path / "dvc.lock").read_text())["stages"]) == {"ingest", "pretrain@0", "evaluate@1", "select", "quantize"}
    unknown = ours.run(*record, "nope", check=False)
    assert unknown.returncode != 0 and "not stages of" in unknown.stderr and "nope" in unknown.stderr


@pytest.mark.slow
@needs_dvc
def test_an_edited_module_puts_exactly_the_stages_that_import_it_in_dvc_status(tiny_project: Project):
    from lmforge import codegraph, stages

    NOT_IN_DVC = set(stages.off_the_pipeline())  # the loops and the search: off the pipeline `lmforge run` computes

    for module in ("lmforge/registry.py", "models/metrics.py", "lmforge/demo_corpus.py"):
        path = tiny_project.path / module
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        try:
            changed = json.loads(tiny_project.run("dvc", "status", "--json").stdout)
        finally:
            path.write_text(original)
        importers = {s for s in codegraph.definitions() if module in codegraph.relative(codegraph.stage_files(s)) and s not in NOT_IN_DVC}
        assert {name.split("@")[0] for name in changed} == importers, module
        assert bool(importers) == (module != "lmforge/demo_corpus.py")
    assert json.loads(tiny_project.run("dvc", "status", "--json").stdout) == {}


@pytest.mark.slow
@needs_dvc
def test_a_changed_parameter_reruns_only_the_stages_that_declare_it(tiny_snapshot: Project, tmp_path: Path):
    """A tokenizer parameter re-runs the vocabulary stages (on a copy of the project), not the data stages."""
    project = copy_project(tiny_snapshot, tmp_path)
    params = project.params()
    params["tokenizer"]["vocab_size"] = 300
    (project.path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = project.run("dvc", "repro", "packed")
    out = proc.stdout + proc.stderr
    assert "Running stage 'tokenizer'" in out and "Running stage 'packed'" in out
    for stage in ("ingest", "clean", "split", "base_models"):
        assert f"Running stage '{stage}'" not in out
    assert json.loads((project.artifacts / "tokenizer" / "params.json").read_text())["vocab_size"] == 300
    assert json.loads((tiny_snapshot.artifacts / "tokenizer" / "params.json").read_text())["vocab_size"] == 400  # the copy ran, not the original


@pytest.mark.slow
@needs_dvc
def test_a_corpus_that_differs_from_data_dvc_is_explained_not_an_error(tmp_path: Path):
    from lmforge.demo_corpus import compare_with_data_dvc

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "doc.txt").write_text("recorded")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "data.dvc").write_text((tmp_path / "data.dvc").read_text() + "meta:\n  python: 3.10.0\n")
    shutil.rmtree(tmp_path / ".dvc" / "cache")  # as on a fresh clone: the data is not in the cache
    matches, message = compare_with_data_dvc(tmp_path)
    assert matches and "matches data.dvc" in message
    (tmp_path / "data" / "doc.txt").write_text("built elsewhere")
    matches, message = compare_with_data_dvc(tmp_path)
    assert not matches
    assert "differs from the one recorded in data.dvc (data.dvc was recorded with Python 3.10.0" in message
    assert "Nothing is broken" in message and "dvc add data" in message
