"""`dvc repro` runs the same assets as Dagster, and a second `dvc repro` recomputes nothing."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, prose
from test_finetune import TINY_DOWNSTREAM, write_task_sets

BIN = REPO / ".venv" / "bin"
STAGES = ("ingest", "clean", "split", "base_models", "tokenizer", "packed", "pretrain@0", "evaluate@0", "select", "task_data", "finetune_classifier", "finetune_sft",
          "quantize", "prune", "distil", "register", "register_quantized", "retrieval_index", "rag_eval", "prompt_eval", "sampling_sweep")


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "dvc").exists(), reason="DVC is installed by `make install`")
def test_dvc_repro_reproduces_the_data_stages_and_is_idempotent(tmp_path: Path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "lmforge", "assets", "dagster_project", "models", "prompts"):
        src = REPO / name
        (shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy(src, project / name))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["clean"]["validation"]["min_rows"] = 3
    params["split"].update(train=0.6, val=0.2, test=0.2)
    params["tokenizer"].update(vocab_size=400, block_size=64)
    params["pretrain"]["train"].update(max_steps=60, batch_size=4, lr=0.01, val_every=30, checkpoint_every=30, warmup_steps=5, val_batches=2)
    params["pretrain"]["candidates"] = [{"name": "tiny", "preset": "tiny", "overrides": {}}]
    params["evaluate"].update(speed_new_tokens=4, prompts=["The model"])
    params["finetune"].update(min_examples=20)
    params["finetune"]["classification"]["labels"] = ["first", "second"]
    params["finetune"]["train"].update(epochs=1, max_length=64)
    params["distil"].update(steps=10, batch_size=4, warmup_steps=2)
    params["rag"] = {**params["rag"], **TINY_DOWNSTREAM["rag"]}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    for i in range(20):
        (raw / f"doc{i}.txt").write_text(prose(i, 80))
    write_task_sets(project / "data/finetune")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DAGSTER_HOME": str(tmp_path / "dagster"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("LMFORGE_PARAMS", None)

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    first = sh("dvc", "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    summary = json.loads((project / "artifacts/split/summary.json").read_text())
    assert summary["train"] + summary["val"] + summary["test"] == 20
    assert json.loads((project / "artifacts/pretrain/tiny/summary.json").read_text())["steps"] == 60
    assert json.loads((project / "artifacts/select/summary.json").read_text())["champion"] == "tiny"
    assert "beats_baseline" in json.loads((project / "artifacts/finetune_sft/summary.json").read_text())
    lock = (project / "dvc.lock").read_text()
    second = sh("dvc", "repro")
    assert "Running stage" not in second
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second
    assert (project / "dvc.lock").read_text() == lock
    # a changed parameter re-runs only the stages that declare it
    params["split"]["seed"] = "another"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    third = sh("dvc", "repro", "packed")  # up to the packed data: the rest of the graph is covered above
    assert "Running stage 'split'" in third and "Running stage 'ingest'" not in third and "Running stage 'clean'" not in third
    # a tokenizer parameter re-runs the vocabulary stages only
    params["tokenizer"]["vocab_size"] = 300
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    fourth = sh("dvc", "repro", "packed")
    assert "Running stage 'tokenizer'" in fourth and "Running stage 'packed'" in fourth and "Running stage 'split'" not in fourth


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "dvc").exists(), reason="DVC is installed by `make install`")
def test_a_corpus_that_differs_from_data_dvc_is_explained_not_an_error(tmp_path: Path, capsys):
    from dagster_project.cli import _compare_with_data_dvc

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "doc.txt").write_text("recorded")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "data.dvc").write_text((tmp_path / "data.dvc").read_text() + "meta:\n  python: 3.10.0\n")
    shutil.rmtree(tmp_path / ".dvc" / "cache")  # as on a fresh clone: the data is not in the cache
    _compare_with_data_dvc(tmp_path)
    assert "matches data.dvc" in capsys.readouterr().out
    (tmp_path / "data" / "doc.txt").write_text("built elsewhere")
    _compare_with_data_dvc(tmp_path)
    out = capsys.readouterr().out
    assert "differs from the one recorded in data.dvc (data.dvc was recorded with Python 3.10.0" in out
    assert "Nothing is broken" in out and "dvc add data" in out
