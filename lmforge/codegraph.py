"""Which project files a stage's code is made of, read from the source with ``ast``.

A stage is out of date when any code it runs changed, so its code version (Dagster) and its ``deps``
(``dvc.yaml``) must name every project module it imports, transitively, and nothing else.  Lists kept
by hand drift (a helper module gets imported and nobody adds it), so they are computed here:

- the stage's **asset function** (or its ``stage_asset(...)`` call) and the **check functions** that target it are followed name by
  name inside their own module (the module-level imports, constants and helpers they use), so two
  assets that share a module do not share each other's imports;
- from the project modules reached that way, every ``import`` anywhere in a module (function-level
  imports included) is followed to a fixpoint: below the asset modules the unit is the file;
- the asset and check modules themselves count as a whole: an edit anywhere in ``assets/deploy.py``
  makes all of its assets out of date, as DVC (which sees files, not functions) would.

Nothing here imports the code it reads, so it can judge another copy of the project (``root``) too.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

#: The project's top-level packages: imports of anything else (torch, dagster) are not followed.
PACKAGES = ("assets", "dagster_project", "lmforge", "models")
#: The checkout this code was loaded from.
CODE_ROOT = Path(__file__).resolve().parents[1]
#: Where asset and asset-check functions are defined.
DEFINITION_DIRS = ("assets", "dagster_project/checks")


def module_file(name: str, root: Path = CODE_ROOT) -> Path | None:
    """``lmforge.stages`` → ``<root>/lmforge/stages.py``; a package (``lmforge.params``) → its ``__init__.py``;
    None outside the project."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = CODE_ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_names(node: ast.AST, importer: str, is_package: bool = False) -> set[str]:
    """Every dotted name imported anywhere inside ``node`` (functions included), relative imports
    resolved against the module ``importer`` (a package's ``__init__`` if ``is_package``);
    ``from pkg import mod`` names both ``pkg`` and ``pkg.mod``."""
    found: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative import: `from . import x` in a.b.c means a.b
                package = importer.split(".") if is_package else importer.split(".")[:-1]
                base = ".".join([*package[: len(package) - n.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in n.names)
    return found


def _imported(node: ast.AST, importer: str, root: Path) -> set[str]:
    """The project modules among ``imported_names``."""
    is_package = module_file(importer, root).name == "__init__.py"
    return {m for m in imported_names(node, importer, is_package) if module_file(m, root) is not None}


def _with_parents(module: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


@functools.cache
def _module_imports(name: str, root: Path) -> frozenset[str]:
    """The project modules the module ``name`` imports anywhere in its file, with their parent packages.
    Cached like ``_tree``: every stage's closure walks the same shared modules (params, artifacts, ...),
    and reading them once per process, not once per stage, is most of what loading the assets costs."""
    return frozenset(p for m in _imported(_tree(module_file(name, root)), name, root) for p in _with_parents(m))


def module_closure(modules: set[str], root: Path = CODE_ROOT) -> set[Path]:
    """The files of ``modules`` and of every project module they import, transitively."""
    seen: set[str] = set()
    todo = [p for m in modules for p in _with_parents(m)]
    while todo:
        name = todo.pop()
        if name in seen or module_file(name, root) is None:
            continue
        seen.add(name)
        todo.extend(_module_imports(name, root))
    return {module_file(m, root) for m in seen}


def _bound_names(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement defines (``import a.b`` binds ``a``)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _dotted(node: ast.AST) -> str | None:
    """``lmforge.compress.run_quantize`` for that attribute chain; None if it does not start with a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _used_modules(tree: ast.Module, roots: list[ast.stmt], importer: str, root: Path) -> set[str]:
    """Project modules that the top-level statements ``roots`` use, following the module's own names:
    ``import lmforge.compress`` counts only where ``lmforge.compress.…`` is used, not every ``lmforge.…``."""
    defined: dict[str, list[ast.stmt]] = {}
    for stmt in tree.body:
        for name in _bound_names(stmt):
            defined.setdefault(name, []).append(stmt)
    modules: set[str] = set()
    reached: set[int] = set()
    todo = list(roots)
    while todo:
        stmt = todo.pop()
        if id(stmt) in reached:
            continue
        reached.add(id(stmt))
        if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
            modules |= _imported(stmt, importer, root)  # imports inside functions
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                for target in defined.get(node.id, []):
                    if isinstance(target, ast.Import):
                        continue  # `import a.b`: resolved below from the whole dotted use
                    todo.append(target)
            dotted = _dotted(node) if isinstance(node, (ast.Attribute, ast.Name)) else None
            if dotted:
                parts = dotted.split(".")
                for i in range(len(parts), 0, -1):  # the longest imported module the use starts with
                    prefix = ".".join(parts[:i])
                    if any(isinstance(s, ast.Import) and prefix in {a.name for a in s.names} for s in defined.get(parts[0], [])):
                        modules.add(prefix)
                        break
    return {m for m in modules if module_file(m, root) is not None}


def _targets(decorator: ast.expr) -> set[str]:
    """Asset names a check decorator targets: ``asset="clean"`` or ``asset=clean`` anywhere inside it."""
    found = set()
    for node in ast.walk(decorator):
        if isinstance(node, ast.keyword) and node.arg == "asset":
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.add(node.value.value)
            elif isinstance(node.value, ast.Name):
                found.add(node.value.id)
    return found


def _decorator_name(decorator: ast.expr) -> str:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (_dotted(node) or "").rsplit(".", 1)[-1]


def _made_by_factory(stmt: ast.stmt) -> str | None:
    """The stage of ``<name> = stage_asset("<stage>", ...)`` (``assets.factory``), else None."""
    if not (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call) and _decorator_name(stmt.value) == "stage_asset"):
        return None
    first = stmt.value.args[0] if stmt.value.args else None
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


@functools.cache
def definitions(root: Path = CODE_ROOT) -> dict[str, dict[str, list]]:
    """``{stage: {"asset": [(file, statement)], "checks": [(file, function)]}}`` for every ``@asset`` function
    or ``stage_asset(...)`` assignment and every ``@asset_check``/``@multi_asset_check`` function under
    ``DEFINITION_DIRS``."""
    out: dict[str, dict[str, list]] = {}
    for directory in DEFINITION_DIRS:
        for path in sorted((root / directory).glob("*.py")):
            for stmt in _tree(path).body:
                made = _made_by_factory(stmt)
                if made:
                    out.setdefault(made, {"asset": [], "checks": []})["asset"].append((path, stmt))
                if not isinstance(stmt, ast.FunctionDef):
                    continue
                for decorator in stmt.decorator_list:
                    kind = _decorator_name(decorator)
                    if kind == "asset":
                        out.setdefault(stmt.name, {"asset": [], "checks": []})["asset"].append((path, stmt))
                    elif kind in ("asset_check", "multi_asset_check"):
                        for target in _targets(decorator):
                            out.setdefault(target, {"asset": [], "checks": []})["checks"].append((path, stmt))
    return out


@functools.cache
def stage_files(stage: str, root: Path = CODE_ROOT) -> tuple[Path, ...]:
    """Every project file the asset ``stage`` and its checks run: their modules, and the closure of the
    project modules those functions use.  Sorted, for hashing and for ``dvc.yaml``.  Cached, like the
    parsed sources: which files a stage imports is fixed for the life of a process (their bytes are not)."""
    found = definitions(root).get(stage)
    if not found or not found["asset"]:
        raise KeyError(f"no @asset function named '{stage}' under {', '.join(DEFINITION_DIRS)}")
    files: set[Path] = set()
    for path, function in found["asset"] + found["checks"]:
        name = module_name(path, root)
        files |= module_closure({name, *_used_modules(_tree(path), [function], name, root)}, root)
    return tuple(sorted(files))


def relative(files: tuple[Path, ...] | list[Path], root: Path = CODE_ROOT) -> list[str]:
    return [f.relative_to(root).as_posix() for f in files]
