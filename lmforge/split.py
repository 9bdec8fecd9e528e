"""Split: cleaned documents → deterministic train / val / test.

A document's split is a pure function of ``hash(seed, cluster)``: the same corpus gives the same split
on any machine, adding documents never moves existing ones, and every member of a near-duplicate
cluster lands in the same split, so near copies cannot leak from train into evaluation.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from lmforge.artifacts import fresh_dir, load_dataset_dir, save_dataset, write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.params import LmforgeError, Params, SplitParams
from lmforge.stages import Out, Stage


SPLIT = Stage(
    "split", group="data",
    params=("paths.artifacts", "split"),
    reads=("clean/dataset",),
    outs=("train", "val", "test", Out("params.json", cache=False)),
)


SPLITS = ("train", "val", "test")


def assign(cluster: str, p: SplitParams) -> str:
    """The split of a cluster: its salted hash, as a number in [0, 1), against cumulative ratios."""
    digest = hashlib.sha256(f"{p.seed}\0{cluster}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < p.train:
        return "train"
    return "val" if u < p.train + p.val else "test"


def _assign_batch(batch: dict[str, list], split_params: SplitParams) -> dict[str, list]:
    return {"split": [assign(c, split_params) for c in batch["cluster"]]}


def run_split(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Materialize ``<artifacts>/split``: ``train/``, ``val/``, ``test/`` datasets and ``summary.json``."""
    source = load_dataset_dir(params.stage_dir("clean") / "dataset", "clean")
    if not len(source):
        raise LmforgeError("split: the clean dataset has no documents: nothing to split")
    out = fresh_dir(params.stage_dir("split"))
    labels = source.map(
        _assign_batch,
        batched=True,
        fn_kwargs={"split_params": params.split},
        keep_in_memory=True,  # only the small label column; the texts stay memory-mapped
        remove_columns=source.column_names,
        desc="split: assign",
    )["split"]
    labels = np.asarray(labels, dtype=object)
    sizes = source.data.column("bytes").to_numpy() if len(source) else np.zeros(0, dtype=np.int64)
    summary: dict[str, Any] = {"documents_in": len(source)}
    for name in SPLITS:
        indices = np.flatnonzero(labels == name)
        save_dataset(source.select(indices), out / name)
        summary[name] = len(indices)
        summary[f"{name}_bytes"] = int(sizes[indices].sum())
    write_params(out, params.split)
    write_summary(out, summary)
    ctx.log(f"split: train {summary['train']}, val {summary['val']}, test {summary['test']}")
    for name in SPLITS:
        if summary[name] == 0 and getattr(params.split, name) > 0:
            ctx.log(f"warning: split '{name}' is empty: the corpus is too small for its ratio")
    return summary


def leakage(params: Params) -> dict[str, int]:
    """Pairs of splits that share an identical text: {"train/val": n, ...}; all zero when clean."""
    hashes = {}
    for name in SPLITS:
        ds = load_dataset_dir(params.stage_dir("split") / name, "split")
        hashes[name] = set(ds.data.column("sha256").to_pylist())
    return {
        f"{a}/{b}": len(hashes[a] & hashes[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]
    }
