"""The demo corpus: real, offline, in every promised format, byte-identical when rebuilt."""

import hashlib
import json
from pathlib import Path

from lmforge.demo_corpus import build_demo_corpus, render_html, stdlib_docs
from lmforge.formats import html_to_text


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def test_demo_corpus_is_complete_and_deterministic(tmp_path: Path):
    counts = build_demo_corpus(tmp_path / "a")
    raw = tmp_path / "a" / "raw"
    suffixes = {p.suffix for p in (raw / "packages").iterdir()}
    assert {".md", ".rst"} <= suffixes
    assert (raw / "stdlib" / "json.txt").read_text().startswith("JSON (JavaScript Object Notation)")
    page = (raw / "html" / "json.html").read_text()
    assert "<h2 id=\"dumps\">" in page and "dumps(" in html_to_text(page)
    assert counts["packages"] > 50 and counts["stdlib"] > 100 and counts["html"] >= counts["stdlib"]
    classification = [json.loads(line) for line in (tmp_path / "a/finetune/classification.jsonl").read_text().splitlines()]
    summarisation = [json.loads(line) for line in (tmp_path / "a/finetune/summarisation.jsonl").read_text().splitlines()]
    assert len(classification) == counts["classification"] >= 50
    assert {r["label"] for r in classification} == {"readme", "module", "api"}
    assert all(len(r["text"].split()) >= 25 and r["source"].startswith({"readme": "packages/"}.get(r["label"], "stdlib/")) for r in classification)
    assert len(summarisation) >= 50 and all(r["document"] and r["summary"] for r in summarisation)
    assert not any(p.name.startswith("lmforge") for p in (raw / "packages").iterdir())
    build_demo_corpus(tmp_path / "b")
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")


def test_stdlib_docs_never_import_pure_python_modules():
    import sys

    sys.modules.pop("antigravity", None)
    doc, members = stdlib_docs("antigravity")  # importing it would open a web browser
    assert "antigravity" not in sys.modules
    assert any(sig.startswith("geohash(") for sig, _ in members)


def test_rendered_html_escapes_docstrings():
    page = render_html("m", "a < b & <script>", [("f(x)", "returns <x>")])
    assert "<script>" not in page and "&lt;script&gt;" in page
