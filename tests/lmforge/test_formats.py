"""Every supported format, plain and gzipped, converts to the expected plain text."""

import csv
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.formats import detect_format, html_to_text, read_records


def make_pdf(text: str) -> bytes:
    """A minimal valid one-page PDF with ``text`` in Helvetica (correct cross-reference offsets)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + obj + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def write_format(path: Path, fmt: str) -> list[str]:
    """Write a file of ``fmt`` at ``path``; return the texts it holds."""
    texts = ["First document about parsers.", "Second document about gzip."]
    if fmt == "txt":
        path.write_text(texts[0])
        return texts[:1]
    if fmt == "md":
        path.write_text(f"# Title\n\n*{texts[0]}*\n\n- item one\n")
        return ["Title\n\n" + texts[0] + "\n\nitem one"]
    if fmt == "rst":
        path.write_text(f"Title\n=====\n\n**{texts[0]}**\n")
        return ["Title\n\n" + texts[0]]
    if fmt == "html":
        path.write_text(f"<html><body><h1>Title</h1><p>{texts[0]}</p><script>evil()</script></body></html>")
        return ["Title\n" + texts[0]]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "other": 1}) + "\n" for t in texts))
        return texts
    if fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
        return texts
    if fmt == "csv":
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "text"])
            w.writerows([[i, t] for i, t in enumerate(texts)])
        return texts
    if fmt == "parquet":
        pq.write_table(pa.table({"text": texts}), path)
        return texts
    if fmt == "pdf":
        path.write_bytes(make_pdf(texts[0]))
        return texts[:1]
    raise AssertionError(fmt)


FORMATS = ["txt", "md", "rst", "html", "jsonl", "json", "csv", "parquet", "pdf"]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_converts(tmp_path: Path, fmt: str, gz: bool):
    path = tmp_path / f"doc.{fmt}"
    expected = write_format(path, fmt)
    if gz:
        gz_path = tmp_path / f"doc.{fmt}.gz"
        gz_path.write_bytes(gzip.compress(path.read_bytes()))
        path = gz_path
    assert detect_format(path) == (fmt, gz)
    records = list(read_records(path, fmt, gz, "text", 10_000_000))
    assert [r.reason for r in records] == [None] * len(expected)
    assert [r.text for r in records] == expected


def test_html_keeps_blocks_on_lines_and_drops_scripts():
    text = html_to_text("<p>one <b>bold</b> word</p><ul><li>a</li><li>b</li></ul><style>p{}</style>")
    assert text == "one bold word\na\nb"


def test_unsupported_suffix_is_detected():
    assert detect_format(Path("a.docx")) == (None, False)
    assert detect_format(Path("archive.tar.gz")) == (None, True)


def test_os_read_error_becomes_unreadable_record():
    # /proc/self/mem opens but fails on read with EIO, even for root: a real I/O error
    records = list(read_records(Path("/proc/self/mem"), "txt", False, "text", 100))
    assert [r.reason for r in records] == ["unreadable"]
