"""Each stage declared once (``Stage(...)`` beside its logic): dvc.yaml, the Dagster assets' groups, upstream assets and
code versions are made from the declarations, and a new stage is one module, its asset and its params."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, Project

from lmforge import codegraph, stages


def test_the_committed_dvc_yaml_is_the_one_the_declarations_give():
    assert (REPO / "dvc.yaml").read_text(encoding="utf-8") == stages.dvc_yaml(REPO), "dvc.yaml is stale: run `lmforge dvc-yaml`"


def test_every_declared_stage_is_an_asset_of_its_group_reading_its_upstream():
    import dagster as dg

    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()
    declared = stages.stages()
    assert {k.to_user_string() for k in graph.materializable_asset_keys} == set(declared) == set(codegraph.definitions())
    for name, stage in declared.items():
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == stage.group, name
        parents = {p.to_user_string() for p in node.parent_keys} - {"raw_documents"}  # ingest also observes the raw files
        assert parents == set(stage.upstream), name
        assert (node.partitions_def is not None) == stage.per_candidate, name
    # upstream before downstream: the order dvc.yaml lists them in
    order = list(declared)
    assert all(order.index(u) < order.index(name) for name, s in declared.items() for u in s.upstream)


def _project_code(root: Path, module: str) -> Path:
    """A copy of the project's code and params under ``root``, with ``lmforge/<module>`` (a stage declaration) written."""
    for package in codegraph.PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "lmforge" / "bad.py").write_text(module)
    return root


@pytest.mark.parametrize("module, message", [
    ('from lmforge.stages import Stage\nBAD = Stage("bad", group="x", reads=("nowhere/file",))\n',
     "stage 'bad' reads 'nowhere/file': no stage 'nowhere' is declared"),
    ('from lmforge.stages import Stage\nGROUP = "x"\nBAD = Stage("bad", group=GROUP)\n',
     r"lmforge/bad.py:3: a stage declaration holds literals only .*not GROUP"),
    ('from lmforge.stages import Stage\nBAD = Stage("split", group="x")\n', "stage 'split' is declared twice"),
    ('from lmforge.stages import Stage\nBAD = Stage("bad", group="x", reads=("pretrain/{candidate}/hf",))\n',
     "stage 'bad' reads 'pretrain/{candidate}/hf' of one candidate: declare it per_candidate=True"),
    ('from lmforge.stages import Stage\nBAD = Stage("bad", group="x", reads=("hpsearch",))\n',
     "stage 'bad' is in dvc.yaml but reads 'hpsearch' of 'hpsearch', which is not"),
    ('from lmforge.stages import Stage\nBAD = Stage("bad", group="x", reads=("split/train",))\n\n\ndef run_bad(params):\n'
     '    return params.stage_dir("bad"), params.stage_dir("split"), params.stage_dir("clean")\n',
     r'lmforge/bad.py:6: the code opens stage_dir\("clean"\), which no stage of this module declares it reads \(bad\): add it to reads='),
])
def test_a_declaration_that_does_not_fit_is_refused_with_where_and_why(tmp_path: Path, module: str, message: str):
    root = _project_code(tmp_path, module)
    with pytest.raises(stages.StageError, match=message):
        stages.stages(root)


TOY_LOGIC = '''"""A toy stage: the number of words in the train split."""

from lmforge.artifacts import fresh_dir, load_dataset_dir, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.params import Params
from lmforge.stages import Stage

TOY = Stage("toy", group="toy", params=("split",), reads=("split/train",), note="a stage added by a test")


def run_toy(params: Params, ctx: RunContext = QUIET) -> dict:
    words = sum(len(t.split()) for t in load_dataset_dir(params.stage_dir("split") / "train", "split")["text"])
    summary = {"words": words}
    write_summary(fresh_dir(params.stage_dir("toy")), summary)
    ctx.log(f"toy: {words} words")
    return summary
'''

TOY_ASSET = '''"""The toy stage's asset."""

import lmforge.toy
from assets.factory import stage_asset

toy = stage_asset("toy", lmforge.toy.run_toy, description="Words in the train split.")
'''


@pytest.mark.slow
def test_a_toy_stage_is_its_module_and_its_asset_and_shows_everywhere(tiny_project: Project, tmp_path: Path):
    """docs/adding-a-stage.md, followed in a copy of the code: the stage's module and its asset, nothing else."""
    import yaml

    code = tmp_path / "code"
    for package in codegraph.PACKAGES:
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, code / name)
    (code / "lmforge" / "toy.py").write_text(TOY_LOGIC)
    (code / "assets" / "toy.py").write_text(TOY_ASSET)
    cli = [sys.executable, "-P", "-c", "from dagster_project.cli import main; main()"]  # -P: the copy's code first
    env = {"PYTHONPATH": str(code), "LMFORGE_ROOT": str(code)}

    # dvc.yaml: the toy stage, its data, its code's import closure and its params
    tiny_project.run(*cli, "dvc-yaml", env=env)
    toy = yaml.safe_load((code / "dvc.yaml").read_text())["stages"]["toy"]
    assert toy["cmd"] == "lmforge run --select toy" and toy["params"] == ["split"]
    assert {"artifacts/split/train", "lmforge/toy.py", "assets/toy.py", "assets/factory.py", "lmforge/context.py", "lmforge/artifacts.py"} <= set(toy["deps"])
    assert toy["metrics"] == [{"artifacts/toy/summary.json": {"cache": False}}]
    assert tiny_project.run(*cli, "dvc-yaml", "--check", env=env).returncode == 0

    # Dagster: in the Definitions, in its group, downstream of split; `lmforge run` computes it, and the summary shows it
    project_env = {"PYTHONPATH": str(code)}
    try:
        dry = tiny_project.run(*cli, "run", "--dry-run", env=project_env).stdout
        assert dry.split("to compute: ")[1].splitlines()[0] == "toy"
        out = tiny_project.run(*cli, "run", "--select", "toy", env=project_env).stdout
        words = tiny_project.summary("toy")["words"]
        assert words > 0 and "toy" in out
        table = tiny_project.run(*cli, "summary", env=project_env).stdout
        assert any(line.split()[:3] == ["toy", "figures", "words"] and f"{words:,}" in line for line in table.splitlines()), table
    finally:  # the session's tiny project is shared: leave it as the other tests expect it
        shutil.rmtree(tiny_project.artifacts / "toy", ignore_errors=True)
