"""Ingest, clean, packed and the tokenizer's sample on Ray Data (``cluster.data_engine: ray``): the
local engine's output, computed on a Ray cluster.

Why it is built this way:

- **One code path for the per-document work.**  The stages pass their own functions in (ingest's
  per-file reader, clean's ``_score_batch``); this module only distributes them.  It imports neither
  stage: the stages import the engine, never the reverse, so the import graph stays a tree.
- **A corpus position on every row.**  Ingest rows come out in the order of the work items, clean rows
  carry ``row``, their index in the ingest dataset.  "The first occurrence wins" and the output order
  then never depend on which worker finished first, so the output equals the local engine's.
- **Shuffles by key for the decisions.**  Exact duplicates meet in a shuffle by text hash, near
  duplicate candidates in a shuffle by band hash; only colliding documents produce output (pairs),
  and the connected components are computed over those pairs alone.  The shuffles group rows by a
  partition number taken from the hash (one group per CPU), with Ray Data's sort-based shuffle:
  plain tasks on the workers already running, so a stage pays Ray's start-up once, not per shuffle.  No process holds an
  array over the whole corpus; the driver holds the colliding pairs and the cluster members.
- **Output written by the tasks.**  Each task routes its block (ingest: a block of files; clean: a
  block of scored documents, once the decisions, one per duplicate, are known: tasks write them in
  one file per chunk of the corpus, and each block's task reads its own) through the stage's own
  ``route`` and writes the block's shard of the dataset and its part of the quarantine, named by
  the block's first position.  The driver checks that the blocks cover every position once, writes
  only the dataset's manifest and sizes the quarantine, into which tasks copy the parts at their
  offsets: no document passes through it.  The
  rows and records are the local engine's, in corpus order, over several shards.
- **Token parts written by the tasks.**  Packing has no decision to wait for: each task tokenizes a
  row range of a split and writes its own part of the token file; the driver sizes the file from
  the parts' token counts, and tasks copy the parts in at their offsets: the local engine's bytes.  The tokenizer's training sample
  is drawn the same way: each task sends only its candidates for the sample to the driver.

Files are read where the tasks run: every node must see the source directories and the artifacts
directory at the same paths (a shared filesystem), as it must for the local engine's inputs.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.dedup import (
    EXACT_DUPLICATE,
    KEEP,
    NEAR_DUPLICATE,
    REJECTED,
    band_hashes,
    banding,
    bucket_links,
    component_firsts,
    verify_near,
)
from lmforge.params import DedupParams, LmforgeError

# The folder beside a stage's output where its tasks write their shards and quarantine parts.
SCRATCH = ".ray-parts"
# Documents scored per call of the stage's batch function (the local engine uses 64).
SCORE_ROWS = 64
# Documents tokenized per call of the tokenizer (the local engine uses 256).
TOKENIZE_ROWS = 256
# Most rows of a dataset one clean or packing task reads; fewer when that gives each CPU four tasks, so
# that a small corpus is still spread over the cluster.
CHUNK_ROWS = 4096


@contextlib.contextmanager
def _data_context() -> Iterator[Any]:
    """Ray Data settings this engine relies on, for the datasets created inside the block (each
    dataset copies the context when it is created); the caller's settings are restored afterwards.

    ``preserve_order``: blocks come out in input order, which the ordered output needs.
    ``shuffle_strategy``: the sort-based shuffle runs as plain Ray tasks on the workers already up, so
    a stage pays Ray's start-up once.  Ray's hash shuffles start aggregator actors, new worker
    processes, for every shuffle: ~7 s each on a 2-core machine, four of them per clean.
    """
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.shuffle_strategy
    ctx.execution_options.preserve_order = True
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy = saved


def _cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _nodes_used(ds) -> int | None:
    """Nodes the tasks of ``ds``'s last execution ran on, from Ray Data's own statistics."""
    counts = [int(n) for n in re.findall(r"(\d+) nodes used", ds.stats())]
    return max(counts) if counts else None


def _say(report: Callable[[str], None] | None, message: str, ds=None) -> None:
    if report is None:
        return
    nodes = _nodes_used(ds) if ds is not None else None
    report(message + (f" on {nodes} node(s)" if nodes else ""))


# --------------------------------------------------------------------------------------------------
# Ingest: work items → rows, in the order of the items
# --------------------------------------------------------------------------------------------------


def _write_items(batch, fn: Callable, fn_kwargs: dict, route: Callable, features, scratch: str) -> Iterator[Any]:
    """A Ray task: the work items of one block → ``fn``'s rows, in the items' order, through the stage's
    own ``route`` into the block's shard of the dataset and its part of the quarantine, named by the
    position of its first item in the whole work list."""
    positions = batch.column("item").to_pylist()
    if not positions:
        return
    work = [pickle.loads(blob) for blob in batch.column("work").to_pylist()]

    def routed(quarantine):
        for output in fn(work, **fn_kwargs):
            yield route(output, quarantine)

    yield _write_part(positions[0], positions[-1], routed, features, scratch)


def flat_map_shards(
    work: list, fn: Callable[..., Iterator[Any]], fn_kwargs: dict, route: Callable, features,
    dataset_out: Path, quarantine_out: Path, stage: str, report=None,
) -> None:
    """The outputs of ``fn(items, **fn_kwargs)`` over contiguous blocks of ``work``, in Ray tasks across
    the cluster, each routed by ``route(output, quarantine)`` (a dataset row, or ``None`` once
    quarantined).
    Each task writes its block's shard of the dataset at ``dataset_out`` and its part of the quarantine
    at ``quarantine_out``; their concatenation in the order of ``work`` is what one process would write.

    Items travel pickled (an ingest item holds its source's settings); blocks of several items let a
    task set up once, and four blocks per CPU keep the cluster busy when files differ in size.
    """
    import ray

    scratch = _scratch(dataset_out)
    with _data_context():
        blocks = min(len(work), 4 * _cpus())
        items = ray.data.from_items(
            [{"item": i, "work": pickle.dumps(w)} for i, w in enumerate(work)], override_num_blocks=max(1, blocks)
        )
        written = items.map_batches(
            _write_items,
            batch_size=None,  # a whole block: its items, in order
            batch_format="pyarrow",
            fn_kwargs={"fn": fn, "fn_kwargs": fn_kwargs, "route": route, "features": features, "scratch": str(scratch)},
        ).materialize()
        _say(report, f"ray: {stage} read {len(work)} items", written)
    _save_parts(written, len(work), f"{stage} (ray): the written blocks of items", features, dataset_out, quarantine_out)


# --------------------------------------------------------------------------------------------------
# Output written by the tasks: one shard and one quarantine part per block, then a manifest
# --------------------------------------------------------------------------------------------------


def _scratch(dataset_out: Path) -> Path:
    """Where the tasks write their parts: beside the output, on the filesystem every node sees."""
    scratch = dataset_out.parent / SCRATCH
    scratch.mkdir()
    return scratch


def _write_part(first: int, last: int, routed: Callable, features, scratch: str):
    """One block's shard of the dataset and part of the quarantine, named by its first position
    (``routed(quarantine)`` yields each output row, or ``None`` for a quarantined one); returns what
    the driver needs to assemble them.  A retried task writes both again from the start, so nothing is
    doubled."""
    import pyarrow as pa

    from lmforge.artifacts import QuarantineWriter, write_shard

    shard, part = Path(scratch) / f"shard-{first:012d}.arrow", Path(scratch) / f"quarantine-{first:012d}.jsonl"
    with QuarantineWriter(part) as quarantine:
        written = write_shard((row for row in routed(quarantine) if row is not None), features, shard)
    return pa.table({"first": [first], "last": [last], "shard": [str(shard)], "quarantine": [str(part)],
                     "rows": [written["rows"]], "bytes": [written["bytes"]], "sha256": [written["sha256"]]})


def _copy_part_in(batch, out: str) -> Iterator[Any]:
    """A Ray task: copy parts into ``out``, each at its offset.  The file has its final length already
    and the parts' ranges are disjoint, so the tasks need no order and no lock, and a retried task
    writes the same bytes again."""
    import pyarrow as pa

    with open(out, "r+b") as fh:
        for row in batch.to_pylist():
            fh.seek(row["offset"])
            with open(row["part"], "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 24)
    yield pa.table({"copied": [batch.num_rows]})


def _copy_in(parts: list[Path], out: Path) -> None:
    """Write ``parts`` into ``out`` back to back from its start, by Ray tasks, each part at its offset
    (the sizes of the parts before it): the concatenation without a copy through the driver.  ``out``
    exists and holds at least their total length."""
    import ray

    sizes = [part.stat().st_size for part in parts]
    offsets = np.cumsum([0, *sizes[:-1]])
    placed = [{"part": str(part), "offset": int(offset)} for part, offset, size in zip(parts, offsets, sizes) if size]
    if placed:
        ray.data.from_items(placed, override_num_blocks=min(len(placed), 4 * _cpus())).map_batches(
            _copy_part_in, batch_size=None, batch_format="pyarrow", fn_kwargs={"out": str(out)}).materialize()


def _save_parts(written, total: int, what: str, features, dataset_out: Path, quarantine_out: Path) -> None:
    """On the driver: check that the blocks cover positions ``0 .. total-1`` once each, then write the
    dataset's manifest over the shards; tasks copy the quarantine parts into the quarantine, in order."""
    from lmforge.artifacts import save_shards

    parts = sorted((b for t in written.iter_batches(batch_format="pyarrow", batch_size=None) for b in t.to_pylist()),
                   key=lambda b: b["first"])
    expected = 0
    for b in parts:
        if b["first"] != expected:
            raise LmforgeError(f"{what} do not cover the {total} positions once each (at position {expected})")
        expected = b["last"] + 1
    if expected != total:
        raise LmforgeError(f"{what} do not cover the {total} positions once each (they end at {expected})")
    save_shards([(Path(b["shard"]), b) for b in parts], features, dataset_out)
    quarantined = [Path(b["quarantine"]) for b in parts]
    with open(quarantine_out, "wb") as fh:
        fh.truncate(sum(part.stat().st_size for part in quarantined))
    _copy_in(quarantined, quarantine_out)
    shutil.rmtree(dataset_out.parent / SCRATCH)


# --------------------------------------------------------------------------------------------------
# Clean: score in parallel, decide by shuffles, stream the outcome in corpus order
# --------------------------------------------------------------------------------------------------

# One decision per duplicate (never per document): its corpus position, status, the id it
# duplicates or clusters with, and the estimated Jaccard (near duplicates only).
def _decision_schema():
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("status", pa.int8()), ("first_id", pa.string()), ("jaccard", pa.float32())])


def _chunks(dataset_dir: Path, cpus: int) -> list[dict]:
    """Row ranges of a dataset's Arrow files (ingest's for clean, a split's for packed), with the
    corpus position of their first row.

    The driver opens each file memory-mapped to count its rows; the texts are read by the tasks.
    """
    import pyarrow as pa

    files = [dataset_dir / f["filename"] for f in json.loads((dataset_dir / "state.json").read_text())["_data_files"]]
    sizes = []
    for path in files:
        with pa.memory_map(str(path)) as source:
            sizes.append(pa.ipc.open_stream(source).read_all().num_rows)
    step = max(1, min(CHUNK_ROWS, math.ceil(sum(sizes) / (4 * cpus))))
    chunks, offset = [], 0
    for path, size in zip(files, sizes):
        for start in range(0, size, step):
            stop = min(size, start + step)
            chunks.append({"path": str(path), "start": start, "stop": stop, "row": offset + start})
        offset += size
    return chunks


def _score_chunks(batch, score: Callable, score_kwargs: dict, schema) -> Iterator[Any]:
    """A Ray task: read row ranges of the ingest dataset (memory-mapped) and score them with the
    clean stage's own batch function; each output row gets its corpus position ``row``."""
    import pyarrow as pa

    scored_schema = pa.schema([f for f in schema if f.name != "row"])
    for chunk in batch.to_pylist():
        with pa.memory_map(chunk["path"]) as source:
            table = pa.ipc.open_stream(source).read_all().slice(chunk["start"], chunk["stop"] - chunk["start"])
            position = chunk["row"]
            for part in table.to_batches(max_chunksize=SCORE_ROWS):
                out = pa.Table.from_pydict(score(part.to_pydict(), **score_kwargs), schema=scored_schema)
                rows = pa.array(np.arange(position, position + part.num_rows, dtype=np.int64))
                yield out.add_column(0, "row", rows)
                position += part.num_rows


def _live(batch, near: bool, parts: int):
    """Documents the filters kept, with what the decisions need: position, id, the 128-bit text key
    (the local engine's key) and, for near dedup, the signature."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = batch.filter(pc.is_null(batch["reject_reason"]))
    text_key = pc.utf8_slice_codeunits(kept["sha256"], 0, 32)
    columns = {"row": kept["row"], "id": kept["id"], "text_key": text_key, "part": _part(text_key, parts)}
    if near:
        columns["signature"] = kept["signature"]
    return pa.table(columns)


def _part(text_key, parts: int) -> np.ndarray:
    """The shuffle partition of each text key: its first 60 bits modulo ``parts`` (the key is a hash)."""
    return np.array([int(k[:15], 16) % parts for k in text_key.to_pylist()], dtype=np.int32)


def _first_of_each_text(block):
    """One partition of the shuffle by text key: all copies of a text are here.  The first in corpus
    order keeps ``first_id`` null; every other copy gets the first one's id."""
    import pyarrow as pa

    table = block.drop_columns(["part"]).sort_by("row")
    keys = table["text_key"].to_numpy(zero_copy_only=False).astype(str)
    member, first = bucket_links(keys)
    ids = table["id"].to_numpy(zero_copy_only=False)
    first_id = np.full(table.num_rows, None, dtype=object)
    first_id[member] = ids[first]
    return table.drop_columns(["text_key"]).append_column("first_id", pa.array(first_id, pa.string()))


def _exact_decisions(batch):
    import pyarrow as pa
    import pyarrow.compute as pc

    dup = batch.filter(pc.is_valid(batch["first_id"]))
    n = dup.num_rows
    return pa.table(
        [dup["row"], pa.array(np.full(n, EXACT_DUPLICATE, dtype=np.int8)), dup["first_id"], pa.nulls(n, pa.float32())],
        schema=_decision_schema(),
    )


def _firsts(batch):
    import pyarrow.compute as pc

    return batch.filter(pc.is_null(batch["first_id"])).drop_columns(["first_id"])


def _band_keys(batch, num_perm: int, bands: int, rows: int, parts: int):
    """Explode each eligible document into one (band, band hash, row) per band."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    signatures = pc.list_flatten(batch["signature"]).to_numpy().reshape(n, num_perm)
    hashes = band_hashes(signatures, bands, rows)  # (n, bands), row-major: document by document
    band = np.tile(np.arange(bands, dtype=np.uint64), n)
    return pa.table({
        "band": band.astype(np.int32),
        "hash": hashes.ravel(),
        "row": np.repeat(batch["row"].to_numpy(), bands),
        "part": ((hashes.ravel() + band) % np.uint64(parts)).astype(np.int32),  # a bucket (band, hash) is in one part
    })


def _colliding_pairs(block):
    """One partition of the shuffle by (band, band hash): every bucket is wholly here.  Emits only
    collisions: each bucket's other rows paired with its first row (corpus order)."""
    import pyarrow as pa

    band, hashes, rows = (block[c].to_numpy() for c in ("band", "hash", "row"))  # "part": one value here
    order = np.argsort(rows, kind="stable")
    band, hashes, rows = band[order], hashes[order], rows[order]
    src, dst = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for b in np.unique(band):
        index = np.flatnonzero(band == b)
        member, first = bucket_links(hashes[index])
        src.append(rows[index[member]])
        dst.append(rows[index[first]])
    pairs = np.unique(np.stack([np.concatenate(src), np.concatenate(dst)], axis=1), axis=0)  # once, not once per band
    return pa.table({"row": pairs[:, 0], "first": pairs[:, 1]})


def clusters_from_pairs(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(member rows, their representative rows, by member) from colliding pairs of rows.

    Connected components (scipy) over the documents that appear in a pair, numbered compactly: the
    state is as large as the near-duplicate candidates, not the corpus.  The representative of a
    component is its first row, as in ``lmforge.dedup.cluster_representatives``.
    """
    if not len(src):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    nodes, index = np.unique(np.concatenate([src, dst]), return_inverse=True)
    first = nodes[component_firsts(index[: len(src)], index[len(src) :], len(nodes))]
    member = first != nodes
    return nodes[member], first[member]


def _clusters(pairs) -> tuple[np.ndarray, np.ndarray]:
    """``clusters_from_pairs`` over the pairs dataset, collected on the driver."""
    src, dst = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for batch in pairs.iter_batches(batch_format="numpy", batch_size=None):
        src.append(batch["row"])
        dst.append(batch["first"])
    return clusters_from_pairs(np.concatenate(src), np.concatenate(dst))


def _tag_clusters(batch, members: np.ndarray, leaders: np.ndarray, parts: int):
    """Keep the documents of a near-duplicate cluster, each tagged with its representative and the
    shuffle partition of that representative (a join on the row position with the cluster table,
    which is small enough to travel with the task)."""
    import pyarrow as pa

    rows = batch["row"].to_numpy()
    at = np.minimum(np.searchsorted(members, rows), len(members) - 1)
    is_member = members[at] == rows
    heads = np.unique(leaders)
    is_head = heads[np.minimum(np.searchsorted(heads, rows), len(heads) - 1)] == rows
    keep = is_member | is_head
    leader = np.where(is_member, leaders[at], rows)[keep]
    return (batch.select(["row", "id", "signature"]).filter(pa.array(keep))
            .append_column("leader", pa.array(leader)).append_column("part", pa.array((leader % parts).astype(np.int32))))


def _verify_clusters(block, p: DedupParams):
    """One partition of the shuffle by representative: whole near-duplicate clusters.  Each member's
    estimated Jaccard with its cluster's representative, and its fate; vectorised over the partition,
    as the exact step is, rather than a Python call per cluster."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows, leader = block["row"].to_numpy(), block["leader"].to_numpy()
    signatures = pc.list_flatten(block["signature"]).to_numpy().reshape(block.num_rows, p.num_perm)
    heads = np.flatnonzero(rows == leader)
    heads = heads[np.argsort(rows[heads])]
    members = np.flatnonzero(rows != leader)
    head = heads[np.searchsorted(rows[heads], leader[members])]  # each member's representative, by index
    jaccard, duplicate = verify_near(signatures[members], signatures[head], p)
    first_id = block["id"].take(pa.array(head))
    status = np.where(duplicate, NEAR_DUPLICATE, KEEP).astype(np.int8)
    return pa.table([pa.array(rows[members]), pa.array(status), first_id, pa.array(jaccard)], schema=_decision_schema())


def _decisions(scored, p: DedupParams, cpus: int, report):
    """The duplicates, as a dataset of decisions in no order (``None`` when dedup is off).

    Exactly ``lmforge.clean.plan_dedup``: rejected documents take no part; exact duplicates (same
    128-bit text key, the first in corpus order wins) leave before near dedup; near duplicates are
    the members of connected components of band collisions among the remaining documents, each
    verified against the component's first document.
    """
    near = p.near != "off"
    if not p.exact and not near:
        return None
    parts = cpus  # partitions of each shuffle: one per CPU
    live = scored.map_batches(_live, batch_format="pyarrow", fn_kwargs={"near": near, "parts": parts})
    found = []
    eligible = live
    if p.exact:
        # grouped by the partition of the text key ("part"), not by the key: all copies of a text
        # meet in one call, vectorised per partition rather than a Python call per text, since nearly
        # every text is a single document
        grouped = live.groupby("part").map_groups(_first_of_each_text, batch_format="pyarrow").materialize()
        found.append(grouped.map_batches(_exact_decisions, batch_format="pyarrow"))
        eligible = grouped.map_batches(_firsts, batch_format="pyarrow")
    if near:
        bands, rows = banding(p.threshold, p.num_perm)
        pairs = (
            eligible.map_batches(_band_keys, batch_format="pyarrow",
                                 fn_kwargs={"num_perm": p.num_perm, "bands": bands, "rows": rows, "parts": parts})
            .groupby("part")
            .map_groups(_colliding_pairs, batch_format="pyarrow")
        )
        members, leaders = _clusters(pairs)
        _say(report, f"ray: clean: {len(members)} document(s) in near-duplicate clusters")
        if len(members):
            found.append(
                eligible.map_batches(_tag_clusters, batch_format="pyarrow",
                                     fn_kwargs={"members": members, "leaders": leaders, "parts": parts})
                .groupby("part")
                .map_groups(_verify_clusters, batch_format="pyarrow", fn_kwargs={"p": p})
            )
    if not found:
        return None
    return found[0].union(*found[1:]) if len(found) > 1 else found[0]


def _decision_file(scratch: str, chunk: int) -> Path:
    return Path(scratch) / f"decisions-{chunk:012d}.arrow"


def _chunk_of(rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The chunk (``_chunks``: a row range of the ingest dataset) each corpus position lies in."""
    return np.searchsorted(starts, rows, side="right") - 1


def _by_chunk(batch, starts: np.ndarray, parts: int):
    """Each decision with its chunk and the shuffle partition of that chunk."""
    import pyarrow as pa

    chunk = _chunk_of(batch["row"].to_numpy(), starts)
    return batch.append_column("chunk", pa.array(chunk)).append_column("part", pa.array((chunk % parts).astype(np.int32)))


def _save_decisions(block, scratch: str):
    """A Ray task: one partition of the decisions by chunk → one file of decisions per chunk, sorted
    by row, beside the parts, where that chunk's write tasks read them: the decisions (one per
    duplicate, a share of the corpus) never gather on the driver."""
    import pyarrow as pa

    table = block.sort_by("row")
    chunks = table["chunk"].to_numpy()
    edges = np.flatnonzero(np.diff(chunks)) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(chunks)]):
        if hi > lo:
            with pa.OSFile(str(_decision_file(scratch, int(chunks[lo]))), "wb") as sink, pa.ipc.new_file(sink, _decision_schema()) as out:
                out.write_table(table.slice(lo, hi - lo).select(_decision_schema().names))
    return pa.table({"decisions": [table.num_rows]})


def _decisions_of(first: int, last: int, starts: np.ndarray, scratch: str):
    """The decisions of positions ``first .. last``, sorted by row, from the files of their chunks."""
    import pyarrow as pa

    tables = [_decision_schema().empty_table()]
    first_chunk, last_chunk = (int(c) for c in _chunk_of(np.array([first, last]), starts))
    for chunk in range(first_chunk, last_chunk + 1):
        path = _decision_file(scratch, chunk)
        if path.exists():
            with pa.memory_map(str(path)) as source:
                tables.append(pa.ipc.open_file(source).read_all())
    decisions = pa.concat_tables(tables)
    lo, hi = np.searchsorted(decisions["row"].to_numpy(), [first, last + 1])
    return decisions.slice(lo, hi - lo)


def _with_decisions(rows: list[dict], first: int, decisions: Iterator[tuple]) -> Iterator[tuple[dict, int, str, float | None]]:
    """``(scored row, status, first id, estimated Jaccard)`` for scored rows that start at corpus
    position ``first``, merged with the decisions of their range (sorted by row).  Checks that every
    position arrives once, in order, and that every decision matches a document the filters kept."""
    pending = next(decisions, None)
    expected = first
    for row in rows:
        if row["row"] != expected:
            raise LmforgeError(f"clean (ray): document {row['row']} arrived where {expected} was expected")
        expected += 1
        if pending is not None and pending[0] < row["row"]:
            raise LmforgeError(f"clean (ray): a decision for document {pending[0]}, rejected or decided twice")
        if row["reject_reason"] is not None:
            yield row, REJECTED, row["id"], None
        elif pending is not None and pending[0] == row["row"]:
            _, status, first_id, jaccard = pending
            yield row, status, first_id, jaccard
            pending = next(decisions, None)
        else:
            yield row, KEEP, row["id"], None
    if pending is not None:
        raise LmforgeError(f"clean (ray): a decision for document {pending[0]}, which is not in its range")


def _write_block(block, starts: np.ndarray, route: Callable, features, scratch: str) -> Iterator[Any]:
    """A Ray task: one block of scored documents (a row range, in corpus order) and the decisions of
    that range (read from its chunks' files) → the range's shard of the output dataset and its part
    of the quarantine, through the clean stage's own ``route``."""
    if not block.num_rows:
        return
    rows = block["row"].to_numpy()
    first, last = int(rows[0]), int(rows[-1])
    mine = _decisions_of(first, last, starts, scratch)
    mine_rows = zip(*(mine[c].to_pylist() for c in ("row", "status", "first_id", "jaccard")))

    def routed(quarantine):
        for decided in _with_decisions(block.drop_columns(["signature"]).to_pylist(), first, mine_rows):
            yield route(*decided, quarantine)

    yield _write_part(first, last, routed, features, scratch)


def clean_shards(
    dataset_dir: Path, score: Callable, score_kwargs: dict, scored_schema, p: DedupParams,
    route: Callable, features, dataset_out: Path, quarantine_out: Path, report=None,
) -> None:
    """Clean on the cluster: the ingest dataset at ``dataset_dir`` → the dataset at ``dataset_out``
    and the quarantine at ``quarantine_out``, the local engine's rows and records in corpus order.

    The scored documents stay in the cluster's object store (spilled to disk when it is full).  The
    decisions (one per duplicate) are written by tasks too, one file per chunk of the corpus; then
    each block's task reads its chunk's decisions and writes its own shard and quarantine part.  The
    driver holds neither documents nor decisions: it checks that the blocks cover every position
    once and writes the dataset's manifest; tasks copy the quarantine parts into the quarantine.
    """
    import pyarrow as pa
    import ray

    scratch = _scratch(dataset_out)
    with _data_context():
        cpus = _cpus()
        chunks = _chunks(dataset_dir, cpus)
        schema = pa.schema([pa.field("row", pa.int64()), *scored_schema])
        scored = (
            ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))
            .map_batches(
                _score_chunks,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={"score": score, "score_kwargs": score_kwargs, "schema": schema},
            )
            .materialize()
        )
        total = scored.count()
        _say(report, f"ray: clean scored {total} documents in {len(chunks)} tasks", scored)
        found = _decisions(scored, p, cpus, report)
        starts = np.array([chunk["row"] for chunk in chunks], dtype=np.int64)
        if found is not None:
            saved = (found.map_batches(_by_chunk, batch_format="pyarrow", fn_kwargs={"starts": starts, "parts": cpus})
                     .groupby("part").map_groups(_save_decisions, batch_format="pyarrow", fn_kwargs={"scratch": str(scratch)}))
            count = saved.sum("decisions") or 0  # runs the tasks that write the files
            _say(report, f"ray: clean: {count} decision(s) written by chunk")
        written = scored.map_batches(
            _write_block, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"starts": starts, "route": route, "features": features, "scratch": str(scratch)},
        ).materialize()
        _say(report, f"ray: clean wrote {written.count()} shards from the tasks", written)
    _save_parts(written, total, "clean (ray): the written blocks of documents", features, dataset_out, quarantine_out)


# --------------------------------------------------------------------------------------------------
# Packed: tokenize row ranges in tasks, each writing its own part of the token file
# --------------------------------------------------------------------------------------------------


def _tokenize_chunks(batch, tokenizer_file: str, separator: int, dtype: str) -> Iterator[Any]:
    """A Ray task: read row ranges of a split (memory-mapped), tokenize their texts with the local
    engine's batch function and write each range's token ids to its own part file.  A retried task
    writes its part again from the start, so nothing is doubled."""
    import pyarrow as pa

    from models.data import encode_texts

    for chunk in batch.to_pylist():
        with pa.memory_map(chunk["path"]) as source:
            table = pa.ipc.open_stream(source).read_all().slice(chunk["start"], chunk["stop"] - chunk["start"])
            with open(chunk["part"], "wb") as fh:
                tokens = sum(encode_texts(fh, part.column("text").to_pylist(), tokenizer_file, separator, np.dtype(dtype))
                             for part in table.select(["text"]).to_batches(max_chunksize=TOKENIZE_ROWS))
        yield pa.table({"part": [chunk["part"]], "tokens": pa.array([tokens], pa.int64())})


def pack_split(dataset_dir: Path, tokenizer_file: Path, separator: int, pad: int, block_size: int, dtype, out: Path, report=None) -> dict:
    """``models.data.pack_split`` on the cluster: the same token file ``out`` from the split at
    ``dataset_dir``, and the same counts.  Tasks tokenize row ranges, each into a part file beside
    ``out`` (a shared filesystem); the driver sizes ``out`` from the parts' token counts and pads it;
    then tasks copy the parts in at their offsets.  No token passes through the driver."""
    import ray

    from models.data import allocate_split

    dtype = np.dtype(dtype)
    parts_dir = out.parent / f".{out.stem}-parts"
    parts_dir.mkdir()
    with _data_context():
        chunks = _chunks(dataset_dir, _cpus())
        for i, chunk in enumerate(chunks):
            chunk["part"] = str(parts_dir / f"{i:05d}.bin")
        written = None
        if chunks:
            written = (
                ray.data.from_items(chunks, override_num_blocks=len(chunks))
                .map_batches(
                    _tokenize_chunks,
                    batch_size=None,
                    batch_format="pyarrow",
                    fn_kwargs={"tokenizer_file": str(tokenizer_file), "separator": separator, "dtype": dtype.name},
                )
                .materialize()
            )
        tokens = {row["part"]: row["tokens"] for row in (written.take_all() if written is not None else [])}
        parts = [chunk["part"] for chunk in chunks]
        if sorted(tokens) != parts:
            raise LmforgeError(f"packed (ray): {len(tokens)} parts written for {len(parts)} row ranges of {dataset_dir}")
        counts = allocate_split(out, int(sum(tokens.values())), sum(c["stop"] - c["start"] for c in chunks), pad, block_size, dtype)
        _copy_in([Path(part) for part in parts], out)
        _say(report, f"ray: packed {dataset_dir.name} tokenized in {len(chunks)} tasks, written in place by tasks", written)
    shutil.rmtree(parts_dir)
    return counts


# --------------------------------------------------------------------------------------------------
# Tokenizer: a seeded sample of the train split, drawn by the tasks
# --------------------------------------------------------------------------------------------------


def _smallest_keys(batch, key: Callable, key_kwargs: dict, n: int) -> Iterator[Any]:
    """A Ray task: the ``n`` rows of each row range with the smallest keys (ties by position), with
    their texts: a superset of the range's share of the sample."""
    import pyarrow as pa

    for chunk in batch.to_pylist():
        with pa.memory_map(chunk["path"]) as source:
            table = pa.ipc.open_stream(source).read_all().slice(chunk["start"], chunk["stop"] - chunk["start"])
            keys = key(table.column("id").to_pylist(), **key_kwargs)
            rows = np.arange(chunk["row"], chunk["row"] + table.num_rows, dtype=np.int64)
            take = np.sort(np.lexsort((rows, keys))[:n])  # in corpus order
            yield pa.table({"row": rows[take], "key": keys[take], "text": table.column("text").take(take)})


def sample_texts(dataset_dir: Path, key: Callable, key_kwargs: dict, n: int, report=None) -> list[str]:
    """The texts of the ``n`` rows of the dataset at ``dataset_dir`` with the smallest
    ``key(ids, **key_kwargs)`` (ties by position), in corpus order: the sample the local engine draws
    with the same key.  Each task sends at most ``n`` texts to the driver."""
    import pyarrow as pa
    import ray

    with _data_context():
        chunks = _chunks(dataset_dir, _cpus())
        found = (
            ray.data.from_items(chunks, override_num_blocks=len(chunks))
            .map_batches(_smallest_keys, batch_size=None, batch_format="pyarrow",
                         fn_kwargs={"key": key, "key_kwargs": key_kwargs, "n": n})
            .materialize()
        )
        candidates = pa.concat_tables(list(found.iter_batches(batch_format="pyarrow", batch_size=None)))
        rows, keys = candidates["row"].to_numpy(), candidates["key"].to_numpy()
        take = np.sort(np.lexsort((rows, keys))[:n])  # candidates arrive in corpus order: sorting keeps it
        if not np.all(np.diff(rows) > 0):
            raise LmforgeError(f"tokenizer (ray): the sample's candidates of {dataset_dir} arrived out of order")
        _say(report, f"ray: tokenizer sampled {len(take)} of the train split's documents in {len(chunks)} tasks", found)
        return candidates["text"].take(take).to_pylist()
