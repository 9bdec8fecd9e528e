"""The reference pages generated from the code, committed so that they read on GitHub as on the site.

A page holds hand-written text and one generated block, which ``lmforge docs`` rewrites (``--check``:
a test fails when the block is stale, so it can never drift from the code)::

    <!-- generated: NAME ... -->
    ...the generated Markdown...
    <!-- end generated -->

- ``configuration`` (docs/configuration.md): every section and key of ``params.yaml`` from the
  dataclasses of ``lmforge/params/sections.py`` (and those it imports, such as
  ``models/train_config.py``): type, default, the value ``params.yaml`` sets when it differs, and the
  comments of the source that say why (read from the file that defines each class, wherever that is);
- ``cli`` (docs/cli.md): every command of the Typer app ``dagster_project.cli.app``, read by
  introspection of its Click-style command objects (usage, help, arguments and options);
- ``modules`` (docs/modules.md): every module of the code folders, one line each, from its docstring.

The MkDocs hook (``docs/hooks.py``) only checks that the blocks are current.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
import types
import typing
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.params import BASE_TIER, LmforgeError, Params, load_params, tier_names

#: The checkout this code was loaded from: its params.yaml and docs/ are the ones described and written.
ROOT = Path(__file__).resolve().parents[1]
#: ``lmforge --help`` in an 80-column terminal: the usage lines wrap the same on every machine.
HELP_WIDTH = 78
END = "<!-- end generated -->"

#: References to sections of the old README in source comments: the docs pages replace them.
_README_REF = re.compile(r"\s*\(?(see )?README \"[^\"]*\"\)?")


# --------------------------------------------------------------------------------------------------
# Markdown helpers
# --------------------------------------------------------------------------------------------------


def escape(text: str, inline: bool = True) -> str:
    """Text for Markdown (a table cell when ``inline``): reST ````code```` made Markdown, code spans kept,
    elsewhere <, >, *, | escaped; references to sections of the old README dropped."""
    text = _README_REF.sub("", text.replace("``", "`")).strip()
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span
            out.append(part.replace("|", "\\|") if inline else part)
        else:
            part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
            out.append(part.replace("|", "\\|") if inline else part)
    return "".join(out).replace("\n", " ") if inline else "".join(out)


def code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


# --------------------------------------------------------------------------------------------------
# Configuration reference (lmforge/params/sections.py)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _source_comments(path: str) -> tuple[dict[int, str], dict[int, str], ast.Module]:
    """(trailing comments by line, full-line comments by line, the module's AST) of a source file."""
    source = Path(path).read_text(encoding="utf-8")
    trailing: dict[int, str] = {}
    whole: dict[int, str] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            text = tok.string.lstrip("#").strip()
            if lines[line - 1][: tok.start[1]].strip():
                trailing[line] = text
            else:
                whole[line] = text
    return trailing, whole, ast.parse(source)


@dataclasses.dataclass
class FieldDoc:
    name: str
    type: Any
    default: Any
    comment: str


def _field_comments(cls: type) -> tuple[str, dict[str, str]]:
    """The docstring of ``cls`` as written in its source, and each field's comments: the block of comment
    lines right above it and the comments on its own lines."""
    trailing, whole, tree = _source_comments(inspect.getsourcefile(cls))
    node = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__), None)
    if node is None:
        return "", {}
    comments = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line in whole:
            above.insert(0, whole[line])
            line -= 1
        own = [trailing[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in trailing]
        comments[stmt.target.id] = " ".join(above + own)
    return ast.get_docstring(node) or "", comments


@lru_cache(maxsize=None)
def class_docs(cls: type) -> tuple[str, tuple[FieldDoc, ...]]:
    """The class docstring (only one written in the source, not the signature dataclasses make up) and
    each field, in order, with its type, default and comments (inherited fields: from the base class)."""
    doc, comments = _field_comments(cls)
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            for name, comment in _field_comments(base)[1].items():
                comments.setdefault(name, comment)
    hints = typing.get_type_hints(cls)
    docs = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        docs.append(FieldDoc(f.name, hints[f.name], default, comments.get(f.name, "")))
    return doc, tuple(docs)


def type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "`null`"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "section"
    if origin is Literal:
        return "one of " + ", ".join(code(value_text(a)) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in inner)
        return text + " or `null`" if len(inner) < len(args) else text
    if origin is list:
        inner = type_text(args[0])
        return f"list of ({inner})" if inner.startswith("one of") else f"list of {inner}"
    if origin is dict:
        key, value = args if args else (Any, Any)
        return "mapping" if value is Any else f"mapping of {type_text(key)} to {type_text(value)}"
    return getattr(tp, "__name__", str(tp))


def value_text(value: Any) -> str:
    """A value as it is written in YAML (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        word = r"[A-Za-z0-9_./][A-Za-z0-9_./@+*:-]*"
        plain = re.fullmatch(rf"{word}( {word})*", value) and ": " not in value and not value.endswith(":")
        looks_typed = value.lower() in ("null", "true", "false", "yes", "no", "on", "off") or re.fullmatch(r"[-+.0-9eE_]+", value)
        if plain and not looks_typed:
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        return value_text(dataclasses.asdict(value))
    return str(value)


def _shown(value: Any, tp: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    inner = typing.get_args(tp)
    if typing.get_origin(tp) is list and inner and dataclasses.is_dataclass(inner[0]):
        names = [getattr(v, "name", None) for v in value]
        entries = f"{len(value)} entr{'y' if len(value) == 1 else 'ies'}"
        return f"{entries}: " + ", ".join(code(n) for n in names) if all(names) else entries
    text = value_text(value)
    return code(text if len(text) <= 80 else text[:77] + "…")


def params_yaml_comments(path: Path) -> dict[str, str]:
    """Comments of params.yaml by dotted key (mapping keys only: list entries and tiers are left out)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    list_indent: int | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if list_indent is not None and indent >= list_indent:
            continue
        list_indent = None
        if stripped.startswith("- "):
            list_indent = indent
            continue
        match = re.match(r"([A-Za-z_][\w-]*):(.*)$", stripped)
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(1)))
        key = ".".join(k for _, k in stack)
        comment = _yaml_comment(match.group(2))
        if comment and not key.startswith("tiers"):
            comments[key] = comment
    return comments


def _yaml_comment(rest: str) -> str:
    """The comment after a YAML value: the first # after whitespace, outside quoted scalars."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'" and (i == 0 or rest[i - 1] in " [{,"):
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[i + 1 :].strip()
    return ""


def configuration_reference(params_path: Path | None = None) -> str:
    params_path = params_path or ROOT / "params.yaml"
    current = load_params(params_path, tier=BASE_TIER)
    yaml_comments = params_yaml_comments(params_path)
    out: list[str] = []

    def table(cls: type, path: str, value: Any, level: int) -> None:
        doc, fields = class_docs(cls)
        title = f"`{path}`" if "[]" not in path else f"each entry of `{path[:-2]}`"
        out.append(f"{'#' * level} {title} {{ #{anchor(path)} }}\n")
        intro = doc or yaml_comments.get(path, "")
        if intro:
            out.append(escape(intro, inline=False) + "\n")
        out.append(f"Defined by `{cls.__name__}` in `{Path(inspect.getsourcefile(cls)).relative_to(ROOT)}`.\n")
        out.append("| key | type | default | params.yaml | what |\n|---|---|---|---|---|")
        nested = []
        for f in fields:
            key = f"{path}.{f.name}"
            inner = typing.get_args(f.type)
            if dataclasses.is_dataclass(f.type):
                kind, nested_cls, child = f"section: [`{key}`](#{anchor(key)})", f.type, key
            elif typing.get_origin(f.type) is list and inner and dataclasses.is_dataclass(inner[0]):
                kind, nested_cls, child = f"list of entries: [`{key}[]`](#{anchor(key + '[]')})", inner[0], key + "[]"
            else:
                kind, nested_cls, child = type_text(f.type), None, None
            here = getattr(value, f.name) if value is not None else None
            default = "" if nested_cls is f.type else _shown(f.default, f.type)
            differs = value is not None and nested_cls is not f.type and value_text(here) != value_text(f.default)
            comment = f.comment or yaml_comments.get(key, "")
            out.append(f"| `{f.name}` | {kind} | {default} | {_shown(here, f.type) if differs else ''} | {escape(comment)} |")
            if nested_cls is not None:
                nested.append((nested_cls, child, here if nested_cls is f.type else None))
        out.append("")
        for nested_cls, child, child_value in nested:
            table(nested_cls, child, child_value, min(level + 1, 4))

    hints = typing.get_type_hints(Params)
    for section in dataclasses.fields(Params):
        table(hints[section.name], section.name, getattr(current, section.name), 3)

    tiers = [t for t in tier_names(params_path) if t != BASE_TIER]
    if tiers:
        overlays = (yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}).get("tiers") or {}
        out.append("### Size tiers { #tiers }\n")
        out.append(f"`tiers:` in `params.yaml` overrides these sections for a tier (`lmforge run --tier NAME`); "
                   f"`{BASE_TIER}` is the file as it is.\n")
        out.append("| tier | overrides |\n|---|---|")
        for name in tiers:
            out.append(f"| `{name}` | " + ", ".join(code(s) for s in overlays.get(name) or {}) + " |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# CLI reference (dagster_project.cli.app)
# --------------------------------------------------------------------------------------------------


def cli_commands() -> list[tuple[str, Any, Any]]:
    """(command path, command, context) for the app and every command under it, depth first."""
    import typer

    from dagster_project.cli import app  # here: the app's `lmforge docs` imports this module

    root = typer.main.get_command(app)
    found = []

    def walk(command: Any, name: str, parent: Any) -> None:
        ctx = command.context_class(command, info_name=name, parent=parent, terminal_width=HELP_WIDTH)
        found.append((ctx.command_path, command, ctx))
        if hasattr(command, "list_commands"):
            for sub in command.list_commands(ctx):
                child = command.get_command(ctx, sub)
                if child is not None and not getattr(child, "hidden", False):
                    walk(child, sub, ctx)

    walk(root, "lmforge", None)
    return found


def _relative(text: str) -> str:
    """Help texts show defaults computed on this machine: make its checkout's path relative."""
    return text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")


def cli_reference() -> str:
    out: list[str] = []
    for path, command, ctx in cli_commands():
        level = "###" if path.count(" ") <= 1 else "####"
        out.append(f"{level} `{path}` {{ #{anchor(path)} }}\n")
        usage = command.get_usage(ctx).replace("Usage: ", "", 1)
        out.append(f"```\n{_relative(usage)}\n```\n")
        help_text = inspect.cleandoc(command.help or "")
        paragraphs = [" ".join(line for line in p.splitlines() if line.strip() != "\b") for p in help_text.split("\n\n")]
        out.extend(escape(p) + "\n" for p in paragraphs if p.strip())
        if hasattr(command, "list_commands"):
            subs = [(n, command.get_command(ctx, n)) for n in command.list_commands(ctx)]
            out.append("| command | what |\n|---|---|")
            for name, sub in subs:
                if sub is not None and not getattr(sub, "hidden", False):
                    short = sub.get_short_help_str(limit=120) if hasattr(sub, "get_short_help_str") else ""
                    out.append(f"| [`{name}`](#{anchor(path + ' ' + name)}) | {escape(short)} |")
            out.append("")
        rows = []
        for param in command.get_params(ctx):
            if getattr(param, "hidden", False) or param.name == "help":
                continue
            record = param.get_help_record(ctx)
            if record is None:
                continue
            names, help_ = record
            rows.append(f"| {code(_relative(names))} | {escape(_relative(help_))} |")
        if rows:
            out.append("| argument / option | what |\n|---|---|")
            out.extend(rows)
            out.append("")
    return "\n".join(out)


# Module map
# --------------------------------------------------------------------------------------------------

#: The folders of code, in the order a newcomer follows a stage: from the Dagster graph to the tensor math;
#: then the tests, whose folders mirror the packages (tests of the whole project at the top).
CODE_FOLDERS = ("dagster_project", "dagster_project/cli", "dagster_project/checks", "assets", "lmforge", "lmforge/params", "lmforge/serving", "models",
                "benchmarks", "tests", "tests/dagster_project", "tests/lmforge", "tests/lmforge/serving", "tests/models")


def _first_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    match = re.match(r"(.+?\.)(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def module_map(root: Path = ROOT) -> str:
    """Every module of the code folders with the first sentence of its docstring (nanochat's file map)."""
    lines = []
    for folder in CODE_FOLDERS:
        lines += [f"### `{folder}/`", "", "| module | what it is |", "|---|---|"]
        for path in sorted((root / folder).glob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            if not doc:
                raise LmforgeError(f"{path.relative_to(root)} has no docstring: say in one sentence what the module is for")
            lines.append(f"| `{path.name}` | {escape(_first_sentence(doc))} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The pages
# --------------------------------------------------------------------------------------------------

#: Each page with a generated block: the block's name and what fills it.
PAGES: dict[Path, tuple[str, Callable[[], str]]] = {
    ROOT / "docs" / "configuration.md": ("configuration", configuration_reference),
    ROOT / "docs" / "cli.md": ("cli", cli_reference),
    ROOT / "docs" / "modules.md": ("modules", module_map),
}


def begin(name: str) -> str:
    """The opening marker of block ``name``, telling a reader of the Markdown how it is made."""
    return f"<!-- generated: {name} (written by `lmforge docs` from the code: edit the code, not this) -->"


def with_block(markdown: str, name: str, text: str) -> str:
    """``markdown`` with its block ``name`` holding ``text``; the hand-written rest is kept as it is."""
    block = re.compile(rf"^<!-- generated: {re.escape(name)}\b.*?-->$.*?^{re.escape(END)}$", re.S | re.M)
    found = len(block.findall(markdown))
    if found != 1:
        raise LmforgeError(f"expected one block from `<!-- generated: {name}` to `{END}`, found {found}")
    return block.sub(lambda _: f"{begin(name)}\n\n{text.strip()}\n\n{END}", markdown)


def pages() -> dict[Path, str]:
    """Each page of ``PAGES`` as ``lmforge docs`` writes it."""
    wanted = {}
    for path, (name, generate) in PAGES.items():
        try:
            wanted[path] = with_block(path.read_text(encoding="utf-8"), name, generate())
        except LmforgeError as exc:
            raise LmforgeError(f"{path}: {exc}") from None
    return wanted


def stale(wanted: dict[Path, str]) -> list[Path]:
    """The pages whose file differs from ``wanted``."""
    return [path for path, text in wanted.items() if path.read_text(encoding="utf-8") != text]
