"""Turn one file of any supported format into plain-text records, or into reasons it was rejected.

Every format is converted with a maintained library (markdown, docutils, selectolax, pypdf, pyarrow)
rather than regular expressions, so that real-world markup is handled.  A file yields ``Record``s: a
document (``text`` set) or a rejection (``reason`` set).  Rejections are never raised past this module:
the caller writes them to ``quarantine.jsonl`` so that nothing is silently dropped.

Record-oriented formats (JSONL, CSV, Parquet) are streamed so that a large file does not have to fit
in memory; single-document formats are read whole, up to ``max_bytes``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: Supported suffixes (after removing a trailing ``.gz``) and the format name recorded for each.
FORMATS = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "md",
    ".markdown": "md",
    ".rst": "rst",
    ".html": "html",
    ".htm": "html",
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pdf": "pdf",
}

_BLOCK_TAGS = (
    "p, div, br, hr, li, dt, dd, tr, table, pre, blockquote, section, article, header, footer, "
    "h1, h2, h3, h4, h5, h6, ul, ol, dl, title"
)


@dataclass
class Record:
    """One document, or one rejection, read from a file."""

    record: int  # position in the file: 0 for single-document files, line/row number otherwise
    text: str | None = None
    reason: str | None = None  # set when rejected: a short stable code, see docs/data.md
    detail: str | None = None  # a human sentence saying what was wrong


class Rejected(Exception):
    """Raised inside this module when a whole file (or the rest of it) cannot be read."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def detect_format(path: Path) -> tuple[str | None, bool]:
    """Return (format name or None if unsupported, whether the file is gzip-compressed)."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    return (FORMATS.get(suffixes[-1]) if suffixes else None), gz


# --------------------------------------------------------------------------------------------------
# Bytes → str
# --------------------------------------------------------------------------------------------------


def decode(data: bytes) -> str:
    """Strict UTF-8 decoding (a BOM is dropped) that rejects binary content with a clear reason."""
    if b"\x00" in data[:8192]:
        raise Rejected("binary_content", "NUL bytes in the first 8 KiB: this is not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"not valid UTF-8 at byte {exc.start}: {data[exc.start:exc.start + 4]!r}") from None


def _read_limited(fh: BinaryIO, max_bytes: int) -> bytes:
    data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Rejected("too_large", f"larger than ingest.max_document_bytes ({max_bytes:,} bytes)")
    return data


# --------------------------------------------------------------------------------------------------
# Markup → text
# --------------------------------------------------------------------------------------------------


def html_to_text(html: str) -> str:
    """Visible text of an HTML document, one line per block element (lexbor parser via selectolax)."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    for node in tree.css("script, style, noscript, template, head > meta, svg"):
        node.decompose()
    for node in tree.css(_BLOCK_TAGS):
        node.insert_after("\n")
    root = tree.body if tree.body is not None else tree.root
    text = root.text(separator="", deep=True) if root is not None else ""
    title = tree.css_first("title")
    if title is not None and tree.body is not None:
        text = title.text() + "\n" + text
    return tidy_lines(text)


def tidy_lines(text: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines; markup converters leave many."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def markdown_to_text(source: str) -> str:
    import markdown

    return html_to_text(markdown.markdown(source, extensions=["tables", "fenced_code"]))


def rst_to_text(source: str) -> str:
    """reStructuredText through docutils; if docutils cannot parse it the source is kept as text,
    since reStructuredText is readable plain text by design."""
    from docutils.core import publish_parts

    settings = {
        "report_level": 5,  # silence warnings about unknown (Sphinx) roles and directives
        "halt_level": 5,
        "raw_enabled": False,  # never pass raw HTML through, never read files named in the source
        "file_insertion_enabled": False,
        "warning_stream": io.StringIO(),
        "input_encoding": "unicode",
    }
    try:
        html = publish_parts(source, writer="html5", settings_overrides=settings)["html_body"]
    except Exception:  # docutils raises many types on malformed input
        return tidy_lines(source)
    return html_to_text(html)


def pdf_to_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise Rejected("encrypted_pdf", "the PDF is encrypted; decrypt it before ingesting")
        return tidy_lines("\n\n".join(page.extract_text() or "" for page in reader.pages))
    except Rejected:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise Rejected("corrupt_file", f"pypdf cannot read this PDF: {exc}") from None


_SINGLE_DOCUMENT = {
    "txt": tidy_lines,
    "md": markdown_to_text,
    "rst": rst_to_text,
    "html": html_to_text,
}


# --------------------------------------------------------------------------------------------------
# Record-oriented formats
# --------------------------------------------------------------------------------------------------


def _value_text(value: object, text_field: str) -> str:
    """The text of one JSON/CSV/Parquet record; raise Rejected if the field is missing or not text."""
    if isinstance(value, dict):
        if text_field not in value:
            keys = ", ".join(map(str, list(value)[:10]))
            raise Rejected("missing_text_field", f"no field '{text_field}' (fields: {keys}); set text_field")
        value = value[text_field]
    if not isinstance(value, str):
        raise Rejected("missing_text_field", f"field '{text_field}' is {type(value).__name__}, not text")
    return value


def _jsonl_records(fh: BinaryIO, text_field: str, max_bytes: int) -> Iterator[Record]:
    for lineno, raw in enumerate(fh, start=1):
        if not raw.strip():
            continue  # blank lines separate nothing in JSONL; they are not records
        try:
            if len(raw) > max_bytes:
                raise Rejected("too_large", f"line longer than ingest.max_document_bytes ({max_bytes:,})")
            try:
                obj = json.loads(decode(raw))
            except json.JSONDecodeError as exc:
                raise Rejected("malformed_json", f"{exc.msg} at column {exc.colno}") from None
            yield Record(lineno, text=_value_text(obj, text_field))
        except Rejected as rej:
            text = raw.decode("utf-8", "replace") if rej.reason == "malformed_json" else None
            yield Record(lineno, text=text, reason=rej.reason, detail=f"line {lineno}: {rej.detail}")


def _json_records(data: bytes, text_field: str) -> Iterator[Record]:
    try:
        obj = json.loads(decode(data))
    except json.JSONDecodeError as exc:
        raise Rejected("malformed_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    items = obj if isinstance(obj, list) else [obj]
    for i, item in enumerate(items):
        try:
            yield Record(i, text=_value_text(item, text_field))
        except Rejected as rej:
            yield Record(i, reason=rej.reason, detail=f"item {i}: {rej.detail}")


def _csv_records(fh: BinaryIO, text_field: str, max_bytes: int) -> Iterator[Record]:
    csv.field_size_limit(max_bytes)
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text)
    try:
        if reader.fieldnames is None:
            raise Rejected("empty_file", "the CSV has no header row")
        if text_field not in reader.fieldnames:
            raise Rejected("missing_text_field", f"no column '{text_field}' (columns: {', '.join(reader.fieldnames)})")
        row_no = 0
        for row_no, row in enumerate(reader, start=1):
            value = row.get(text_field)
            if value is None:
                yield Record(row_no, reason="malformed_csv", detail=f"row {row_no}: too few columns")
            else:
                yield Record(row_no, text=value)
    except csv.Error as exc:
        raise Rejected("malformed_csv", f"after row {reader.line_num}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"after row {reader.line_num}: {exc.reason}") from None


def _parquet_records(data: BinaryIO, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(data)
    except (pa.ArrowException, OSError) as exc:
        raise Rejected("corrupt_file", f"pyarrow cannot read this Parquet file: {exc}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise Rejected("missing_text_field", f"no column '{text_field}' (columns: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield Record(row, text=value)
            else:
                yield Record(row, reason="missing_text_field", detail=f"row {row}: '{text_field}' is {value!r}")
            row += 1


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def read_records(path: Path, fmt: str, gz: bool, text_field: str, max_bytes: int) -> Iterator[Record]:
    """Yield the records of one file.  File-level failures become a single rejection record; a
    failure part-way through a record-oriented file (a truncated gzip) rejects only the rest."""
    yielded = 0
    try:
        with open(path, "rb") as raw:
            fh: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
            if fmt == "jsonl":
                for rec in _jsonl_records(fh, text_field, max_bytes):
                    yielded += 1
                    yield rec
                return
            if fmt == "csv":
                for rec in _csv_records(fh, text_field, max_bytes):
                    yielded += 1
                    yield rec
                return
            data = _read_limited(fh, max_bytes)
        if not data.strip():
            raise Rejected("empty_file", "the file is empty or only whitespace")
        if fmt == "parquet":
            records: Iterator[Record] = _parquet_records(io.BytesIO(data), text_field)
        elif fmt == "json":
            records = _json_records(data, text_field)
        elif fmt == "pdf":
            records = iter([Record(0, text=pdf_to_text(data))])
        else:
            records = iter([Record(0, text=_SINGLE_DOCUMENT[fmt](decode(data)))])
        for rec in records:
            yielded += 1
            yield rec
    except Rejected as rej:
        yield Record(yielded, reason=rej.reason, detail=rej.detail if not yielded else f"after record {yielded}: {rej.detail}")
    except (EOFError, zlib.error) as exc:
        yield Record(yielded, reason="truncated_gzip", detail=f"the gzip stream ends early or is damaged ({exc})")
    except gzip.BadGzipFile as exc:
        yield Record(yielded, reason="corrupt_gzip", detail=f"not a gzip file: {exc}")
    except PermissionError as exc:
        yield Record(yielded, reason="unreadable", detail=f"permission denied: {exc.strerror}")
    except OSError as exc:
        yield Record(yielded, reason="unreadable", detail=f"{type(exc).__name__}: {exc.strerror or exc}")
