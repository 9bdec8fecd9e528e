"""Files written from the code: ``lmforge dvc-yaml`` (``dvc.yaml``, from the stages' declarations in
``lmforge/stages.py``) and ``lmforge docs`` (the configuration and CLI references in docs/)."""

from __future__ import annotations

import typer

from dagster_project.cli.common import app, fail
from lmforge.params import REPO_ROOT, LmforgeError


@app.command("dvc-yaml")
def dvc_yaml(check: bool = typer.Option(False, "--check", help="Write nothing: exit 1 if dvc.yaml differs from the declarations.")) -> None:
    """Write dvc.yaml from the stages' declarations (Stage(...) in lmforge/*.py) and their code's imports."""
    from lmforge.stages import dvc_yaml as render, off_the_pipeline, stages

    path = REPO_ROOT / "dvc.yaml"
    try:
        text = render(REPO_ROOT)
    except LmforgeError as exc:
        fail(str(exc))
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if check:
        if current != text:
            fail(f"{path} differs from the stages' declarations: run `lmforge dvc-yaml`")
        typer.echo(f"{path} is current")
        return
    path.write_text(text, encoding="utf-8")
    in_dvc = len(stages(REPO_ROOT)) - len(off_the_pipeline(REPO_ROOT))
    typer.echo(f"{path}: " + ("unchanged" if current == text else "written") + f" ({in_dvc} stages)")


@app.command("docs")
def docs(check: bool = typer.Option(False, "--check", help="Write nothing: exit 1 if a generated reference differs from the code.")) -> None:
    """Write the generated references: docs/configuration.md from the params dataclasses, docs/cli.md from this command line."""
    from dagster_project.reference import pages, stale

    try:
        wanted = pages()
    except LmforgeError as exc:
        fail(str(exc))
    changed = stale(wanted)
    if check:
        if changed:
            fail(f"{', '.join(map(str, changed))} differ from the code: run `lmforge docs`")
        typer.echo(f"{', '.join(map(str, wanted))}: current")
        return
    for path in changed:
        path.write_text(wanted[path], encoding="utf-8")
    for path in wanted:
        typer.echo(f"{path}: " + ("written" if path in changed else "unchanged"))
