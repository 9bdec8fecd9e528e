"""The layering of the code, read from its imports: ``dagster_project/`` → ``assets/`` → ``lmforge/`` → ``models/``.

``models/`` is plain torch / transformers code usable from a notebook: it imports neither ``lmforge``
nor Dagster.  ``lmforge/`` holds the stage logic, callable without Dagster.  Imports inside functions
count as much as those at the top of a module: a lazy import is still a dependency, and a cycle that
a lazy import hides breaks the day someone moves it to the top.
"""

import ast
import os
from pathlib import Path

from conftest import REPO, run_command

from lmforge import codegraph

PACKAGES = ("models", "lmforge", "assets", "dagster_project")


def module_files() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package by its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """The dotted names module ``name`` (file ``path``) imports anywhere, as codegraph reads them."""
    return codegraph.imported_names(ast.parse(path.read_text(encoding="utf-8"), str(path)), name, path.name == "__init__.py")


def import_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports (``from a.b import c`` counts as ``a.b``, or as
    ``a.b.c`` when that is a module)."""
    modules = module_files()
    return {name: {n for n in imported_names(name, path) if n in modules and n != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_function_level_and_relative_imports(tmp_path: Path):
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text("import os\n\ndef f():\n    from models.loading import load_dir\n    from . import sibling\n    from .sub import x\n")
    assert imported_names("pkg.mod", source) == {
        "os", "models.loading", "models.loading.load_dir", "pkg", "pkg.sibling", "pkg.sub", "pkg.sub.x"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_models_has_no_import_cycle():
    graph = import_graph()
    models = {name: {n for n in deps if n.startswith("models.")} for name, deps in graph.items() if name.startswith("models.")}
    assert cycles(models) == []


def _top(name: str) -> str:
    return name.split(".")[0]


def _dagster(name: str) -> bool:
    """Dagster itself, its integrations (``dagster_*``) and the project's Dagster packages."""
    return _top(name).startswith("dagster") or _top(name) == "assets"


def test_models_imports_neither_lmforge_nor_dagster():
    for name, path in module_files().items():
        if _top(name) == "models":
            wrong = sorted(n for n in imported_names(name, path) if _top(n) == "lmforge" or _dagster(n))
            assert not wrong, f"{name} imports {', '.join(wrong)}: models/ is plain torch/transformers code"


def test_lmforge_does_not_import_dagster():
    for name, path in module_files().items():
        if _top(name) == "lmforge":
            wrong = sorted(n for n in imported_names(name, path) if _dagster(n))
            assert not wrong, f"{name} imports {', '.join(wrong)}: lmforge/ is stage logic callable without Dagster"


def test_assets_do_not_import_the_code_location():
    """``dagster_project/`` wires the assets into Definitions; an asset module reaching back up into it
    would make a cycle the day the wiring imports the asset by name."""
    for name, path in module_files().items():
        if _top(name) == "assets":
            wrong = sorted(n for n in imported_names(name, path) if _top(n) == "dagster_project")
            assert not wrong, f"{name} imports {', '.join(wrong)}: assets/ is imported by dagster_project/, not the other way"


def test_the_command_line_calls_stage_functions_only():
    """``lmforge generate``, ``eval``, ... parse options and call ``lmforge/``: loading and checking a
    model is stage logic the assets share, not something each front door does its own way."""
    for name, path in module_files().items():
        if name.startswith("dagster_project.cli"):
            wrong = sorted(n for n in imported_names(name, path) if _top(n) == "models")
            assert not wrong, f"{name} imports {', '.join(wrong)}: the CLI calls lmforge/ (stage functions), which calls models/"


def test_every_module_of_models_and_lmforge_imports_in_a_process_of_its_own():
    """Each module imported in turn, in a process where no module of this project was imported before
    (tests/preloaded.py's child: the libraries are there, lmforge's and models' own modules are not)."""
    names = sorted(n for n in module_files() if _top(n) in ("models", "lmforge"))
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    result = run_command([str(REPO / ".venv/bin/python"), "-c", code], REPO, dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
