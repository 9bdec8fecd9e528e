"""``lmforge eval``: a model's standard benchmark scores, outside the pipeline (a model of your own,
a registered version, or the full sets that the demo samples)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import typer

from dagster_project.cli.common import PARAMS_HELP, TIER_HELP, app, fail, use_params
from lmforge.params import LmforgeError


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="A model directory (Hugging Face format) or MLflow URI (models:/NAME@ALIAS)."),
    full: bool = typer.Option(False, "--full", help="Every item of every task (params: a seeded subset of benchmarks.max_items)."),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="Only these tasks (repeat the option); default: benchmarks.tasks."),
    output: Optional[Path] = typer.Option(None, help="Write the scores (per task, per item) as JSON here."),
    params: Optional[Path] = typer.Option(None, help=PARAMS_HELP),
    tier: Optional[str] = typer.Option(None, help=TIER_HELP),
) -> None:
    """Score a model on the standard benchmarks with lm-evaluation-harness (what benchmark_eval does for candidates)."""
    from lmforge.benchdata import run_benchmark_data
    from lmforge.benchmarks import score_model, scores_markdown
    from lmforge.params import load_params
    from lmforge.registry import model_directory
    from lmforge.tracking import tracking_uri

    use_params(params, tier)
    try:
        p = load_params()
        if full:
            p.benchmarks.max_items = p.benchmarks.xstest.max_prompts = 0
        if tasks:
            p.benchmarks.tasks = [t for t in tasks if t not in {u.name for u in p.benchmarks.user}]
            p.benchmarks.user = [u for u in p.benchmarks.user if u.name in tasks]
            p.benchmarks.__post_init__()
        directory, _version = model_directory(model, tracking_uri(p))
        with tempfile.TemporaryDirectory(prefix="lmforge-eval-") as tmp:
            run_benchmark_data(p, typer.echo, out=Path(tmp) / "benchmark_data", require_split=False)
            result = score_model(p, Path(directory), typer.echo, data=Path(tmp) / "benchmark_data")
    except (LmforgeError, ValueError) as exc:
        fail(str(exc))
    typer.echo(scores_markdown({model: result}))
    if output:
        output.write_text(json.dumps(result, indent=1) + "\n")
        typer.echo(f"wrote {output}")
