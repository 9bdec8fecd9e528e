"""Artifact helpers: empty datasets, shards, and worker pools under Dagster's signal handler."""

import signal
import time
from pathlib import Path

import multiprocess
from conftest import REPO

from lmforge.artifacts import read_summary, save_generated, shards, worker_friendly_signals, write_summary
from lmforge.ingest import features


def _rows(n):
    yield from ()


def test_an_all_rejected_stage_writes_an_empty_dataset(tmp_path: Path):
    ds = save_generated(_rows, {"n": 0}, features(), tmp_path / "dataset")
    assert len(ds) == 0 and "text" in ds.column_names


def test_shards_are_contiguous_and_complete():
    assert shards(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert shards([1], 4) == [[1]] and shards([], 2) == [[]]


def _square(x):
    return x * x


def test_pool_teardown_does_not_hang_under_a_sigterm_handler():
    """Dagster catches SIGTERM; forked workers inheriting that would ignore Pool.terminate()."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        start = time.monotonic()
        with worker_friendly_signals():
            with multiprocess.get_context("fork").Pool(2) as pool:  # __exit__ calls terminate()
                assert pool.map(_square, [1, 2, 3]) == [1, 4, 9]
        assert time.monotonic() - start < 30
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_what_a_stage_measured_goes_beside_its_summary_and_reads_back_as_one(tmp_path: Path):
    """Timings and run ids live in timings.json (hidden from DVC by .dvcignore): summary.json is the same
    on every machine and run (a stage materialized again from the UI leaves `dvc status` clean), and read_summary gives both back as the dict the stage wrote."""
    import json

    summary = {"perplexity": 3.5, "seconds": 1.2, "tokens_per_second_b1": 800.0, "speed_goal_met": True,
               "variants": {"bf16": {"accuracy": 0.5, "latency_ms_b8": 12.0, "speedup_b1_min": 1.4}, "fp32": {"accuracy": 0.5}},
               "speedup_spread_b1": [1.1, 1.3], "champion_score": 0.9, "mlflow_run_id": "f00", "champion_pretrain_run_id": "ba5"}
    write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "perplexity": 3.5, "variants": {"bf16": {"accuracy": 0.5}, "fp32": {"accuracy": 0.5}}, "champion_score": 0.9}
    assert json.loads((tmp_path / "timings.json").read_text()) == {
        "seconds": 1.2, "tokens_per_second_b1": 800.0, "speed_goal_met": True, "speedup_spread_b1": [1.1, 1.3],
        "mlflow_run_id": "f00", "champion_pretrain_run_id": "ba5", "variants": {"bf16": {"latency_ms_b8": 12.0, "speedup_b1_min": 1.4}}}
    assert read_summary(tmp_path) == summary
    write_summary(tmp_path, {"rows": 3})  # nothing measured this time: no stale timings survive
    assert not (tmp_path / "timings.json").exists() and read_summary(tmp_path) == {"rows": 3}
    assert read_summary(tmp_path / "missing", missing_ok=True) is None
    assert "timings.json" in (REPO / ".dvcignore").read_text().split()
