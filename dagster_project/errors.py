"""Dagster wraps a step's exception in its own; users want the one their input caused."""

from __future__ import annotations


def root_cause(error) -> tuple[str, str]:
    """The innermost error of a step failure, as (class name, message without the class prefix)."""
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    prefix = message.split(":", 1)[0]
    if prefix.rsplit(".", 1)[-1] == error.cls_name:
        message = message.split(":", 1)[1].strip()
    return error.cls_name or "Error", message
