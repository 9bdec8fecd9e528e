"""The demo corpus: real documents that no one on this team wrote and that every Python has, offline.

- ``raw/packages/<name>.{md,rst,txt}``: the long description of every installed distribution, in its
  own format (``Description-Content-Type``; the packaging spec's default for a missing type is rst);
- ``raw/stdlib/<module>.txt``: the module docstring of every public standard-library module;
- ``raw/html/<module>.html``: an API page per module rendered from its docstrings (module, classes,
  functions), so that the HTML reader runs on real markup;
- ``finetune/classification.jsonl``: a passage → the kind of documentation it comes from: ``readme``
  (a package's description), ``module`` (a module docstring) or ``api`` (a function or class docstring
  with its signature), the question a documentation router answers;
- ``finetune/summarisation.jsonl``: description → ``Summary``;
- ``prompts/prompts.jsonl``: questions about a few of those packages and modules, the input of the
  ``batch_inference`` asset (``demo_prompts``);
- ``preferences/pairs.jsonl``: what a package is for, answered with its ``Summary`` (chosen) or with a
  non-answer (rejected): the pairs of the demo's preference-tuning round (``demo_preferences``).

Everything is read from metadata and source files, never by importing pure-Python modules (imports
have side effects: ``antigravity`` opens a browser), and written in sorted order with no timestamps, so
the same Python and the same locked packages give byte-identical files on every machine.
"""

from __future__ import annotations

import ast
import hashlib
import html
import importlib.metadata as metadata
import importlib.util
import inspect
import json
import platform
import re
import site
import sys
from collections.abc import Iterator
from pathlib import Path

from lmforge.formats import markdown_to_text, rst_to_text, tidy_lines

#: Distributions left out: this project itself (its README changes with every commit), and the
#: documentation toolchain (MkDocs and what it pulls in), the OpenAI client that tests ``lmforge serve`` (with its
#: two dependencies) and the cluster engine (Ray with what it pulls in), so that tooling added later does not change
#: the corpus or the demo's numbers.
EXCLUDED_DISTRIBUTIONS = {
    "lmforge",
    "mkdocs", "mkdocs-material", "mkdocs-get-deps", "mkdocs-material-extensions", "pymdown-extensions", "babel", "backrefs",
    "colorama", "ghp-import", "mergedeep", "paginate", "pathspec", "pyyaml-env-tag",
    "openai", "jiter", "sniffio",
    "ray", "aiohttp-cors", "colorful", "distlib", "google-api-core", "googleapis-common-protos", "msgpack", "opencensus",
    "opencensus-context", "opentelemetry-exporter-prometheus", "prometheus-client", "proto-plus", "py-spy",
    "python-discovery", "smart-open", "tenacity", "tensorboardx", "virtualenv", "wrapt",
    "trl", "optuna", "optuna-integration", "colorlog",
}
#: Standard-library modules left out: with setuptools installed, looking up ``distutils`` imports
#: setuptools' own copy, which is neither the standard library nor free of side effects.
EXCLUDED_MODULES = {"distutils"}
MANIFEST = "demo-manifest.json"
#: Classification examples taken from one document (package or module) at most: keeps the classes balanced.
PASSAGES_PER_DOCUMENT = 3

_EXT = {"text/markdown": ".md", "text/x-rst": ".rst", "text/plain": ".txt"}

#: The demo's batch-inference prompts: questions about this many packages and standard-library modules
#: (SmolLM2-135M answers 16 prompts of 24 tokens in batches of 8 in well under a minute on 2 cores).
PROMPT_PACKAGES, PROMPT_MODULES = 12, 4
PACKAGE_QUESTIONS = (
    "What is the Python package {name} used for? Answer in one sentence.",
    "Give one reason a developer would install the Python package {name}.",
    "How do you install the Python package {name}?",
)
MODULE_QUESTION = "What does the Python standard library module {name} do? Answer in one sentence."


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions() -> Iterator[tuple[str, metadata.PackageMetadata]]:
    """Installed distributions, one per normalised name, in sorted order."""
    seen: dict[str, metadata.PackageMetadata] = {}
    # the site-packages directories only: sys.path may also hold vendored copies added at run time
    paths = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    for dist in metadata.distributions(path=paths):
        name = _normalise(dist.metadata["Name"] or "")
        if name and name not in EXCLUDED_DISTRIBUTIONS and name not in seen:
            seen[name] = dist.metadata
    yield from sorted(seen.items())


def description(meta: metadata.PackageMetadata) -> tuple[str, str]:
    """(long description, file suffix by its content type)."""
    body = meta.get_payload() if hasattr(meta, "get_payload") else None  # type: ignore[attr-defined]
    text = (body or meta.get("Description") or "").replace("\r\n", "\n")
    content_type = (meta.get("Description-Content-Type") or "text/x-rst").split(";")[0].strip().lower()
    return text, _EXT.get(content_type, ".txt")


def as_plain_text(text: str, suffix: str) -> str:
    return {".md": markdown_to_text, ".rst": rst_to_text}.get(suffix, tidy_lines)(text)


def passages(text: str, min_words: int = 30, limit: int = PASSAGES_PER_DOCUMENT) -> list[str]:
    """Up to ``limit`` paragraphs of at least ``min_words`` words, whitespace-normalised: classification
    examples.  The task splits by source document, so no document is on both sides of the train/test line."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paragraphs if len(p.split()) >= min_words][:limit]


# --------------------------------------------------------------------------------------------------
# Standard library docstrings
# --------------------------------------------------------------------------------------------------


def stdlib_docs(module: str) -> tuple[str, list[tuple[str, str]]] | None:
    """(module docstring, [(member signature, docstring)]) of a public stdlib module, or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    if spec.origin.endswith(".py"):
        return _docs_from_source(Path(spec.origin))
    if spec.origin == "built-in" or spec.origin.endswith((".so", ".pyd")):
        return _docs_from_extension(module)
    return None


def _docs_from_source(path: Path) -> tuple[str, list[tuple[str, str]]] | None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None
    members = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                sig = node.name if isinstance(node, ast.ClassDef) else f"{node.name}({ast.unparse(node.args)})"
                members.append((sig, doc))
    return ast.get_docstring(tree) or "", members


def _docs_from_extension(module: str) -> tuple[str, list[tuple[str, str]]] | None:
    """Compiled modules have no source: import them (they have no import-time side effects)."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # an optional extension missing from this build
        return None
    members = []
    for name in sorted(vars(mod)):
        obj = getattr(mod, name)
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        doc = inspect.getdoc(obj)
        if doc and getattr(obj, "__module__", module) in (module, None):
            members.append((name, doc))
    return inspect.getdoc(mod) or "", members


def render_html(module: str, doc: str, members: list[tuple[str, str]]) -> str:
    """A small API reference page, the way documentation generators lay one out."""

    def paragraphs(text: str) -> str:
        return "\n".join(f"<p>{html.escape(p.strip())}</p>" for p in re.split(r"\n\s*\n", text) if p.strip())

    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{module} — Python standard library</title>',
        "<style>body{font-family:sans-serif;max-width:50em}code{background:#eee}</style></head><body>",
        f"<nav><a href=\"index.html\">Index</a> › {module}</nav>",
        f"<h1>The <code>{module}</code> module</h1>",
        paragraphs(doc),
    ]
    for sig, member_doc in members:
        anchor = sig.split("(")[0]
        parts += [f'<h2 id="{anchor}"><code>{html.escape(sig)}</code></h2>', paragraphs(member_doc)]
    parts.append("<footer>Rendered from the module's docstrings by lmforge demo-corpus.</footer></body></html>")
    return "\n".join(parts) + "\n"


def demo_prompts(packages: list[str], modules: list[str], n_packages: int = PROMPT_PACKAGES, n_modules: int = PROMPT_MODULES) -> list[dict]:
    """Questions about ``n_packages`` of the packages and ``n_modules`` of the modules, picked by the hash
    of their names (spread over the alphabet, and unchanged when other packages come and go), each with
    a stable id."""

    def pick(names: list[str], n: int) -> list[str]:
        return sorted(sorted(set(names), key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:n])

    rows = [{"id": f"package-{name}", "prompt": PACKAGE_QUESTIONS[i % len(PACKAGE_QUESTIONS)].format(name=name), "source": f"packages/{name}"}
            for i, name in enumerate(pick(packages, n_packages))]
    rows += [{"id": f"module-{name}", "prompt": MODULE_QUESTION.format(name=name), "source": f"stdlib/{name}"} for name in pick(modules, n_modules)]
    return rows


#: The demo's preference pairs: this many packages' summaries, each preferred to a non-answer (what a user
#: who rates answers prefers first); SmolLM2-135M tunes on ~18 of them in well under a minute on 2 cores.
PREFERENCE_PAIRS = 24
NON_ANSWERS = (
    "I'm not sure what {name} does.",
    "{name} is a Python package.",
    "I don't know. You could look it up online.",
    "It is used for many things.",
)


def demo_preferences(summaries: list[dict], n: int = PREFERENCE_PAIRS) -> list[dict]:
    """``n`` packages (picked by the hash of their names, as ``demo_prompts`` picks): the question of
    what each is for, its one-line summary as the chosen answer and a non-answer as the rejected one."""
    picked = sorted(summaries, key=lambda r: hashlib.sha256(r["package"].encode()).hexdigest())[:n]
    return [{"prompt": PACKAGE_QUESTIONS[0].format(name=r["package"]), "chosen": r["summary"],
             "rejected": NON_ANSWERS[i % len(NON_ANSWERS)].format(name=r["package"])} for i, r in enumerate(sorted(picked, key=lambda r: r["package"]))]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")


def _jsonl(path: Path, rows: list[dict]) -> None:
    _write(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def build_demo_corpus(data_dir: Path, lock_file: Path | None = None) -> dict[str, int]:
    """Write the demo corpus under ``data_dir`` (``raw/``, ``finetune/``, ``prompts/``, ``preferences/``); return file counts."""
    raw = data_dir / "raw"
    counts = {"packages": 0, "stdlib": 0, "html": 0, "classification": 0, "summarisation": 0, "prompts": 0, "preferences": 0}
    classification, summarisation = [], []
    package_names, module_names = [], []
    for name, meta in distributions():
        text, suffix = description(meta)
        if not text.strip():
            continue
        _write(raw / "packages" / f"{name}{suffix}", text)
        counts["packages"] += 1
        package_names.append(name)
        plain = as_plain_text(text, suffix)
        classification += [{"source": f"packages/{name}", "text": t, "label": "readme"} for t in passages(plain)]
        summary = (meta.get("Summary") or "").strip()
        if summary and summary != "UNKNOWN" and plain:
            summarisation.append({"package": name, "document": plain, "summary": summary})
    for module in sorted(sys.stdlib_module_names):
        if module.startswith("_") or module in EXCLUDED_MODULES:
            continue
        docs = stdlib_docs(module)
        if docs is None:
            continue
        doc, members = docs
        classification += [{"source": f"stdlib/{module}", "text": t, "label": "module"} for t in passages(doc)]
        api = [f"{sig}\n{' '.join(member_doc.split())}" for sig, member_doc in members if len(member_doc.split()) >= 25]
        classification += [{"source": f"stdlib/{module}", "text": t, "label": "api"} for t in api[:PASSAGES_PER_DOCUMENT]]
        if doc.strip():
            _write(raw / "stdlib" / f"{module}.txt", doc)
            counts["stdlib"] += 1
            module_names.append(module)
        if doc.strip() or members:
            _write(raw / "html" / f"{module}.html", render_html(module, doc, members))
            counts["html"] += 1
    _jsonl(data_dir / "finetune" / "classification.jsonl", classification)
    _jsonl(data_dir / "finetune" / "summarisation.jsonl", summarisation)
    prompts = demo_prompts(package_names, module_names)
    _jsonl(data_dir / "prompts" / "prompts.jsonl", prompts)
    preferences = demo_preferences(summarisation)
    _jsonl(data_dir / "preferences" / "pairs.jsonl", preferences)
    counts["classification"], counts["summarisation"], counts["prompts"] = len(classification), len(summarisation), len(prompts)
    counts["preferences"] = len(preferences)
    manifest = {
        "python": platform.python_version(),
        "requirements_lock_sha256": hashlib.sha256(lock_file.read_bytes()).hexdigest() if lock_file and lock_file.exists() else None,
        "counts": counts,
    }
    _write(data_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return counts


def compare_with_data_dvc(root: Path) -> tuple[bool, str]:
    """Whether the corpus under ``root/data`` is the one the committed ``data.dvc`` records, and what to
    tell the user (empty when DVC or data.dvc is missing).  The demo corpus is built from the installed
    packages and this Python's standard library, so another machine can build another one: say so plainly."""
    import subprocess

    import yaml

    dvc_file = root / "data.dvc"
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc_file.exists() or not dvc.exists():
        return True, ""
    # `dvc data status` compares the workspace with data.dvc by content, whether or not the DVC cache
    # holds the data (on a fresh clone it does not, and plain `dvc status` reports that as a change)
    status = subprocess.run([str(dvc), "data", "status", "--json", "data"], cwd=root, capture_output=True, text=True)
    if status.returncode != 0:
        return False, f"note: could not compare with data.dvc: {status.stderr.strip()}"
    uncommitted = json.loads(status.stdout or "{}").get("uncommitted", {})
    if not any(changes for changes in uncommitted.values()):
        return True, "the corpus matches data.dvc byte for byte"
    recorded = (yaml.safe_load(dvc_file.read_text()) or {}).get("meta") or {}
    lock = root / "requirements.lock"
    lock_sha = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None
    reasons = []
    if recorded.get("python") and recorded["python"] != platform.python_version():
        reasons.append(f"data.dvc was recorded with Python {recorded['python']}, this is Python {platform.python_version()}")
    if recorded.get("requirements_lock_sha256") and recorded["requirements_lock_sha256"] != lock_sha:
        reasons.append("requirements.lock changed since data.dvc was recorded")
    return False, (
        "note: the demo corpus built here differs from the one recorded in data.dvc"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + ". It is made from the installed packages and the standard library of this Python, so another "
        "Python or other packages give other documents. Nothing is broken: every stage runs on the corpus "
        "built here. To version it, run 'dvc add data' and commit data.dvc."
    )
