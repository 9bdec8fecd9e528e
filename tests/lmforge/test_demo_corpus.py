"""The demo corpus's parts.  The corpus itself (real, offline, in every promised format, byte-identical when
rebuilt) is tested through the command that writes it: tests/dagster_project/test_cli.py."""

from lmforge.demo_corpus import render_html, stdlib_docs


def test_stdlib_docs_never_import_pure_python_modules():
    import sys

    sys.modules.pop("antigravity", None)
    doc, members = stdlib_docs("antigravity")  # importing it would open a web browser
    assert "antigravity" not in sys.modules
    assert any(sig.startswith("geohash(") for sig, _ in members)


def test_rendered_html_escapes_docstrings():
    page = render_html("m", "a < b & <script>", [("f(x)", "returns <x>")])
    assert "<script>" not in page and "&lt;script&gt;" in page
