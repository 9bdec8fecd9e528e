"""Clean: ingested documents → normalised, filtered, deduplicated documents (+ quarantine).

Two passes over memory-mapped Arrow data, so memory stays flat in corpus size:
1. in parallel (``datasets.map``): clean each text, apply the quality filters, hash it and compute its
   MinHash signature;
2. in order, in one process: exact and near-duplicate decisions (the first occurrence wins), writing
   kept documents to the output dataset and everything else to ``quarantine.jsonl``.

Accounting (checked by the tests): ``documents_in == kept + quarantined``.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmforge.artifacts import (
    QUARANTINE,
    QuarantineWriter,
    count_reasons,
    env_num_proc,
    fresh_dir,
    load_dataset_dir,
    save_generated,
    worker_friendly_signals,
    write_params,
    write_summary,
)
from lmforge.cleaning import make_cleaner, quality
from lmforge.dedup import Deduplicator, signature, text_sha256
from lmforge.params import CleanParams, Params, build

PASSTHROUGH = ("id", "source", "path", "record", "format", "file_sha256")


def features():
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "path": datasets.Value("string"),
            "record": datasets.Value("int64"),
            "format": datasets.Value("string"),
            "file_sha256": datasets.Value("string"),
            "text": datasets.Value("large_string"),
            "bytes": datasets.Value("int64"),
            "sha256": datasets.Value("string"),
            # id of the first document of this one's near-duplicate cluster (its own id if alone);
            # the split stage keeps a cluster in one split so near copies cannot leak across splits
            "cluster": datasets.Value("string"),
        }
    )


def _scored_features():
    import datasets

    f = features()
    del f["cluster"]
    f["reject_reason"] = datasets.Value("string")
    f["reject_detail"] = datasets.Value("string")
    f["signature"] = datasets.Sequence(datasets.Value("uint32"))
    return f


def _score_batch(batch: dict[str, list], params_blob: dict) -> dict[str, list]:
    """Pass 1, per batch in a worker: clean, filter, hash, sign."""
    p: CleanParams = build(CleanParams, params_blob, "clean")
    clean = make_cleaner(p)
    out: dict[str, list] = {k: batch[k] for k in PASSTHROUGH}
    out.update(text=[], bytes=[], sha256=[], reject_reason=[], reject_detail=[], signature=[])
    for raw in batch["text"]:
        text = clean(raw)
        rejected = quality(text, p.filters)
        out["text"].append(text)
        out["bytes"].append(len(text.encode("utf-8", "surrogatepass")))
        out["sha256"].append(text_sha256(text))
        out["reject_reason"].append(rejected[0] if rejected else None)
        out["reject_detail"].append(rejected[1] if rejected else None)
        near = rejected is None and p.dedup.near != "off"
        out["signature"].append(signature(text, p.dedup).tolist() if near else [])
    return out


def _decide(scored_dir: str, params_blob: dict, quarantine_path: str):
    """Pass 2, sequential: yield kept rows; write rejected ones to the quarantine."""
    import datasets

    p: CleanParams = build(CleanParams, params_blob, "clean")
    dedup = Deduplicator(p.dedup)
    scored = datasets.load_from_disk(scored_dir)
    with QuarantineWriter(Path(quarantine_path)) as quarantine:
        for batch in scored.iter(batch_size=1000):
            for i in range(len(batch["id"])):
                row = {k: batch[k][i] for k in batch}
                where = {"source": row["source"], "path": row["path"], "record": row["record"], "id": row["id"]}
                if row["reject_reason"]:
                    quarantine.write(**where, reason=row["reject_reason"], detail=row["reject_detail"], text=row["text"])
                    continue
                first = dedup.exact_duplicate_of(row["id"], row["sha256"])
                if first is not None:
                    quarantine.write(**where, reason="exact_duplicate", detail=f"same text as document {first}", text=row["text"])
                    continue
                cluster = row["id"]
                near = dedup.near_cluster(row["id"], row["signature"]) if row["signature"] else None
                if near is not None:
                    if p.dedup.near == "remove":
                        detail = f"near duplicate of document {near[0]} (estimated Jaccard {near[1]:.2f})"
                        quarantine.write(**where, reason="near_duplicate", detail=detail, text=row["text"])
                        continue
                    cluster = near[0]
                yield {**{k: row[k] for k in PASSTHROUGH}, "text": row["text"], "bytes": row["bytes"], "sha256": row["sha256"], "cluster": cluster}


def run_clean(params: Params) -> dict[str, Any]:
    """Materialize ``<artifacts>/clean``: ``dataset/``, ``quarantine.jsonl``, ``summary.json``."""
    make_cleaner(params.clean)  # fail fast on a config error, before any work
    source = load_dataset_dir(params.stage_dir("ingest") / "dataset", "ingest")
    out = fresh_dir(params.stage_dir("clean"))
    work = out / ".work"
    blob = asdict(params.clean)
    num_proc = env_num_proc(params.clean.num_proc)
    with worker_friendly_signals():
        scored = source.map(
            _score_batch,
            batched=True,
            batch_size=64,
            fn_kwargs={"params_blob": blob},
            remove_columns=source.column_names,
            features=_scored_features(),
            num_proc=num_proc if len(source) >= 2 * num_proc else None,
            cache_file_name=str(work / "scored.arrow"),
            load_from_cache_file=False,
            desc="clean: normalise, filter, sign",
        )
    scored.save_to_disk(str(work / "scored"))
    del scored
    kept = save_generated(
        _decide,
        {"scored_dir": str(work / "scored"), "params_blob": blob, "quarantine_path": str(out / QUARANTINE)},
        features(),
        out / "dataset",
    )
    shutil.rmtree(work)
    by_reason = count_reasons(out / QUARANTINE)
    n_kept = len(kept)
    clusters = _cluster_sizes(kept) if params.clean.dedup.near == "cluster" else {}
    summary = {
        "documents_in": len(source),
        "kept": n_kept,
        "quarantined": sum(by_reason.values()),
        "by_reason": dict(sorted(by_reason.items())),
        "bytes_in": int(source.data.column("bytes").to_numpy().sum()) if len(source) else 0,
        "bytes_out": int(kept.data.column("bytes").to_numpy().sum()) if n_kept else 0,
        "near_duplicate_clusters": sum(1 for size in clusters.values() if size > 1),
        "rejection_ratio": round(1 - n_kept / len(source), 6) if len(source) else 0.0,
    }
    write_params(out, params.clean)
    write_summary(out, summary)
    return summary


def _cluster_sizes(ds) -> dict[str, int]:
    import pyarrow.compute as pc

    if len(ds) == 0:
        return {}
    return {c["values"]: c["counts"] for c in pc.value_counts(ds.data.column("cluster")).to_pylist()}
