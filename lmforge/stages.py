"""Every stage of the pipeline, declared once beside its logic, and what is made from the declarations.

A stage's module (``lmforge/split.py``, ...) declares it with ``Stage(...)``: its name, its Dagster
group, the params keys it reads, the outputs of other stages and the repository files it reads, and
what it writes.  From these declarations come:

- ``dvc.yaml``, written by ``lmforge dvc-yaml`` (a test fails when the committed file differs): each
  stage's deps are what it reads plus its code, the import closure ``lmforge.codegraph`` computes;
- each Dagster asset's group, upstream assets and code version (``assets/common.py``).

The declarations are read from the source with ``ast``, as ``lmforge.codegraph`` reads imports:
finding the stages runs none of their code (MLflow and torch load when a stage runs, not when the
Dagster code location or ``lmforge`` starts), and another copy of the project (``root``) can be read
as well.  So a declaration holds literals only: strings, numbers, booleans, tuples and ``Out(...)``.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmforge import codegraph
from lmforge.params import LmforgeError

#: Where DVC finds the artifacts: ``paths.artifacts`` of params.yaml, as dvc.yaml names them.
ARTIFACTS = "artifacts"
#: In a read or an output path of a per-candidate stage: the candidate's name (DVC's ``${item.name}``).
CANDIDATE = "{candidate}"


@dataclass(frozen=True)
class Out:
    """An output of a stage, relative to its directory (``""``: the whole directory)."""

    path: str
    cache: bool = True  # False: DVC records its hash but keeps no copy (small files, reports, derived weights)
    persist: bool = False  # True: DVC leaves it in place before the stage runs (a resumable output)


@dataclass(frozen=True)
class Stage:
    """One stage: a Dagster asset, a ``dvc.yaml`` stage, a directory ``<artifacts>/<name>``."""

    name: str
    group: str  # its Dagster asset group
    params: tuple[str, ...] = ()  # the params.yaml keys (sections or dotted) it reads: DVC params, code version
    reads: tuple[str, ...] = ()  # outputs of other stages: "split/train", "packed" (all of it), "pretrain/{candidate}/hf"
    files: tuple[str, ...] = ()  # repository files or folders it reads: "data/raw", "prompts/rag.txt"
    outs: tuple[Out | str, ...] = ()  # what it writes, besides summary.json (a string: an output DVC caches)
    per_candidate: bool = False  # one run per pretrain candidate (a Dagster partition, a DVC foreach stage)
    engines: tuple[str, ...] = ("local",)  # where its work can run: ("local", "ray") for a stage with a Ray Data path
    in_dvc: bool = True  # False: off the DVC pipeline (the note says why)
    note: str = ""  # why it is as it is: a comment above the stage in dvc.yaml

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages it reads from, in order: its Dagster asset's upstream assets."""
        return tuple(dict.fromkeys(read.split("/")[0] for read in self.reads))

    @property
    def outputs(self) -> tuple[Out, ...]:
        return tuple(o if isinstance(o, Out) else Out(o) for o in self.outs)

    def engine(self, data_engine: str) -> str:
        """Where this stage's work runs when the cluster section asks for ``data_engine``
        (``cluster.data_engine``): there if the stage can run there, else in this process."""
        return data_engine if data_engine in self.engines else "local"

    def dir(self) -> str:
        """Its directory as dvc.yaml names it."""
        return f"{ARTIFACTS}/{self.name}" + (f"/{CANDIDATE}" if self.per_candidate else "")


class StageError(LmforgeError):
    """A stage declaration that cannot be read, or that does not fit the others."""


_CONSTRUCTORS = {"Stage": Stage, "Out": Out}


def _literal(node: ast.AST, where: str):
    """The value of a declaration's argument: a literal, a tuple or list of them, or ``Out(...)``."""
    if isinstance(node, ast.Call):
        return _construct(node, where)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e, where) for e in node.elts)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise StageError(f"{where}: a stage declaration holds literals only (strings, numbers, booleans, tuples, Out(...)), "
                         f"not {ast.unparse(node)}") from None


def _construct(call: ast.Call, where: str):
    name = codegraph._dotted(call.func) or ""
    cls = _CONSTRUCTORS.get(name.rsplit(".", 1)[-1])
    if cls is None:
        raise StageError(f"{where}: a stage declaration holds literals only, not a call of {ast.unparse(call.func)}")
    try:
        return cls(*(_literal(a, where) for a in call.args), **{k.arg: _literal(k.value, where) for k in call.keywords})
    except TypeError as exc:
        raise StageError(f"{where}: {exc}") from None


def _declared_in(path: Path, root: Path) -> list[Stage]:
    """The ``NAME = Stage(...)`` statements at the top level of a module; the directories of other
    stages that the module's code opens must be among what they declare they read."""
    found = []
    tree = codegraph._tree(path)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call) and (codegraph._dotted(stmt.value.func) or "").rsplit(".", 1)[-1] == "Stage":
            found.append(_construct(stmt.value, f"{path.relative_to(root).as_posix()}:{stmt.lineno}"))
    declared = {name for stage in found for name in (stage.name, *stage.upstream)}
    for where, name in _stage_dirs_opened(tree):
        if found and name not in declared:
            raise StageError(f"{path.relative_to(root).as_posix()}:{where}: the code opens stage_dir(\"{name}\"), which no stage of "
                             f"this module declares it reads ({', '.join(s.name for s in found)}): add it to reads=")
    return found


def _stage_dirs_opened(tree: ast.Module) -> Iterable[tuple[int, str]]:
    """(line, stage) of every ``….stage_dir("<stage>")`` call: what a stage's code really opens, so that
    the declaration (and with it dvc.yaml's deps and the asset's upstream) cannot drift from it."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stage_dir"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def stages(root: Path = codegraph.CODE_ROOT) -> dict[str, Stage]:
    """Every declared stage by name, upstream before downstream (ties by name)."""
    return _stages(root)


@functools.cache
def _stages(root: Path) -> dict[str, Stage]:
    """``stages``, read once per process and root (``functools.cache`` would key ``stages()`` and
    ``stages(root)`` apart and read the declarations twice)."""
    declared: dict[str, Stage] = {}
    for path in sorted((root / "lmforge").glob("*.py")):
        for stage in _declared_in(path, root):
            if stage.name in declared:
                raise StageError(f"stage '{stage.name}' is declared twice (the second time in {path.relative_to(root).as_posix()})")
            declared[stage.name] = stage
    for stage in declared.values():
        for read in stage.reads:
            source = declared.get(read.split("/")[0])
            if source is None:
                raise StageError(f"stage '{stage.name}' reads '{read}': no stage '{read.split('/')[0]}' is declared")
            if CANDIDATE in read and not stage.per_candidate:
                raise StageError(f"stage '{stage.name}' reads '{read}' of one candidate: declare it per_candidate=True")
            if stage.in_dvc and not source.in_dvc:
                raise StageError(f"stage '{stage.name}' is in dvc.yaml but reads '{read}' of '{source.name}', which is not")
    ordered: dict[str, Stage] = {}
    while len(ordered) < len(declared):
        ready = sorted(s.name for s in declared.values() if s.name not in ordered and all(u in ordered for u in s.upstream if u != s.name))
        if not ready:
            raise StageError("the stages read each other in a cycle: " + ", ".join(sorted(set(declared) - set(ordered))))
        ordered[ready[0]] = declared[ready[0]]
    return ordered


def off_the_pipeline(root: Path = codegraph.CODE_ROOT) -> list[str]:
    """The stages declared ``in_dvc=False`` (the feedback and preference loops, the search): neither in
    ``dvc.yaml`` nor in what ``lmforge run`` and ``full_job`` compute; they run on their own or when asked."""
    return [name for name, stage in stages(root).items() if not stage.in_dvc]


def get(name: str, root: Path = codegraph.CODE_ROOT) -> Stage:
    try:
        return stages(root)[name]
    except KeyError:
        raise StageError(f"no stage '{name}' is declared (Stage(...) in lmforge/*.py)") from None


# --------------------------------------------------------------------------------------------------
# dvc.yaml
# --------------------------------------------------------------------------------------------------

HEADER = """\
# Written by `lmforge dvc-yaml` from the stages' declarations (`Stage(...)` in lmforge/*.py, docs/adding-a-stage.md):
# edit those and run it again, not this file (a test compares them).
# `dvc repro` runs the very same Dagster assets as the UI (`lmforge run --select <asset>`), so both
# front doors produce the same artifacts from the same params.yaml.  Each stage lists exactly its own
# data, code (the import closure of its asset and checks), parameters, outputs and metrics.  What a stage
# measures on the machine (timings) and its MLflow run ids go to timings.json, which .dvcignore hides, and artifacts name
# paths relative to the repository; `lmforge run` records the stages it ran in dvc.lock (`dvc commit`),
# so after it `dvc status` is clean and `dvc repro` runs nothing.
# Run it with the project's venv active (`make demo` builds it).
"""


def _item(path: str, **options: bool) -> list[str]:
    """One list entry of dvc.yaml, with its options (``cache: false``) below it."""
    set_options = {k: v for k, v in options.items() if v is not None}
    if not set_options:
        return [f"- {path}"]
    return [f"- {path}:", *(f"    {k}: {str(v).lower()}" for k, v in set_options.items())]


def _section(name: str, entries: list[list[str]]) -> list[str]:
    return [f"{name}:", *(f"  {line}" for entry in entries for line in entry)] if entries else []


def _dvc_body(stage: Stage, root: Path) -> list[str]:
    here = stage.dir()
    item = "${item.name}"

    def path(p: str) -> str:
        return p.replace(CANDIDATE, item)

    deps = [_item(path(f"{ARTIFACTS}/{r}")) for r in stage.reads] + [_item(f) for f in stage.files]
    deps += [_item(f) for f in codegraph.relative(codegraph.stage_files(stage.name, root), root)]
    outs = [_item(path(f"{here}/{o.path}" if o.path else here), cache=None if o.cache else False, persist=o.persist or None) for o in stage.outputs]
    whole = any(o.path == "" for o in stage.outputs)  # summary.json is inside an output
    metrics = [] if whole else [_item(path(f"{here}/summary.json"), cache=False)]
    cmd = f"lmforge run --select {stage.name}" + (f" --partition {item}" if stage.per_candidate else "")
    return [f"cmd: {cmd}", *_section("deps", deps), *_section("params", [_item(p) for p in stage.params]),
            *_section("outs", outs), *_section("metrics", metrics)]


def dvc_yaml(root: Path = codegraph.CODE_ROOT) -> str:
    """The text of ``dvc.yaml``: the stages in DVC, upstream first; the summaries of the stages run
    once (not per candidate) as the project's metrics (``dvc metrics show``)."""
    in_dvc = [s for s in stages(root).values() if s.in_dvc]
    lines = [HEADER.rstrip("\n"), "metrics:"]
    lines += [f"  - {ARTIFACTS}/{s.name}/summary.json" for s in in_dvc if not s.per_candidate]
    lines += ["", "stages:"]
    for stage in in_dvc:
        lines.append(f"  {stage.name}:")
        lines += [f"    # {line}" for line in stage.note.splitlines()]
        body = _dvc_body(stage, root)
        if stage.per_candidate:
            lines += ["    foreach: ${pretrain.candidates}", "    do:", *(f"      {line}" for line in body)]
        else:
            lines += [f"    {line}" for line in body]
        lines.append("")
    return "\n".join(lines)


def dvc_addresses(ran: Iterable[tuple[str, str | None]], candidates: list[str], root: Path = codegraph.CODE_ROOT) -> list[str]:
    """The ``dvc.yaml`` stages that (stage, partition) pairs a run materialized are: ``name``, or
    ``name@<index>`` for a candidate's (DVC names a ``foreach`` item by its index in the list); a stage
    not in DVC, or a candidate no longer in ``pretrain.candidates``, has none."""
    declared = stages(root)
    addresses = []
    for name, partition in ran:
        stage = declared.get(name)
        if stage is None or not stage.in_dvc:
            continue
        if not stage.per_candidate:
            addresses.append(name)
        elif partition in candidates:
            addresses.append(f"{name}@{candidates.index(partition)}")
    return list(dict.fromkeys(addresses))
