"""Artifact helpers: empty datasets, shards, and worker pools under Dagster's signal handler."""

import signal
import time
from pathlib import Path

import multiprocess

from lmforge.artifacts import save_generated, shards, worker_friendly_signals
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
