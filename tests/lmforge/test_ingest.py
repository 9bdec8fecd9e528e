"""Ingest: provenance, accounting, Hugging Face sources, and every kind of bad input."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import prose, write_params

from lmforge.ingest import document_id, run_ingest
from lmforge.params import LmforgeError, load_params


def ingest(tmp_path: Path, raw: Path, **sections):
    params = load_params(write_params(tmp_path, raw, **sections))
    summary = run_ingest(params)
    out = params.stage_dir("ingest")
    ds = datasets.load_from_disk(str(out / "dataset"))
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    return summary, ds, quarantine


def test_provenance_and_accounting(tmp_path: Path, corpus: Path):
    summary, ds, quarantine = ingest(tmp_path, corpus)
    assert summary["files"] == 15 and summary["documents"] == 15 and summary["quarantined"] == 0 == len(quarantine)
    assert summary["formats"] == {"txt": 12, "md": 1, "rst": 1, "html": 1}
    row = next(r for r in ds if r["path"] == "sub/page.html")
    assert set(row) >= {"id", "source", "path", "format", "text", "bytes", "sha256", "file_sha256"}
    assert "var x" not in row["text"] and row["text"].startswith("Page\n")
    assert row["id"] == document_id("raw", "sub/page.html", 0)
    assert row["bytes"] == len(row["text"].encode())
    import hashlib

    assert row["file_sha256"] == hashlib.sha256((corpus / "sub/page.html").read_bytes()).hexdigest()
    assert summary["bytes"] == sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    # the same input gives the same dataset (ids and order)
    _, again, _ = ingest(tmp_path, corpus)
    assert again["id"] == ds["id"]


def test_globs_filter_and_multiple_sources(tmp_path: Path, corpus: Path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text(prose(7))
    sources = [
        {"name": "docs", "path": str(corpus), "include": ["*.md", "**/*.html"]},
        {"name": "extra", "path": str(other)},
    ]
    summary, ds, _ = ingest(tmp_path, corpus, ingest={"sources": sources})
    assert sorted(ds["path"]) == ["guide.md", "sub/page.html", "x.txt"]
    assert summary["filtered_out"] == 13 and summary["sources"] == {"docs": 2, "extra": 1}


def test_bad_inputs_each_become_a_quarantine_record(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.txt").write_text(prose(1))
    (raw / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (raw / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (raw / "empty.md").write_text("")
    (raw / "truncated.txt.gz").write_bytes(gzip.compress(prose(2).encode() * 50)[:-30])
    (raw / "notgzip.jsonl.gz").write_bytes(b"plain bytes, not gzip")
    (raw / "lines.jsonl").write_text(json.dumps({"text": prose(3)}) + "\n{oops\n" + json.dumps({"body": "x"}) + "\n")
    (raw / "huge.txt").write_text("word " * 10_000_000)  # a 50 MB single line, over the 10 MB default
    (raw / "table.docx").write_bytes(b"PK\x03\x04")
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the source")
    (raw / "link.txt").symlink_to(outside)
    (raw / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(raw / "pipe.txt")
    summary, ds, quarantine = ingest(tmp_path, raw)
    reasons = {(q["path"], q["reason"]) for q in quarantine}
    assert reasons == {
        ("latin1.txt", "invalid_utf8"),
        ("binary.txt", "binary_content"),
        ("empty.md", "empty_file"),
        ("truncated.txt.gz", "truncated_gzip"),
        ("notgzip.jsonl.gz", "corrupt_gzip"),
        ("lines.jsonl", "malformed_json"),
        ("lines.jsonl", "missing_text_field"),
        ("huge.txt", "too_large"),
        ("table.docx", "unsupported_format"),
        ("link.txt", "symlink"),
        ("linked_dir", "symlink"),
        ("pipe.txt", "not_a_regular_file"),
    }
    assert all(q["detail"] and q["source"] == "raw" for q in quarantine)
    assert "outside" in next(q["detail"] for q in quarantine if q["path"] == "link.txt")
    assert sorted(ds["path"]) == ["good.txt", "lines.jsonl"]  # line 1 of lines.jsonl is fine
    # nothing lost: every entry and every JSONL line is a document or a quarantine record
    assert summary["files"] == 12 and summary["documents"] + summary["quarantined"] == 14
    assert "outside the source" not in "".join(ds["text"])
    malformed = next(q for q in quarantine if q["reason"] == "malformed_json")
    assert malformed["record"] == 2 and malformed["text"] == "{oops\n"


def test_unreadable_file_is_quarantined(tmp_path: Path):
    """Permission denied, for real.  Root reads any file, so as root the ingest runs in a child
    process without the capabilities that bypass file permissions (CAP_DAC_*)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ok.txt").write_text(prose(1))
    (raw / "locked.txt").write_text(prose(2))
    os.chmod(raw / "locked.txt", 0o000)
    params = write_params(tmp_path, raw)
    code = (
        "import json; from lmforge.params import load_params; from lmforge.ingest import run_ingest;"
        f"print(json.dumps(run_ingest(load_params({str(params)!r}))))"
    )
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    proc = subprocess.run([*(drop if os.geteuid() == 0 else []), sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["by_reason"] == {"unreadable": 1} and summary["documents"] == 1
    record = json.loads((tmp_path / "artifacts/ingest/quarantine.jsonl").read_text())
    assert record["path"] == "locked.txt" and "permission denied" in record["detail"]


def test_missing_source_directory_is_a_clear_error(tmp_path: Path):
    params = load_params(write_params(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(LmforgeError, match="directory not found: .*nowhere.*lmforge demo-corpus"):
        run_ingest(params)


def test_hugging_face_sources_from_local_copies(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": [prose(1), prose(2), None]}).save_to_disk(str(saved))
    files = tmp_path / "files"
    files.mkdir()
    (files / "part.jsonl").write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(3, 5)))
    # "hub" by name: load_dataset(name) resolves a local dataset directory exactly as it would a Hub repo
    hub = tmp_path / "hub_copy"
    (hub / "data").mkdir(parents=True)
    (hub / "data" / "train.jsonl").write_text(json.dumps({"text": prose(9)}) + "\n")
    sources = [
        {"name": "disk", "type": "hf_disk", "path": str(saved), "text_field": "content"},
        {"name": "files", "type": "hf_files", "path": str(files / "*.jsonl")},
        {"name": "hub", "type": "hf_hub", "path": str(hub)},
    ]
    summary, ds, quarantine = ingest(tmp_path, raw, ingest={"sources": sources})
    assert summary["sources"] == {"disk": 2, "files": 2, "hub": 1}
    assert set(ds["format"]) == {"hf"}
    assert [(q["source"], q["reason"]) for q in quarantine] == [("disk", "missing_text_field")]


def test_hugging_face_source_without_the_text_column_stops_the_run(tmp_path: Path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["a"]}).save_to_disk(str(saved))
    (tmp_path / "raw").mkdir()
    params = load_params(write_params(tmp_path, ingest={"sources": [{"name": "d", "type": "hf_disk", "path": str(saved)}]}))
    with pytest.raises(LmforgeError, match="no column 'text'.*columns: content"):
        run_ingest(params)


@pytest.mark.parametrize(
    "source, message",
    [
        ({"type": "hf_disk", "path": "/nowhere/saved"}, "cannot load /nowhere/saved"),
        ({"type": "hf_hub", "path": "no-such-user/no-such-dataset"}, "cannot load no-such-user/no-such-dataset"),
        ({"type": "hf_hub"}, "hf_hub needs 'path'"),
    ],
)
def test_unloadable_hugging_face_sources_are_one_line_errors(tmp_path: Path, source: dict, message: str):
    (tmp_path / "raw").mkdir()
    params = load_params(write_params(tmp_path, ingest={"sources": [{"name": "d", **source}]}))
    with pytest.raises(LmforgeError, match=message):
        run_ingest(params)
