"""The clean stage: accounting, quarantine reasons, exact and near deduplication."""

import json
from pathlib import Path

import datasets
import numpy as np
from conftest import prose, write_params

from lmforge.clean import EXACT_DUPLICATE, KEEP, NEAR_DUPLICATE, REJECTED, plan_dedup, run_clean
from lmforge.dedup import cluster_representatives, shingle_hashes, signature, text_sha256
from lmforge.ingest import run_ingest
from lmforge.params import DedupParams, load_params


def build(tmp_path: Path, raw: Path, **sections):
    params = load_params(write_params(tmp_path, raw, **sections))
    run_ingest(params)
    summary = run_clean(params)
    out = params.stage_dir("clean")
    ds = datasets.load_from_disk(str(out / "dataset"))
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    return summary, ds, quarantine


def near_copy(text: str) -> str:
    words = text.split()
    words[len(words) // 2] = "changed"  # one word of sixty: Jaccard of 5-gram shingles ≈ 0.85
    return " ".join(words)


def dup_corpus(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    base = prose(1, 120)
    (raw / "a.txt").write_text(base)
    (raw / "b.txt").write_text(base)  # exact copy
    (raw / "c.md").write_text(f"<p>{base}</p>")  # same text once markup is gone
    (raw / "d.txt").write_text(near_copy(base))
    (raw / "e.txt").write_text("short")
    (raw / "f.txt").write_text("&lt;div&gt; x " + "#a " * 30)
    for i in range(5):
        (raw / f"z{i}.txt").write_text(prose(10 + i, 120))
    return raw


def test_accounting_and_reasons(tmp_path: Path):
    summary, ds, quarantine = build(tmp_path, dup_corpus(tmp_path))
    assert summary["documents_in"] == 11
    assert summary["kept"] + summary["quarantined"] == summary["documents_in"]
    assert summary["kept"] == len(ds) == 6 and len(quarantine) == 5
    by_path = {q["path"]: q for q in quarantine}
    assert by_path["b.txt"]["reason"] == "exact_duplicate" and by_path["c.md"]["reason"] == "exact_duplicate"
    assert by_path["d.txt"]["reason"] == "near_duplicate" and "estimated Jaccard" in by_path["d.txt"]["detail"]
    assert by_path["e.txt"]["reason"] == "too_few_words"
    assert by_path["f.txt"]["reason"] in {"symbol_ratio", "mean_word_length", "repeated_lines", "too_few_alpha_words"}
    assert summary["by_reason"]["exact_duplicate"] == 2
    assert all(q["text"] is not None and q["id"] for q in quarantine)
    assert len(set(ds["sha256"])) == len(ds)
    assert ds["cluster"] == ds["id"]


def test_cluster_mode_keeps_near_duplicates_in_one_cluster(tmp_path: Path):
    summary, ds, _ = build(tmp_path, dup_corpus(tmp_path), clean={"dedup": {"near": "cluster"}})
    rows = {r["path"]: r for r in ds}
    assert rows["d.txt"]["cluster"] == rows["a.txt"]["id"] != rows["d.txt"]["id"]
    assert summary["near_duplicate_clusters"] == 1 and "near_duplicate" not in summary["by_reason"]


def test_near_dedup_off_and_exact_off(tmp_path: Path):
    summary, _, _ = build(tmp_path, dup_corpus(tmp_path), clean={"dedup": {"near": "off", "exact": False}})
    assert "near_duplicate" not in summary["by_reason"] and "exact_duplicate" not in summary["by_reason"]
    assert summary["kept"] == 9


def test_parallel_cleaning_matches_serial(tmp_path: Path):
    raw = dup_corpus(tmp_path)
    one = build(tmp_path / "one", raw, clean={"num_proc": 1})
    two = build(tmp_path / "two", raw, clean={"num_proc": 2})
    assert one[1]["id"] == two[1]["id"] and one[0] == two[0]


def test_minhash_estimates_jaccard():
    p = DedupParams(num_perm=128)
    a = prose(1, 200)
    b = near_copy(a)
    true = len(set(shingle_hashes(a, 5)) & set(shingle_hashes(b, 5))) / len(set(shingle_hashes(a, 5)) | set(shingle_hashes(b, 5)))
    est = float(np.mean(signature(a, p) == signature(b, p)))
    assert abs(est - true) < 0.1
    unrelated = float(np.mean(signature(a, p) == signature(prose(2, 200), p)))
    assert unrelated < 0.3


def test_clusters_link_shared_bands_transitively_and_the_first_row_leads():
    bands = np.array([[1, 10], [2, 20], [1, 30], [3, 30], [4, 40]], dtype=np.uint64)
    # rows 0 and 2 share band 0; rows 2 and 3 share band 1: one cluster {0, 2, 3} led by row 0
    assert cluster_representatives(bands).tolist() == [0, 1, 0, 0, 4]
    assert cluster_representatives(np.zeros((0, 3), dtype=np.uint64)).tolist() == []


def test_plan_first_occurrence_wins_and_verifies_similarity():
    import pyarrow as pa

    p = DedupParams()
    base, other = prose(3, 100), prose(4, 100)
    texts = [base, base, near_copy(base), other, "rejected"]
    sigs = [signature(t, p).tolist() for t in texts[:4]] + [[0] * p.num_perm]
    table = pa.table({
        "reject_reason": [None, None, None, None, "too_few_words"],
        "sha256": [text_sha256(t) for t in texts],
        "signature": sigs,
    })
    status, rep, jaccard = plan_dedup(table, p)
    assert status.tolist() == [KEEP, EXACT_DUPLICATE, NEAR_DUPLICATE, KEEP, REJECTED]
    assert rep.tolist() == [0, 0, 0, 3, 4]
    assert 0.8 <= jaccard[2] < 1.0 and np.isnan(jaccard[0])
    status, rep, _ = plan_dedup(table, DedupParams(near="cluster"))
    assert status.tolist() == [KEEP, EXACT_DUPLICATE, KEEP, KEEP, REJECTED] and rep[2] == 0
