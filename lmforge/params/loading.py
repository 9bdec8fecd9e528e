"""Plain data (parsed YAML, run config) to the section dataclasses, strictly, and the size tiers.

A key the data leaves out takes its dataclass's default; an unknown key, a value of the wrong type
or a value outside a ``Literal`` is a ``ParamsError`` naming its dotted path (with a suggestion for a
typo) instead of a silent fallback to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.params.errors import ParamsError
from lmforge.params.root import params_file
from lmforge.params.sections import Params


def read_yaml(path: Path) -> Any:
    """A YAML file's data, parsed by libyaml where PyYAML has it (~7× faster than the pure-Python parser, which
    took most of the ~0.1 s a params file costs to load; each asset of a run loads it)."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _describe(value: Any) -> str:
    return type(value).__name__


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types with a clear path."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise ParamsError(f"unknown key '{full}' ({hint})")
        kwargs[key] = _convert(hints[key], value, full)
    try:
        return cls(**kwargs)
    except ParamsError:
        raise
    except (TypeError, ValueError) as exc:  # __post_init__ validation of a stage
        raise ParamsError(f"{where or 'params'}: {exc}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {_describe(value)}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ParamsError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported parameter type {tp} at {where}")  # a bug in this module, not user input


#: The tier whose overlay ``load_params`` applies when none is named (``params.yaml`` itself is the demo tier).
BASE_TIER = "demo"


def current_tier() -> str:
    """The size tier in force: ``$LMFORGE_TIER`` (set by ``lmforge run --tier``) or the base tier."""
    return os.environ.get("LMFORGE_TIER") or BASE_TIER


def load_params(path: str | os.PathLike | None = None, tier: str | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """The params file as typed dataclasses, with the overlay of a size ``tier`` applied.

    ``tiers:`` in the file maps a tier name (tiny, gpu, ...) to overrides of any section, merged key
    by key (lists replace).  Every tier is validated on every load, so a typo in a tier nobody runs
    today is still reported at once, with its path.  ``overrides`` (nested, like the file) are merged
    over the tier's params last: a search trial's settings, exactly as its overlay file gives them.
    """
    path = Path(path) if path is not None else params_file()
    tier = tier or current_tier()
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = read_yaml(path) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {_describe(data)}")
    tiers = data.pop("tiers", None) or {}
    if not isinstance(tiers, dict):
        raise ParamsError(f"tiers: expected a mapping of tier name to overrides, got {_describe(tiers)}")
    built = {BASE_TIER: build(Params, data, "")}
    for name, overlay in tiers.items():
        if not isinstance(overlay, dict):
            raise ParamsError(f"tiers.{name}: expected a mapping of overrides, got {_describe(overlay)}")
        try:
            built[name] = build(Params, deep_merge(data, overlay), "")
        except ParamsError as exc:
            raise ParamsError(f"tiers.{name}: {exc}") from None
    for name in {tier, built[BASE_TIER].automation.retrain_tier}:
        if name not in built:
            raise ParamsError(f"unknown tier '{name}' (tiers in {path.name}: {', '.join(built)})")
    if overrides:
        return build(Params, deep_merge(deep_merge(data, tiers.get(tier) or {}), overrides), "")
    return built[tier]


def tier_names(path: str | os.PathLike | None = None) -> list[str]:
    """The base tier and every tier the params file defines."""
    path = Path(path) if path is not None else params_file()
    data = read_yaml(path) or {}
    return [BASE_TIER, *((data.get("tiers") or {}) if isinstance(data, dict) else {})]


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_overrides(obj: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of dataclass ``obj`` with nested ``overrides`` applied (Dagster run config)."""
    changes = {}
    for key, value in overrides.items():
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = with_overrides(current, value)
        else:
            changes[key] = value
    return dataclasses.replace(obj, **changes)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
