"""The split: deterministic, ratio-respecting, cluster-preserving, leak-free."""

from collections import Counter
from pathlib import Path

import datasets
from conftest import write_params

from lmforge.clean import run_clean
from lmforge.ingest import run_ingest
from lmforge.params import SplitParams, load_params
from lmforge.split import assign, leakage, run_split


def test_assignment_is_deterministic_and_follows_ratios():
    p = SplitParams(train=0.8, val=0.1, test=0.1)
    labels = [assign(f"doc{i}", p) for i in range(20_000)]
    assert labels == [assign(f"doc{i}", p) for i in range(20_000)]
    counts = Counter(labels)
    assert abs(counts["train"] / 20_000 - 0.8) < 0.01 and abs(counts["val"] / 20_000 - 0.1) < 0.01
    assert [assign(f"doc{i}", SplitParams(seed="other")) for i in range(50)] != labels[:50]


def test_split_stage_accounting_clusters_and_leakage(tmp_path: Path, corpus: Path):
    # a near copy of doc00 in cluster mode must land in the same split as doc00
    (corpus / "copy.txt").write_text((corpus / "doc00.txt").read_text().replace(" the ", " a ", 1))
    params = load_params(
        write_params(tmp_path, corpus, clean={"dedup": {"near": "cluster"}}, split={"train": 0.4, "val": 0.3, "test": 0.3})
    )
    run_ingest(params)
    cleaned = run_clean(params)
    summary = run_split(params)
    assert summary["train"] + summary["val"] + summary["test"] == cleaned["kept"] == summary["documents_in"]
    parts = {name: datasets.load_from_disk(str(params.stage_dir("split") / name)) for name in ("train", "val", "test")}
    assert all(len(parts[n]) == summary[n] for n in parts)
    where = {row["path"]: name for name, ds in parts.items() for row in ds}
    assert where["copy.txt"] == where["doc00.txt"]
    assert leakage(params) == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert run_split(params) == summary  # same input, same split
