"""What every command shares: one-line errors and the ``--params``/``--tier`` options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn, Optional

import typer

app = typer.Typer(
    help="lmforge: raw documents → validated splits → ... → a registered model, as Dagster assets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

PARAMS_HELP = "Params file to use instead of params.yaml (same as $LMFORGE_PARAMS)."
TIER_HELP = "Size tier from params.yaml `tiers:` (tiny, gpu; default: demo, params.yaml as is)."


def fail(message: str) -> NoReturn:
    """A user mistake: one red line on stderr, exit status 1, no traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def use_params(params: Optional[Path], tier: Optional[str] = None) -> None:
    """Point this process (and the code location it loads) at a params file and a size tier."""
    if params is not None:
        os.environ["LMFORGE_PARAMS"] = str(params.resolve())
    if tier is not None:
        os.environ["LMFORGE_TIER"] = tier  # before the code location loads: code versions include the tier's params
