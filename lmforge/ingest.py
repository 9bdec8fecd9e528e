"""Ingest: every configured source → one Arrow dataset of plain-text documents with provenance.

Each output row says where it came from (``source``, ``path``, ``record``, ``format``,
``file_sha256``) so that any document, and any model trained on it, can be traced back to the exact
bytes of the exact file.  Anything that cannot become a document becomes a quarantine record.

Accounting (checked by the tests): every directory entry that passes the include/exclude globs ends
up as documents or as quarantine records; every line/row/item of a JSONL, JSON, CSV or Parquet file
or of a Hugging Face dataset is one document or one quarantine record.

With ``cluster.data_engine: ray`` the files are read by Ray tasks across a cluster
(``lmforge.ray_data``), with the same per-file code (``_item_outputs``) and the same output.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.artifacts import (
    QUARANTINE,
    QuarantineWriter,
    concat_files,
    count_reasons,
    env_num_proc,
    fresh_dir,
    load_dataset_dir,
    save_generated,
    shards,
    value_counts,
    write_params,
    write_summary,
)
from lmforge.cluster import connected
from lmforge.context import QUIET, RunContext
from lmforge.formats import Record, detect_format, read_records
from lmforge.params import IngestParams, LmforgeError, Params, SourceParams, build
from lmforge.stages import Out, Stage


INGEST = Stage(
    "ingest", group="data",
    params=("paths", "ingest"),
    files=("data/raw",),
    outs=("dataset", "quarantine.jsonl", Out("params.json", cache=False)),
    engines=("local", "ray"),
)


COLUMNS = ("id", "source", "path", "record", "format", "text", "bytes", "sha256", "file_sha256")


def features():
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "path": datasets.Value("string"),
            "record": datasets.Value("int64"),
            "format": datasets.Value("string"),
            "text": datasets.Value("large_string"),
            "bytes": datasets.Value("int64"),
            "sha256": datasets.Value("string"),
            "file_sha256": datasets.Value("string"),
        }
    )


@dataclass(frozen=True)
class Item:
    """One unit of ingest work: a file of a directory source, a rejected entry, or a whole HF source."""

    source: str
    path: str  # as recorded: relative to the source directory, or the dataset path/name
    abs_path: str = ""
    reject: tuple[str, str] | None = None  # (reason, detail) known before reading
    hf: SourceParams | None = None


def document_id(source: str, path: str, record: int) -> str:
    """Stable id from provenance (not content): re-ingesting the same file gives the same ids."""
    return hashlib.sha256(f"{source}\0{path}\0{record}".encode()).hexdigest()[:16]


def _matches(rel: str, patterns: list[str]) -> bool:
    """Glob match of a relative path; ``*`` crosses ``/`` and a leading ``**/`` also matches no directory."""
    return any(fnmatch.fnmatchcase(rel, p) or (p.startswith("**/") and fnmatch.fnmatchcase(rel, p[3:])) for p in patterns)


def resolve_source_path(params: Params, source: SourceParams) -> Path:
    return params.path(source.path if source.path is not None else params.paths.raw)


def list_items(params: Params) -> tuple[list[Item], int]:
    """Enumerate the work of every source (cheap: no file is read).  Returns (items, filtered_out)."""
    items: list[Item] = []
    filtered = 0
    names = [s.name for s in params.ingest.sources]
    if len(set(names)) != len(names):
        raise LmforgeError(f"ingest.sources: source names must be unique, got {names}")
    for source in params.ingest.sources:
        if source.type != "directory":
            open_hf_source(source, params)  # fail fast on a wrong path, name or column
            items.append(Item(source.name, source.path or "", hf=source))
            continue
        root = resolve_source_path(params, source)
        if not root.is_dir():
            hint = " (run 'lmforge demo-corpus' to create the demo corpus)" if source.path is None else ""
            raise LmforgeError(f"ingest source '{source.name}': directory not found: {root}{hint}")
        found, skipped = _walk(source, root)
        items += found
        filtered += skipped
    return items, filtered


def source_fingerprint(params: Params) -> tuple[str, float]:
    """(hash, newest modification time) of what ingest would read, without reading any file.

    Directory sources contribute each file's relative path, size and modification time (the same
    include/exclude globs as ingest); other sources their settings.  The raw-data sensor and the
    ``raw_documents`` source asset use the hash as the data's version, and the newest time to wait
    until files being copied in have settled.
    """
    h = hashlib.sha256()
    newest = 0.0
    for source in params.ingest.sources:
        h.update(json.dumps(dataclasses.asdict(source), sort_keys=True).encode())
        root = resolve_source_path(params, source)
        if source.type != "directory" or not root.is_dir():
            continue
        for item in _walk(source, root)[0]:
            try:
                st = os.lstat(item.abs_path)
            except OSError:
                continue
            newest = max(newest, st.st_mtime)
            h.update(f"{item.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16], newest


def _walk(source: SourceParams, root: Path) -> tuple[list[Item], int]:
    """Walk ``root`` in sorted order without following symlinks; symlinks and special files are
    recorded as rejections so that the user sees them."""
    items: list[Item] = []
    filtered = 0
    real_root = os.path.realpath(root)

    def unreadable_dir(exc: OSError) -> None:
        rel = os.path.relpath(exc.filename, root).replace(os.sep, "/")
        items.append(Item(source.name, rel, exc.filename, ("unreadable", f"cannot list directory: {exc.strerror}")))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable_dir):
        dirnames.sort()
        entries = sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(entries):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if not _matches(rel, source.include) or _matches(rel, source.exclude):
                filtered += 1
                continue
            items.append(Item(source.name, rel, full, _pre_reject(full, real_root)))
    return items, filtered


def _pre_reject(full: str, real_root: str) -> tuple[str, str] | None:
    """Rejections decided from the directory entry alone."""
    if os.path.islink(full):
        target = os.path.realpath(full)
        where = "inside" if os.path.commonpath([target, real_root]) == real_root else "outside"
        return ("symlink", f"symbolic link to {os.readlink(full)} ({where} the source) is never followed")
    try:
        mode = os.stat(full).st_mode
    except OSError as exc:
        return ("unreadable", f"cannot stat: {exc.strerror}")
    if not stat.S_ISREG(mode):
        return ("not_a_regular_file", "a device, socket or pipe, not a file")
    fmt, _ = detect_format(Path(full))
    if fmt is None:
        return ("unsupported_format", f"no reader for '{Path(full).name}' (supported formats: docs/data.md)")
    return None


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def open_hf_source(source: SourceParams, params: Params):
    """(location, dataset) for a Hugging Face source, streamed where possible.  Called once up front
    in the main process, so a wrong path, name or text column stops the run with one clear line."""
    import datasets

    location = (source.path or "") if source.type == "hf_hub" else str(resolve_source_path(params, source))
    if not location:
        raise LmforgeError(f"ingest source '{source.name}': {source.type} needs 'path'")
    try:
        if source.type == "hf_disk":
            ds = datasets.load_from_disk(location)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.split]
        elif source.type == "hf_files":
            builder = source.builder or _guess_builder(location)
            ds = datasets.load_dataset(builder, data_files=location, split=source.split, streaming=True)
        else:  # hf_hub: a dataset name on the Hub (a local dataset directory takes the same code path)
            ds = datasets.load_dataset(location, source.config, split=source.split, streaming=True)
    except Exception as exc:  # datasets raises many types: not found, offline, bad split, bad files
        raise LmforgeError(f"ingest source '{source.name}': cannot load {location}: {type(exc).__name__}: {exc}") from None
    columns = ds.column_names
    if columns is not None and source.text_field not in columns:
        raise LmforgeError(
            f"ingest source '{source.name}': no column '{source.text_field}' in {location} "
            f"(columns: {', '.join(columns)}); set text_field"
        )
    return location, ds


def _hf_records(source: SourceParams, params: Params):
    """Yield (path label, Record) for a Hugging Face dataset source, row by row."""
    location, ds = open_hf_source(source, params)
    for i, row in enumerate(ds):
        value = row.get(source.text_field)
        if isinstance(value, str):
            yield location, Record(i, text=value)
        else:
            yield location, Record(i, reason="missing_text_field", detail=f"row {i}: '{source.text_field}' is {value!r}")


def _guess_builder(location: str) -> str:
    fmt, _ = detect_format(Path(location))
    return {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(fmt or "", "text")


def _generate(shards: list[tuple[int, list[Item]]], params_blob: dict, out_dir: str):
    """Rows of the shards given to one worker process (``datasets`` hands each worker a sub-list);
    rejections go to each shard's own quarantine part, merged in shard order afterwards."""
    params: Params = build(Params, params_blob, "")
    for shard, items in shards:
        yield from _generate_shard(shard, items, params, out_dir)


def _generate_shard(shard: int, items: list[Item], params: Params, out_dir: str):
    with QuarantineWriter(Path(out_dir) / f"{QUARANTINE}.part{shard:03d}") as quarantine:
        for item in items:
            for row, rejection in _item_outputs(item, params):
                if rejection is not None:
                    quarantine.write(**rejection)
                else:
                    yield row


def _rejection(source: str, path: str, record: int, reason: str, detail: str, text: str | None = None) -> dict:
    """The arguments of one ``QuarantineWriter.write``: the same fields, in the same order, from both engines."""
    return {"source": source, "path": path, "record": record, "reason": reason, "detail": detail, "text": text}


def _item_outputs(item: Item, params: Params):
    """Everything one item gives, in order: ``(document row, None)`` or ``(None, rejection)``.

    The per-file work of both engines: a worker process of the local engine, or a Ray task."""
    cfg: IngestParams = params.ingest
    if item.hf is not None:
        records = _hf_records(item.hf, params)
        fmt, file_sha = "hf", ""
    elif item.reject is not None:
        reason, detail = item.reject
        yield None, _rejection(item.source, item.path, 0, reason, detail)
        return
    else:
        fmt, gz = detect_format(Path(item.abs_path))
        file_sha = _file_sha256(item.abs_path)
        records = ((item.path, r) for r in read_records(Path(item.abs_path), fmt, gz, _field(params, item), cfg.max_document_bytes))
    for path, rec in records:
        if rec.reason is None and not (rec.text or "").strip():
            rec = Record(rec.record, text=rec.text, reason="empty_text", detail="no text after conversion")
        if rec.reason is not None:
            yield None, _rejection(item.source, path, rec.record, rec.reason, rec.detail, rec.text)
            continue
        data = rec.text.encode("utf-8", "surrogatepass")
        if len(data) > cfg.max_document_bytes:
            detail = f"document larger than ingest.max_document_bytes ({cfg.max_document_bytes:,})"
            yield None, _rejection(item.source, path, rec.record, "too_large", detail)
            continue
        yield {
            "id": document_id(item.source, path, rec.record),
            "source": item.source,
            "path": path,
            "record": rec.record,
            "format": fmt,
            "text": rec.text,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "file_sha256": file_sha,
        }, None


def _ray_item_outputs(items: list[Item], params_blob: dict):
    """A Ray task's share of the items → ``(document row, None)`` or ``(None, rejection)``, in order."""
    params: Params = build(Params, params_blob, "")
    for item in items:
        yield from _item_outputs(item, params)


def _ray_route(output: tuple[dict | None, dict | None], quarantine: QuarantineWriter) -> dict | None:
    """In a Ray task, in corpus order: a document's dataset row, or ``None`` once a rejection is in the
    quarantine (as the local engine's workers do)."""
    row, rejection = output
    if rejection is not None:
        quarantine.write(**rejection)
    return row


def _field(params: Params, item: Item) -> str:
    return next(s.text_field for s in params.ingest.sources if s.name == item.source)


def run_ingest(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Materialize ``<artifacts>/ingest``: ``dataset/`` (Arrow), ``quarantine.jsonl``, ``summary.json``.

    ``ctx.log`` hears where the work ran on the Ray engine."""
    from dataclasses import asdict

    items, filtered = list_items(params)
    out = fresh_dir(params.stage_dir("ingest"))
    dataset_dir = out / "dataset"
    if INGEST.engine(params.cluster.data_engine) == "ray":
        from lmforge import ray_data

        with connected(params.cluster, ctx.log):
            ray_data.flat_map_shards(items, _ray_item_outputs, {"params_blob": asdict(params)}, _ray_route, features(),
                                     dataset_dir, out / QUARANTINE, "ingest", ctx.log)
        ds = load_dataset_dir(dataset_dir, "ingest")
    else:
        parts = shards(items, env_num_proc(params.ingest.num_proc)) or [[]]
        ds = save_generated(
            _generate,
            {"shards": list(enumerate(parts)), "params_blob": asdict(params), "out_dir": str(out)},
            features(),
            dataset_dir,
            num_proc=len(parts) if len(parts) > 1 else None,
        )
        part_files = [out / f"{QUARANTINE}.part{i:03d}" for i in range(len(parts))]
        concat_files(part_files, out / QUARANTINE)
    summary = _summarize(params, items, filtered, ds, out)
    ctx.log(f"ingest: {summary['documents']} documents, {summary['quarantined']} quarantined")
    if not summary["documents"]:
        # Written first: the summary and the quarantine records say why, for the user to read.
        raise LmforgeError(
            f"ingest: no documents: {summary['files']} files read, {filtered} filtered out by ingest.sources, "
            f"{summary['quarantined']} quarantined {summary['by_reason']} (see {out / QUARANTINE}): "
            "point ingest.sources at your documents"
        )
    return summary


def _summarize(params: Params, items: list[Item], filtered: int, ds, out: Path) -> dict[str, Any]:
    """``summary.json`` and ``params.json`` from the outputs, the same for both engines."""
    by_reason = count_reasons(out / QUARANTINE)
    documents = len(ds)
    input_bytes = sum(os.path.getsize(i.abs_path) for i in items if i.abs_path and i.reject is None)
    text_bytes = int(ds.data.column("bytes").to_numpy().sum()) if documents else 0
    summary = {
        "files": len(items),
        "filtered_out": filtered,
        "documents": documents,
        "quarantined": sum(by_reason.values()),
        "by_reason": dict(sorted(by_reason.items())),
        "bytes": input_bytes,
        "text_bytes": text_bytes,
        "formats": value_counts(ds, "format"),
        "sources": value_counts(ds, "source"),
    }
    write_params(out, params.ingest)
    write_summary(out, summary)
    return summary
