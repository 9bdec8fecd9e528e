"""``lmforge run`` end to end on a tiny corpus, and its errors: one clear line, no traceback."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_PROMPTS, Project, make_project, prose, write_params
from typer.testing import CliRunner

from dagster_project.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "demo-corpus", "summary", "generate"):
        assert command in result.output
    assert "--select" in invoke("run", "--help").output


def test_run_materializes_the_data_stages_with_checks(params_file: Path, tmp_path: Path):
    result = invoke("run", "--select", "group:data")
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output and "files=15" in result.output
    art = tmp_path / "artifacts"
    ingest = json.loads((art / "ingest/summary.json").read_text())
    clean = json.loads((art / "clean/summary.json").read_text())
    split = json.loads((art / "split/summary.json").read_text())
    assert {"files", "documents", "quarantined", "bytes"} <= set(ingest)
    assert {"documents_in", "kept", "quarantined", "by_reason"} <= set(clean)
    assert {"train", "val", "test"} <= set(split)
    assert clean["documents_in"] == ingest["documents"] == clean["kept"] + clean["quarantined"]
    assert split["train"] + split["val"] + split["test"] == clean["kept"]
    assert (art / "clean/data_docs/index.html").exists()
    # the vocabulary group on the same splits
    result = invoke("run", "--select", "group:tokenizer")
    assert result.exit_code == 0, result.output
    tokenizer = json.loads((art / "tokenizer/summary.json").read_text())
    assert {"vocab_size", "fertility", "unk_rate"} <= set(tokenizer) and tokenizer["round_trip_rate"] == 1.0
    packed = json.loads((art / "packed/summary.json").read_text())
    assert packed["train_tokens"] > 0 and (art / "packed/trained/train.bin").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(art / "tokenizer/hf")).eos_token == "<eos>"
    # run config overrides one value for one run, recorded in the stage's params.json
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  clean:\n    config:\n      filters:\n        min_words: 500\n")
    result = invoke("run", "--select", "clean", "--config", str(config))
    assert result.exit_code == 1
    assert "check failed: clean/min_rows" in result.output
    assert json.loads((art / "clean/params.json").read_text())["filters"]["min_words"] == 500


def test_failing_blocking_check_stops_downstream(tmp_path: Path, corpus: Path, monkeypatch):
    params = write_params(tmp_path, corpus, clean={"validation": {"min_rows": 1000}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    result = invoke("run", "--params", str(params))
    assert result.exit_code == 1
    assert "check failed: clean/min_rows: at least 1000 documents kept FAILED" in result.output
    assert not (tmp_path / "artifacts" / "split").exists()


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"clean": {"filtres": {}}}, "error: unknown key 'clean.filtres' (did you mean 'filters'?)"),
        ({"paths": {"raw": "/nonexistent/raw"}}, "error in ingest: ingest source 'raw': directory not found: /nonexistent/raw"),
        ({"clean": {"steps": ["strip_html"]}}, "error in clean: clean.steps: unknown step(s) ['strip_html']"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path: Path, corpus: Path, monkeypatch, sections, message):
    params = write_params(tmp_path, corpus, **sections)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    result = runner.invoke(app, ["run", "--params", str(params)])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_selection(params_file: Path):
    result = runner.invoke(app, ["run", "--select", "key:nothing"])
    assert result.exit_code == 1 and "matches no asset" in result.output


def test_demo_corpus_command_writes_a_complete_corpus_once_and_the_same_bytes_when_rebuilt(tmp_path: Path):
    """The demo corpus is real and offline, in every promised format; built again, it is byte-identical."""
    from lmforge.demo_corpus import MANIFEST, build_demo_corpus
    from lmforge.formats import html_to_text
    from models.checksums import weights_sha256  # names and bytes of every file under a folder

    a, b = tmp_path / "a", tmp_path / "b"
    result = invoke("demo-corpus", "--data", str(a))
    assert result.exit_code == 0 and "demo corpus written" in result.output
    counts = json.loads((a / MANIFEST).read_text())["counts"]
    raw = a / "raw"
    suffixes = {p.suffix for p in (raw / "packages").iterdir()}
    assert {".md", ".rst"} <= suffixes
    assert (raw / "stdlib" / "json.txt").read_text().startswith("JSON (JavaScript Object Notation)")
    page = (raw / "html" / "json.html").read_text()
    assert "<h2 id=\"dumps\">" in page and "dumps(" in html_to_text(page)
    assert counts["packages"] > 50 and counts["stdlib"] > 100 and counts["html"] >= counts["stdlib"]
    classification = [json.loads(line) for line in (a / "finetune/classification.jsonl").read_text().splitlines()]
    summarisation = [json.loads(line) for line in (a / "finetune/summarisation.jsonl").read_text().splitlines()]
    assert len(classification) == counts["classification"] >= 50
    assert {r["label"] for r in classification} == {"readme", "module", "api"}
    assert all(len(r["text"].split()) >= 25 and r["source"].startswith({"readme": "packages/"}.get(r["label"], "stdlib/")) for r in classification)
    assert len(summarisation) >= 50 and all(r["document"] and r["summary"] for r in summarisation)
    assert not any(p.name.startswith("lmforge") for p in (raw / "packages").iterdir())

    build_demo_corpus(b, REPO / "requirements.lock")  # what the command calls
    assert weights_sha256(a) == weights_sha256(b)
    again = invoke("demo-corpus", "--data", str(a))
    assert again.exit_code == 0 and "leaving it as it is" in again.output


def test_failing_tokenizer_check_stops_packing(tmp_path: Path, corpus: Path, monkeypatch):
    params = write_params(tmp_path, corpus, tokenizer={"algorithm": "char", "vocab_size": 12, "min_frequency": 1})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    result = invoke("run", "--params", str(params))
    assert result.exit_code == 1
    assert "check failed: tokenizer/unk_rate_below_threshold" in result.output and "raise vocab_size" in result.output
    assert not (tmp_path / "artifacts" / "packed").exists()


@pytest.mark.slow
def test_one_run_builds_every_stage_per_candidate_tracked_in_mlflow(tiny_project: Project):
    """`lmforge run` on the tiny project (the session's pipeline): every stage, each candidate in its own run."""
    import mlflow

    out = tiny_project.first_run
    for name in ("a", "b"):  # one run per candidate, its assets in the order they finished
        line = next(line for line in out.splitlines() if " succeeded: " in line and line.endswith(f" [{name}]"))
        assert set(line.split(" succeeded: ")[1].removesuffix(f" [{name}]").split(", ")) == {"pretrain", "evaluate", "benchmark_eval"}
    for name, family in (("a", "llama"), ("b", "bloom")):
        summary = tiny_project.summary(f"pretrain/{name}")
        assert {"parameters", "tokens_seen", "tokens_per_second", "final_val_loss"} <= set(summary) and summary["family"] == family
        assert (tiny_project.artifacts / "pretrain" / name / "loss_curve.png").exists()
    # then each candidate is evaluated, the champion selected and fine-tuned, in the same `lmforge run`
    (last,) = [line for line in out.splitlines() if "succeeded" in line and "select" in line]
    assert all(name in last for name in ("task_data", "finetune_classifier", "finetune_sft", "quantize", "prune", "distil", "register"))
    registered = tiny_project.summary("register")
    champion = tiny_project.summary("select")["champion"]
    assert registered["champion_version"] == "1" and registered["candidate"] == champion
    assert tiny_project.summary("register_quantized")["base_version"] == "1"
    inference = tiny_project.summary("batch_inference")  # the prompts of data/prompts/, with models:/lmforge@champion
    assert "batch_inference" in last and inference["completed"] == inference["prompts"] == TINY_PROMPTS and inference["quarantined"] == 0
    # and the rag group: index, with/without retrieval, prompts, the sweep tagged on the champion's version
    assert all(name in last for name in ("retrieval_index", "rag_eval", "prompt_eval", "sampling_sweep"))
    assert tiny_project.summary("sampling_sweep")["tagged_version"] == "1"
    for name in ("a", "b"):
        evaluation = tiny_project.summary(f"evaluate/{name}")
        assert {"perplexity", "bits_per_byte", "token_accuracy", "context_x4_perplexity", "tokens_per_second_b8"} <= set(evaluation)
        assert all(evaluation["checks"].values())
    assert tiny_project.summary("finetune_sft")["champion"] == champion
    assert "macro_f1" in tiny_project.summary("finetune_classifier")
    client = mlflow.MlflowClient(tiny_project.mlflow_uri, registry_uri=tiny_project.mlflow_uri)
    all_runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    runs = [r for r in all_runs if "stage" not in r.data.tags and "candidate" in r.data.tags]  # pretraining runs
    assert sorted(r.data.tags["candidate"] for r in runs) == ["a", "b"]
    evaluations = [r for r in all_runs if r.data.tags.get("stage") == "evaluate"]
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in evaluations) == sorted(r.info.run_id for r in runs)  # nested
    run = runs[0]
    assert {"train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "val/perplexity"} <= set(run.data.metrics)
    assert {"git_sha", "dvc_data_md5", "dagster_run_id", "candidate", "model_dir"} <= set(run.data.tags) and run.data.tags["dagster_run_id"]
    assert "arch.n_layer" in run.data.params and [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss_curve.png"]
    assert run.info.status == "FINISHED"
    assert len(client.search_model_versions("name='lmforge'")) == 2


@pytest.mark.slow
def test_nothing_changed_nothing_recomputed_and_a_change_recomputes_what_it_affects(tiny_project: Project):
    register = tiny_project.summary("register")
    out = tiny_project.lmforge("run").stdout
    assert "up to date: 25 of 25 assets; to compute: nothing" in out and "★ champion" in out  # the summary table ends the run
    assert tiny_project.summary("register") == register
    # a changed parameter makes its stage out of date and what depends on it, nothing else (--dry-run only tells)
    params_file = tiny_project.path / "params.yaml"
    original = params_file.read_text()
    try:
        data = yaml.safe_load(original)
        data["distil"]["steps"] = 12
        params_file.write_text(yaml.safe_dump(data))
        assert "up to date: 24 of 25 assets; to compute: distil\n" in tiny_project.lmforge("run", "--dry-run").stdout
    finally:
        params_file.write_text(original)
    # a new raw document makes everything from ingest on out of date; on the Ray engine, the stages
    # declared with a Ray path (Stage(engines=...)) say they run there
    arrived = tiny_project.path / "data" / "raw" / "arrived.txt"
    arrived.write_text("A new document about models and packages arrives in the raw folder today.")
    try:
        assert "on Ray Data" not in tiny_project.lmforge("run", "--dry-run").stdout
        data = yaml.safe_load(original)
        data.setdefault("cluster", {})["data_engine"] = "ray"
        params_file.write_text(yaml.safe_dump(data))
        out = tiny_project.lmforge("run", "--dry-run").stdout
    finally:
        arrived.unlink()
        params_file.write_text(original)
    assert "on Ray Data (cluster.data_engine: ray): clean, ingest, packed, tokenizer\n" in out
    assert "up to date: 2 of 25 assets" in out and "pretrain[a]" in out and "register_quantized" in out
    assert "task_data" not in out and "base_models" not in out  # neither the task sets nor the base models come from the raw documents


@pytest.mark.slow
def test_an_edited_module_makes_exactly_the_stages_that_import_it_out_of_date(tiny_project: Project, tmp_path: Path):
    """The code that runs is edited (a copy of it, first on PYTHONPATH): the stages whose import closure holds the
    module are out of date, with everything downstream of them; a module no stage imports changes nothing."""
    import shutil

    import dagster as dg

    from dagster_project.definitions import defs
    from lmforge import codegraph, stages

    NOT_IN_DVC = set(stages.off_the_pipeline())  # the loops and the search: off the pipeline `lmforge run` computes

    code = tmp_path / "code"
    for package in codegraph.PACKAGES:
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    run = [sys.executable, "-P", "-c", "from dagster_project.cli import main; main()", "run", "--dry-run"]  # -P: PYTHONPATH first
    graph = defs.resolve_asset_graph()
    computed = {}
    for module in ("lmforge/registry.py", "lmforge/demo_corpus.py"):
        (code / module).write_text((code / module).read_text() + "\n# edited\n")
        out = tiny_project.run(*run, env={"PYTHONPATH": str(code)}).stdout
        (code / module).write_text((REPO / module).read_text())
        listed = out.split("to compute: ")[1].splitlines()[0]
        computed[module] = set() if listed == "nothing" else {name.split("[")[0] for name in listed.split(", ")}
        importers = [s for s in codegraph.definitions() if module in codegraph.relative(codegraph.stage_files(s)) and s not in NOT_IN_DVC]
        expected = {k.to_user_string() for k in dg.AssetSelection.assets(*importers).downstream().resolve(graph)} - set(NOT_IN_DVC) if importers else set()
        assert computed[module] == expected, module
    assert {"register", "register_quantized", "sampling_sweep"} <= computed["lmforge/registry.py"] and "ingest" not in computed["lmforge/registry.py"]
    assert computed["lmforge/demo_corpus.py"] == set()


@pytest.mark.slow
def test_another_params_file_leaves_the_main_pipeline_up_to_date(tiny_project: Project, tmp_path: Path):
    """Two corpora in one project and one Dagster instance: a run of the other params file (its own raw
    documents and artifacts directory) does not make the main pipeline stale."""
    other_raw = tmp_path / "raw"
    other_raw.mkdir()
    for i in range(12):
        (other_raw / f"other{i}.txt").write_text(prose(1000 + i, 80))
    other = write_params(tmp_path, other_raw)
    out = tiny_project.lmforge("run", "--params", str(other), "--select", "group:data").stdout
    assert "succeeded: ingest, clean, split" in out and (tmp_path / "artifacts" / "split" / "summary.json").exists()
    assert "to compute: nothing" in tiny_project.lmforge("run", "--dry-run").stdout


@pytest.mark.slow
def test_partition_mistakes_are_one_line_errors(tmp_path: Path):
    project = make_project(tmp_path)
    result = project.lmforge("run", "--select", "key:pretrain", "--partition", "a", check=False)
    assert result.returncode == 1 and "materialize the 'packed' stage first" in result.stderr
    result = project.lmforge("run", "--select", "key:pretrain", "--partition", "zzz", check=False)
    assert result.returncode == 1 and "no partition 'zzz' (partitions: a, b)" in result.stderr
