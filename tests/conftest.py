"""Shared fixtures: tiny corpora and params files in a temporary directory; no network."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]

# Real English words, so that generated documents pass the quality filters like prose does.
WORDS = (
    "the model reads documents from many sources and turns them into plain text before cleaning "
    "every stage writes its outputs beside a summary that counts what came in and what went out "
    "language data needs careful validation because small mistakes spread into training runs "
    "engineers want lineage from each weight back to the exact file that taught it something "
    "python packages describe themselves with long descriptions written by their maintainers"
).split()


def prose(seed: int, n_words: int = 60) -> str:
    """A deterministic, distinct paragraph of real words (distinct seeds → not near duplicates)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def stop_process_group(proc) -> None:
    """Stop a server started with ``start_new_session=True`` and every process it spawned."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def write_params(tmp_path: Path, raw: Path | None = None, **sections) -> Path:
    """A params file pointing at ``raw`` with artifacts under ``tmp_path``; ``sections`` override."""
    data = {
        "paths": {"raw": str(raw or tmp_path / "raw"), "artifacts": str(tmp_path / "artifacts"), "finetune": str(tmp_path / "finetune")},
        "clean": {"validation": {"min_rows": 3}, "num_proc": 1},
        "ingest": {"num_proc": 1},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small directory of text documents in several formats."""
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    for i in range(12):
        (raw / f"doc{i:02d}.txt").write_text(prose(i) + "\n\n" + prose(100 + i) + "\n")
    (raw / "guide.md").write_text(f"# Guide\n\nSome *emphasis* and a [link](https://example.org).\n\n{prose(50)}\n")
    (raw / "notes.rst").write_text(f"Notes\n=====\n\n**Bold** text. {prose(51)}\n\n.. automodule:: missing\n")
    (raw / "sub" / "page.html").write_text(
        f"<html><head><title>Page</title><script>var x = 1;</script></head><body><p>{prose(52)}</p></body></html>"
    )
    return raw


@pytest.fixture
def params_file(tmp_path: Path, corpus: Path, monkeypatch) -> Path:
    path = write_params(tmp_path, corpus)
    monkeypatch.setenv("LMFORGE_PARAMS", str(path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return path


@pytest.fixture(autouse=True, scope="session")
def no_stray_mlflow_store():
    """MLflow's default store (``./mlflow.db``, ``./mlruns`` in the working directory) must never appear:
    every MLflow client lmforge makes names the configured tracking and registry URI."""
    stray = [Path.cwd() / "mlflow.db", Path.cwd() / "mlruns", REPO / "mlflow.db", REPO / "mlruns"]
    before = {p for p in stray if p.exists()}
    yield
    appeared = sorted(str(p) for p in stray if p.exists() and p not in before)
    assert not appeared, f"an MLflow store appeared outside the configured URI: {', '.join(appeared)}"
