"""Clean: ingested documents → normalised, filtered, deduplicated documents (+ quarantine).

Two passes over memory-mapped Arrow data, so memory stays flat in corpus size:
1. in parallel (``datasets.map``): clean each text, apply the quality filters, hash it and compute its
   MinHash signature;
2. in one process: exact and near-duplicate decisions over the whole corpus (the first occurrence
   wins; see ``lmforge.dedup``), then one ordered pass writing kept documents to the output dataset
   and everything else to ``quarantine.jsonl``.

With ``cluster.data_engine: ray`` both passes run on a Ray cluster instead (``lmforge.ray_data``), with
the same per-document code (``_score_batch``, ``route``) and the same rows and quarantine records; the
tasks write the output dataset's shards themselves.

Accounting (checked here and by the tests): ``documents_in == kept + quarantined``.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.artifacts import (
    QUARANTINE,
    QuarantineWriter,
    count_reasons,
    env_num_proc,
    fresh_dir,
    load_dataset_dir,
    save_generated,
    value_counts,
    worker_friendly_signals,
    write_params,
    write_summary,
)
from lmforge.cleaning import make_cleaner, quality
from lmforge.cluster import connected
from lmforge.context import QUIET, RunContext
from lmforge.dedup import (  # the statuses are re-exported: they are part of this module's interface
    EXACT_DUPLICATE,
    KEEP,
    NEAR_DUPLICATE,
    REJECTED,
    band_hashes,
    banding,
    cluster_representatives,
    signature,
    text_sha256,
    verify_near,
)
from lmforge.ingest import features as ingest_features
from lmforge.params import CleanParams, DedupParams, LmforgeError, Params, build
from lmforge.stages import Out, Stage


CLEAN = Stage(
    "clean", group="data",
    params=("paths.artifacts", "clean"),
    reads=("ingest/dataset",),
    outs=("dataset", "quarantine.jsonl", Out("params.json", cache=False)),
    engines=("local", "ray"),
    note="artifacts/clean/data_docs is a report rendered at each run (it holds timestamps), not an output",
)


PASSTHROUGH = ("id", "source", "path", "record", "format", "file_sha256")


def features():
    """The ingest columns, plus the near-duplicate cluster of each document."""
    import datasets

    f = ingest_features()
    # id of the first document of this one's near-duplicate cluster (its own id if alone); the
    # split stage keeps a cluster in one split so near copies cannot leak across splits
    f["cluster"] = datasets.Value("string")
    return f


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
    zeros = [0] * p.dedup.num_perm
    for raw in batch["text"]:
        text = clean(raw)
        rejected = quality(text, p.filters)
        out["text"].append(text)
        out["bytes"].append(len(text.encode("utf-8", "surrogatepass")))
        out["sha256"].append(text_sha256(text))
        out["reject_reason"].append(rejected[0] if rejected else None)
        out["reject_detail"].append(rejected[1] if rejected else None)
        if p.dedup.near == "off":
            out["signature"].append([])
        else:  # rejected documents get a placeholder so that every signature has num_perm values
            out["signature"].append(zeros if rejected else signature(text, p.dedup).tolist())
    return out


def plan_dedup(table, p: DedupParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decide every document's fate from the scored Arrow table, reading it in record batches.

    Returns (status, representative index, estimated Jaccard with it).  The state held is a few
    numbers per document (see ``lmforge.dedup``), never the texts.
    """
    import pyarrow.compute as pc

    n = table.num_rows
    status = np.zeros(n, dtype=np.int8)
    rep = np.arange(n, dtype=np.int64)
    jaccard = np.full(n, np.nan, dtype=np.float32)
    near = p.near != "off"
    n_bands, rows = banding(p.threshold, p.num_perm) if near else (0, 0)
    bands = np.zeros((n, n_bands), dtype=np.uint64)
    seen: dict[bytes, int] = {}  # 128-bit sha256 prefix → first document with that text
    columns = ["reject_reason", "sha256"] + (["signature"] if near else [])
    start = 0
    for batch in table.select(columns).to_batches(max_chunksize=4096):
        for k, (reason, sha) in enumerate(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())):
            i = start + k
            if reason is not None:
                status[i] = REJECTED
            elif p.exact and (first := seen.setdefault(bytes.fromhex(sha[:32]), i)) != i:
                status[i], rep[i] = EXACT_DUPLICATE, first
        if near:
            signatures = batch.column(2).flatten().to_numpy().reshape(-1, p.num_perm)
            bands[start : start + len(batch)] = band_hashes(signatures, n_bands, rows)
        start += len(batch)
    if near:
        eligible = np.flatnonzero(status == KEEP)
        first = eligible[cluster_representatives(bands[eligible])]
        members, leaders = eligible[first != eligible], first[first != eligible]
        rep[members] = leaders
        sig = table.column("signature")

        def gather(index: np.ndarray) -> np.ndarray:
            return pc.take(sig, index).combine_chunks().flatten().to_numpy().reshape(-1, p.num_perm)

        jaccard[members], duplicate = verify_near(gather(members), gather(leaders), p)
        status[members[duplicate]] = NEAR_DUPLICATE
    return status, rep, jaccard


def route(row: dict, status: int, first: str, jaccard: float, quarantine: QuarantineWriter) -> dict | None:
    """Act on one scored document's fate: write it to the quarantine (``None``) or return its output
    row.  ``first`` is the id of the document it duplicates or clusters with (its own id if none).
    Both engines call this, in corpus order, so that their outputs are the same bytes."""
    where = {"source": row["source"], "path": row["path"], "record": row["record"], "id": row["id"]}
    if status == REJECTED:
        quarantine.write(**where, reason=row["reject_reason"], detail=row["reject_detail"], text=row["text"])
    elif status == EXACT_DUPLICATE:
        quarantine.write(**where, reason="exact_duplicate", detail=f"same text as document {first}", text=row["text"])
    elif status == NEAR_DUPLICATE:
        detail = f"near duplicate of document {first} (estimated Jaccard {jaccard:.2f})"
        quarantine.write(**where, reason="near_duplicate", detail=detail, text=row["text"])
    else:
        return {**{key: row[key] for key in PASSTHROUGH}, "text": row["text"], "bytes": row["bytes"], "sha256": row["sha256"], "cluster": first}
    return None


def _write(scored_dir: str, params_blob: dict, quarantine_path: str):
    """Pass 2, sequential: decide, then yield kept rows and write rejected ones to the quarantine."""
    import datasets

    p: CleanParams = build(CleanParams, params_blob, "clean")
    scored = datasets.load_from_disk(scored_dir)
    status, rep, jaccard = plan_dedup(scored.data, p.dedup)
    ids = scored.data.column("id")
    rows = scored.remove_columns("signature")
    i = 0
    with QuarantineWriter(Path(quarantine_path)) as quarantine:
        for batch in rows.iter(batch_size=1000):
            for k in range(len(batch["id"])):
                row = {key: batch[key][k] for key in batch}
                # the representative's id: looked up in the Arrow column only for duplicates
                first = row["id"] if rep[i] == i else ids[int(rep[i])].as_py()
                kept = route(row, status[i], first, jaccard[i], quarantine)
                if kept is not None:
                    yield kept
                i += 1


def run_clean(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Materialize ``<artifacts>/clean``: ``dataset/``, ``quarantine.jsonl``, ``summary.json``.

    ``ctx.log`` hears where the work ran on the Ray engine."""
    make_cleaner(params.clean)  # fail fast on a config error, before any work
    source = load_dataset_dir(params.stage_dir("ingest") / "dataset", "ingest")
    if not len(source):
        raise LmforgeError("clean: the ingest dataset has no documents: materialize 'ingest' over a corpus first")
    out = fresh_dir(params.stage_dir("clean"))
    if CLEAN.engine(params.cluster.data_engine) == "ray":
        from lmforge import ray_data

        with connected(params.cluster, ctx.log):
            ray_data.clean_shards(
                params.stage_dir("ingest") / "dataset", _score_batch, {"params_blob": asdict(params.clean)},
                _scored_features().arrow_schema, params.clean.dedup, route, features(), out / "dataset", out / QUARANTINE, ctx.log,
            )
        kept = load_dataset_dir(out / "dataset", "clean")
    else:
        kept = _clean_local(params, source, out)
    summary = _summarize(params, source, kept, out)
    ctx.log(f"clean: kept {summary['kept']} of {summary['documents_in']} ({summary['by_reason']})")
    return summary  # kept none: the blocking check clean/min_rows stops the run, and split refuses it


def _clean_local(params: Params, source, out: Path):
    """Both passes on this machine: ``datasets.map`` worker processes, then one ordered pass."""
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
        _write,
        {"scored_dir": str(work / "scored"), "params_blob": blob, "quarantine_path": str(out / QUARANTINE)},
        features(),
        out / "dataset",
    )
    shutil.rmtree(work)
    return kept


def _summarize(params: Params, source, kept, out: Path) -> dict[str, Any]:
    """``summary.json`` and ``params.json`` from the outputs, the same for both engines."""
    by_reason = count_reasons(out / QUARANTINE)
    n_kept = len(kept)
    if len(source) != n_kept + sum(by_reason.values()):
        raise LmforgeError(
            f"clean: accounting broken: {len(source)} documents in, {n_kept} kept + {sum(by_reason.values())} quarantined"
        )
    clusters = value_counts(kept, "cluster") if params.clean.dedup.near == "cluster" else {}
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
