"""Writing and reading stage artifacts: Arrow datasets, ``quarantine.jsonl`` and ``summary.json``.

Every stage goes through these helpers so that the same artifact contract holds everywhere: each
stage writes one directory of its own (``<artifacts>/<stage>/``), with a ``summary.json`` that DVC
reads as the stage's metrics and one quarantine record per rejected input.

What a summary measured on this machine (wall times, throughput, latency, memory, speed-ups) and
the ids of the tracked runs it logged to go to ``timings.json`` beside it, which ``.dvcignore`` hides from DVC: the same data, code and parameters
then give the same hashed outputs on every machine and every run, so ``dvc status`` stays clean
after a rerun and a clone does not redo stages because a laptop was slower.  ``read_summary`` gives
both back as one dict, so readers never care which file a figure lives in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.params import LmforgeError

QUARANTINE = "quarantine.jsonl"
SUMMARY = "summary.json"
TIMINGS = "timings.json"
#: Summary keys whose values depend on the machine, its load or the run itself (the id of an MLflow
#: run is new each time a stage runs, even when it computes the same thing) rather than on data, code
#: and params.
MEASURED = re.compile(r"(^|_)(seconds|latency_ms|memory_mb|tokens_per_second|speedup|speed_goal_met|run_id)(_|$)")
PARAMS = "params.json"


class QuarantineWriter:
    """Append-only writer of rejected inputs, one JSON object a line, counting reasons as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self.by_reason: Counter[str] = Counter()
        self._fh = open(path, "w", encoding="utf-8")

    def write(self, *, source: str, reason: str, detail: str, text: str | None = None, **extra: Any) -> None:
        record = {"source": source, "reason": reason, "detail": detail, **extra, "text": text}
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.by_reason[reason] += 1

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> QuarantineWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count_reasons(path: Path) -> Counter[str]:
    """Reasons in an existing quarantine file (used to merge shards written by worker processes)."""
    reasons: Counter[str] = Counter()
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                reasons[json.loads(line)["reason"]] += 1
    return reasons


def concat_files(parts: list[Path], target: Path) -> None:
    with open(target, "wb") as out:
        for part in parts:
            if part.exists():
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out)
                part.unlink()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object a line (retrieval chunks, known items)."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _split(summary: Any) -> tuple[Any, Any]:
    """(what the data, code and params decide, what this machine measured) of a summary, same nesting."""
    if not isinstance(summary, dict):
        return summary, None
    stable, measured = {}, {}
    for key, value in summary.items():
        if MEASURED.search(key):
            measured[key] = value
            continue
        stable[key], inner = _split(value)
        if inner:
            measured[key] = inner
    return stable, measured


def _merge(stable: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    merged = dict(stable)
    for key, value in measured.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def write_summary(stage_dir: Path, summary: dict[str, Any]) -> Path:
    """``summary.json`` (hashed by DVC) and, when the stage measured anything, ``timings.json`` (not)."""
    stable, measured = _split(summary)
    path = stage_dir / SUMMARY
    path.write_text(json.dumps(stable, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    timings = stage_dir / TIMINGS
    if measured:
        timings.write_text(json.dumps(measured, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    else:
        timings.unlink(missing_ok=True)
    return path


def write_params(stage_dir: Path, stage_params: Any) -> Path:
    """Record the effective parameters of a run (params.yaml plus run-config overrides) beside its
    outputs, so that checks and people see exactly what produced them."""
    path = stage_dir / PARAMS
    path.write_text(json.dumps(dataclasses.asdict(stage_params), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_params(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / PARAMS
    if not path.exists():
        raise LmforgeError(f"{path} not found: run the '{stage_dir.name}' stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_summary(stage_dir: Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """A stage's summary with its timings merged back; a missing one is an error (None if ``missing_ok``)."""
    path = stage_dir / SUMMARY
    if not path.exists():
        if missing_ok:
            return None
        raise LmforgeError(f"{path} not found: run the '{stage_dir.name}' stage first")
    summary = json.loads(path.read_text(encoding="utf-8"))
    timings = stage_dir / TIMINGS
    return _merge(summary, json.loads(timings.read_text(encoding="utf-8"))) if timings.exists() else summary


def fresh_dir(path: Path) -> Path:
    """Empty ``path`` (a stage's output directory) so that no file of an earlier run survives."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def load_dataset_dir(path: Path, stage: str):
    """Open an Arrow dataset written by an earlier stage (memory-mapped, not loaded)."""
    import datasets

    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise LmforgeError(f"{path} not found: materialize the '{stage}' stage first (lmforge run --select {stage})")
    state = path / "state.json"
    if state.exists() and not json.loads(state.read_text())["_data_files"]:
        # ``datasets`` saves an empty dataset without data files and cannot load it back
        features = datasets.DatasetInfo.from_directory(str(path)).features
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.load_from_disk(str(path))


@contextmanager
def worker_friendly_signals() -> Iterator[None]:
    """Let forked worker processes die on SIGTERM while a ``datasets`` pool runs.

    Dagster installs a SIGTERM handler for graceful run termination.  Workers forked by ``datasets``
    inherit it, so when the pool is torn down (``Pool.terminate`` sends SIGTERM) an idle worker does
    not exit and the run hangs forever.  Restoring the default action around the pool avoids that;
    the parent's handler is back as soon as the pool is gone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def save_generated(
    generator: Callable[..., Iterator[dict]],
    gen_kwargs: dict[str, Any],
    features,
    out_dir: Path,
    num_proc: int | None = None,
) -> Any:
    """Stream rows from ``generator`` into an Arrow dataset saved at ``out_dir``.

    Rows go straight to Arrow files on disk (Hugging Face ``datasets`` writes in batches), so memory
    stays flat however large the corpus is.  A throw-away cache directory forces a fresh generation
    each run: the generator has side effects (quarantine records) that a cache hit would skip.
    """
    import datasets

    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-cache-") as cache:
        try:
            with worker_friendly_signals():
                ds = datasets.Dataset.from_generator(
                    generator,
                    features=features,
                    gen_kwargs=gen_kwargs,
                    cache_dir=cache,
                    num_proc=num_proc,
                    split="train",
                )
        except datasets.exceptions.DatasetGenerationError as exc:
            if isinstance(exc.__cause__, LmforgeError):  # a user mistake found while reading
                raise exc.__cause__ from None
            raise
        except ValueError as exc:
            if "corresponds to no data" not in str(exc):
                raise
            # every row was rejected: ``datasets`` refuses to build an empty split, so make it here
            ds = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
        save_dataset(ds, out_dir)
        del ds
    return load_dataset_dir(out_dir, out_dir.parent.name)


def save_dataset(ds, out_dir: Path) -> None:
    """``save_to_disk`` with a content-derived fingerprint in ``state.json``.

    ``datasets`` derives the fingerprint from the function and arguments that made the dataset,
    absolute paths included, so the same rows saved from two checkouts would differ by that one field
    and DVC would see a change.  Hashing the Arrow files instead makes equal content equal bytes.
    """
    ds.save_to_disk(str(out_dir), max_shard_size="500MB")
    state_path = out_dir / "state.json"
    state = json.loads(state_path.read_text())
    digest = hashlib.sha256()
    for entry in state["_data_files"]:
        with open(out_dir / entry["filename"], "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    state["_fingerprint"] = digest.hexdigest()[:16]
    state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def write_shard(rows: Iterator[dict], features, path: Path) -> dict[str, Any]:
    """One Arrow shard of a dataset (the file format ``save_to_disk`` writes), from rows that a worker
    produces: the Ray engine's tasks write their part of a stage's output with it.  Returns the
    shard's rows, bytes and content hash, which ``save_shards`` needs."""
    from datasets.arrow_writer import ArrowWriter

    from lmforge.sources import sha256_file

    with ArrowWriter(features=features, path=str(path)) as writer:
        for row in rows:
            writer.write(row)
        num_rows, num_bytes = writer.finalize()
    return {"rows": num_rows, "bytes": num_bytes, "sha256": sha256_file(path)}


def save_shards(shards: list[tuple[Path, dict[str, Any]]], features, out_dir: Path) -> None:
    """A dataset directory from shards that ``write_shard`` wrote elsewhere, in order: the non-empty
    shards move in under ``save_to_disk``'s names, and only the manifest is written here
    (``state.json`` and ``dataset_info.json``, as ``save_to_disk`` writes them; the fingerprint is a
    hash of the shards' hashes, so equal content gives equal bytes).  ``datasets.load_from_disk``
    reads the shards as one dataset, in this order."""
    import datasets

    kept = [(path, shard) for path, shard in shards if shard["rows"]]
    if not kept:  # ``datasets`` cannot load a dataset without data files: write an empty one
        save_dataset(datasets.Dataset.from_dict({k: [] for k in features}, features=features), out_dir)
        return
    out_dir.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(kept):05d}.arrow" for i in range(len(kept))]
    for name, (path, _) in zip(names, kept):
        path.rename(out_dir / name)
    size = sum(shard["bytes"] for _, shard in kept)
    splits = datasets.SplitDict()
    splits.add(datasets.SplitInfo(name="train", num_bytes=size, num_examples=sum(shard["rows"] for _, shard in kept)))
    info = dataclasses.asdict(datasets.DatasetInfo(features=features, splits=splits, dataset_size=size, size_in_bytes=size))
    state = {"_data_files": [{"filename": name} for name in names], "_format_columns": None, "_format_kwargs": {},
             "_format_type": None, "_output_all_columns": False, "_split": "train",
             "_fingerprint": hashlib.sha256("".join(shard["sha256"] for _, shard in kept).encode()).hexdigest()[:16]}
    (out_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    (out_dir / "dataset_info.json").write_text(json.dumps({key: info[key] for key in sorted(info)}, indent=2))


def shards(items: list, n: int) -> list[list]:
    """Split ``items`` into at most ``n`` contiguous shards (contiguous keeps the output order)."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def env_num_proc(requested: int) -> int:
    """Worker processes to use: never more than the cores this process may run on."""
    return max(1, min(requested, len(os.sched_getaffinity(0))))


def value_counts(ds, column: str) -> dict[str, int]:
    """Occurrences of each value of a dataset column, sorted by value (computed by Arrow)."""
    import pyarrow.compute as pc

    if len(ds) == 0:
        return {}
    return dict(sorted((c["values"], c["counts"]) for c in pc.value_counts(ds.data.column(column)).to_pylist()))

