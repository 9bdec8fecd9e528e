"""``lmforge registry list|show``: the MLflow model registry, by name, version and alias."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from dagster_project.cli.common import PARAMS_HELP, fail, use_params
from lmforge.params import load_params

app = typer.Typer(help="The MLflow model registry: registered models, versions, aliases.", no_args_is_help=True)

#: Version tags shown by `lmforge registry list` (all of them: `show`).
KEY_TAGS = ("candidate", "kind", "variant", "bits_per_byte", "perplexity", "perplexity_increase", "git_sha")


@app.command("list")
def registry_list(params: Optional[Path] = typer.Option(None, help=PARAMS_HELP)) -> None:
    """Every registered model version, newest first, with its aliases and key tags."""
    use_params(params)
    from lmforge.registry import describe_versions

    rows = describe_versions(load_params())
    if not rows:
        typer.echo("no registered model yet: materialize 'register' (lmforge run --select register)")
        return
    for r in rows:
        aliases = f" @{' @'.join(r['aliases'])}" if r["aliases"] else ""
        tags = ", ".join(f"{k}={_short(r['tags'][k])}" for k in KEY_TAGS if k in r["tags"])
        typer.echo(f"models:/{r['name']}/{r['version']}{aliases}  {tags}")


@app.command("show")
def registry_show(
    model: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION or NAME (all versions)."),
    params: Optional[Path] = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """One registered version (or every version of a model): aliases, every tag, where it came from."""
    use_params(params)
    from lmforge.registry import describe_versions

    match = re.fullmatch(r"(?:models:/)?([^@/]+)(?:@(\w+)|/(\d+))?", model)
    if not match:
        fail(f"'{model}' is not NAME, NAME@ALIAS or NAME/VERSION")
    name, alias, version = match.groups()
    try:
        rows = describe_versions(load_params(), name)
    except Exception as exc:  # MLflow raises its own exception for an unknown name
        fail(f"{name}: {str(exc).splitlines()[0]}")
    rows = [r for r in rows if (alias is None or alias in r["aliases"]) and (version is None or r["version"] == version)]
    if not rows:
        fail(f"no version matches '{model}'")
    for r in rows:
        typer.secho(f"models:/{r['name']}/{r['version']}" + (f"  aliases: {', '.join(r['aliases'])}" if r["aliases"] else ""), bold=True)
        typer.echo(f"  source: {r['source']}")
        for key, value in sorted(r["tags"].items()):
            typer.echo(f"  {key}: {_short(value, 200)}")


def _short(value: str, width: int = 40) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"
