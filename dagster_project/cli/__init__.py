"""The ``lmforge`` command line: the same Dagster assets as the UI, from a terminal, DVC or CI.

One module per group of commands; each parses options and calls stage functions (``lmforge/``,
``models/``) or Dagster (``run``), and holds no stage logic of its own:

- ``run``: ``run`` and ``summary`` (materialize assets, print what they made);
- ``generate``: ``generate`` (complete prompts, optionally grounded with ``--rag``);
- ``registry``: ``registry list`` / ``registry show`` (the MLflow model registry);
- ``serve``: ``serve`` (the OpenAI-compatible server);
- ``evaluate``: ``eval`` (a model's standard benchmark scores);
- ``project``: ``dvc-yaml`` (dvc.yaml written from the stages' declarations, ``lmforge/stages.py``) and ``docs``
  (the generated references in docs/);
- ``data``: ``demo-corpus``, ``fetch-pretrained``, ``fetch-benchmarks`` and ``fetch-converter`` (the demo's inputs and tools).
"""

from __future__ import annotations

from dagster_project.cli import data, evaluate, generate, project, registry, run, serve  # each registers its commands on `app`
from dagster_project.cli.common import app

app.add_typer(registry.app, name="registry")


def main() -> None:
    app()
