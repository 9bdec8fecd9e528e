"""Helpers shared by the asset modules: run-config overrides, code versions, metadata rendering."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from typing import Any, Literal, Optional

import dagster as dg
import pydantic

from lmforge import codegraph, stages
from lmforge.params import REPO_ROOT, LmforgeError, Params, load_params, to_dict, with_overrides


def overrides_config(cls: type, name: str) -> type[dg.Config]:
    """A ``dg.Config`` class whose fields mirror dataclass ``cls`` with every field optional.

    Left empty, a field takes its value from ``params.yaml``; set in the launchpad (or in the run
    config of ``lmforge run``), it overrides that one value for that one run.  Fields that are lists of
    structures (ingest sources) are edited in ``params.yaml`` only.
    """
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            tp = overrides_config(tp, f"{name}{tp.__name__}")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            continue
        tp = _plain(tp)
        fields[f.name] = (Optional[tp], pydantic.Field(default=None, description=f"default: params.yaml ({_default(f)})"))
    return pydantic.create_model(name, __base__=dg.Config, **fields)


def _plain(tp: Any) -> Any:
    """Dagster config knows str/int/float/bool/lists/nested Config; a Literal becomes its base type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return _plain(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is list:
        return list[_plain(typing.get_args(tp)[0])]
    return tp


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    value = f.default_factory()  # type: ignore[misc]
    return "…" if dataclasses.is_dataclass(value) else repr(value)


def stage_params(params: Params, stage: str, config: dg.Config) -> Params:
    """``params`` with the non-empty fields of a stage's run config applied to ``params.<stage>``."""
    overrides = config.model_dump(exclude_none=True)
    overrides = _drop_empty(overrides)
    if not overrides:
        return params
    return dataclasses.replace(params, **{stage: with_overrides(getattr(params, stage), overrides)})


def _drop_empty(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_empty(v)
            if not v:
                continue
        out[k] = v
    return out


@functools.cache
def _params_in_force() -> Params:
    """params.yaml as the code location loads it (once: every asset's decorator asks for it)."""
    return load_params()


def declared(stage: str, *observed: Any) -> dict[str, Any]:
    """The arguments of ``@dg.asset`` that the stage's declaration (``Stage(...)``, ``lmforge.stages``)
    settles: its group, its upstream assets (``observed``: source assets it reads, such as the raw
    documents, then the stages it reads) and its code version."""
    spec = stages.get(stage)
    return {"group_name": spec.group, "deps": [*observed, *spec.upstream], "code_version": code_version(stage)}


def code_version(stage: str, params: Params | None = None) -> str:
    """A hash of everything but data that the stage ``stage`` depends on: the project files its code
    imports (``lmforge.codegraph``: the import closure of its asset and check functions), the other
    repository files it declares outside ``data/`` (prompt templates), and the values of its declared
    ``params`` keys, plus ``paths``.

    ``params`` are the values a run used (its tier, its run config); by default, ``params.yaml`` with
    the size tier in force (``$LMFORGE_TIER``).  Dagster marks an asset stale when its code version
    changes, so an edit of the code or of params.yaml shows up in the UI (after "Reload definitions");
    ``dvc.yaml`` is written from the same declaration and import closure, so both front doors agree on
    "changed".
    """
    spec = stages.get(stage)
    h = hashlib.sha256()
    for path in codegraph.stage_files(stage):
        h.update(codegraph.relative([path])[0].encode() + b"\0" + path.read_bytes())
    for dep in spec.files:
        if dep.startswith("data/"):
            continue
        path = REPO_ROOT / dep
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                h.update(file.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + file.read_bytes())
    try:
        values = to_dict(params if params is not None else _params_in_force())
    except LmforgeError as exc:  # the run reports it; the version just has to differ from a valid one
        return "invalid-params-" + hashlib.sha256(str(exc).encode()).hexdigest()[:8]
    for key in ["paths", *spec.params]:
        value: Any = values
        for part in key.split("."):
            value = value[part]
        h.update(key.encode() + b"\0" + json.dumps(value, sort_keys=True).encode())
    return h.hexdigest()[:12]


#: Metadata of every materialization: the artifacts directory it wrote and the stage's version as run
#: (``code_version`` with the run's params).  ``lmforge run`` judges staleness per artifacts directory
#: from them (``dagster_project.staleness``), so runs of another params file or tier do not interfere.
ARTIFACTS_KEY = "lmforge/artifacts"
VERSION_KEY = "lmforge/version"
RAW_KEY = "lmforge/raw_documents"


def materialized(stage: str, params: Params, metadata: dict[str, Any], *, raw_documents: str | None = None,
                 check_results: list[dg.AssetCheckResult] | None = None) -> dg.MaterializeResult:
    """The stage's ``MaterializeResult``: its metadata plus where and with which version it was made
    (and, for ``ingest``, the fingerprint of the raw documents it read)."""
    provenance = {ARTIFACTS_KEY: str(params.artifacts), VERSION_KEY: code_version(stage, params)}
    if raw_documents is not None:
        provenance[RAW_KEY] = raw_documents
    return dg.MaterializeResult(metadata={**metadata, **provenance}, check_results=check_results)


def md_table(rows: list[dict[str, Any]] | dict[str, Any], headers: tuple[str, str] = ("", "")) -> str:
    """A markdown table from a list of dicts, or from a mapping as two columns."""
    if isinstance(rows, dict):
        rows = [{headers[0]: k, headers[1]: v} for k, v in rows.items()]
    if not rows:
        return "_none_"
    cols = list(dict.fromkeys(c for r in rows for c in r))  # rows may differ: a search trial killed before its values were drawn has none
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "…"


def sample_rows(ds, n: int = 5, columns: tuple[str, ...] = ("id", "path", "format", "text")) -> str:
    """The first ``n`` rows of a dataset as a markdown table (text truncated)."""
    if len(ds) == 0:
        return "_empty_"
    head = ds.select(range(min(n, len(ds)))).select_columns(list(columns)).to_list()
    return md_table(head)


def inline_png(path, caption: str) -> dg.MetadataValue:
    """A PNG shown in the Dagster UI (inline data URL), with the file's path under it."""
    import base64

    data = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{caption}](data:image/png;base64,{data})\n\n`{path}`")


def summary_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    """Numbers of a summary as Dagster metadata (plotted over time in the UI)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
