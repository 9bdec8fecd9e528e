"""``lmforge demo-corpus``, ``fetch-pretrained``, ``fetch-benchmarks`` and ``fetch-converter``: the demo's inputs and tools, built or fetched offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from dagster_project.cli.common import app, fail
from lmforge.params import REPO_ROOT, LmforgeError, Params


@app.command("demo-corpus")
def demo_corpus(
    data: Path = typer.Option(REPO_ROOT / "data", help="Where to write raw/, finetune/, prompts/ and preferences/."),
    force: bool = typer.Option(False, help="Rewrite even if raw/ already holds files."),
) -> None:
    """Write the offline demo corpus (installed packages' descriptions, stdlib docstrings, HTML pages)."""
    from lmforge.demo_corpus import build_demo_corpus, compare_with_data_dvc

    raw = data / "raw"
    if raw.is_dir() and any(raw.iterdir()) and not force:
        typer.echo(f"{raw} already holds files; leaving it as it is (use --force to rewrite)")
        return
    counts = build_demo_corpus(data, REPO_ROOT / "requirements.lock")
    typer.echo(f"demo corpus written to {data}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if data.resolve() == (REPO_ROOT / "data").resolve():
        matches, message = compare_with_data_dvc(REPO_ROOT)
        if message:
            typer.secho(message, fg=None if matches else typer.colors.YELLOW)


@app.command("fetch-pretrained")
def fetch_pretrained(
    dest: Optional[Path] = typer.Option(None, help="Where to write the GGUF file (default: pretrained/SmolLM2-135M-Instruct.Q4_1.gguf)."),
) -> None:
    """Fetch SmolLM2-135M-Instruct (GGUF, Apache-2.0) from the package index, checked against pinned sha256 values."""
    from lmforge.fetch import fetch_smollm2, sha256_file

    try:
        path = fetch_smollm2(dest, progress=typer.echo)
    except LmforgeError as exc:
        fail(str(exc))
    typer.echo(f"{path}  sha256 {sha256_file(path)}")


def _fetch_into(dest: Optional[Path], configured: Callable[[Params], str], fetch: Callable[..., Path], what: str) -> None:
    """Run ``fetch`` into ``dest``, or the directory params.yaml names (``configured``); one line on success or failure."""
    from lmforge.params import load_params

    try:
        params = load_params()
        typer.echo(f"{what} in {fetch(dest or params.path(configured(params)), progress=typer.echo)}")
    except LmforgeError as exc:
        fail(str(exc))


@app.command("fetch-benchmarks")
def fetch_benchmarks(
    dest: Optional[Path] = typer.Option(None, help="Where to write the benchmark files (default: params.yaml benchmarks.dir)."),
) -> None:
    """Fetch the standard benchmark sets (HellaSwag, ARC, PIQA, ...) from the package index, checked against pinned sha256 values."""
    from lmforge.benchdata import fetch_benchmarks as fetch

    _fetch_into(dest, lambda p: p.benchmarks.dir, fetch, "benchmark files")


@app.command("fetch-converter")
def fetch_converter(
    dest: Optional[Path] = typer.Option(None, help="Where to put the converter (default: params.yaml export.converter_dir)."),
) -> None:
    """Fetch llama.cpp's GGUF converter (from llama-cpp-python's source on the package index, pinned by sha256) for `export`."""
    from lmforge.export import fetch_converter as fetch

    _fetch_into(dest, lambda p: p.export.converter_dir, fetch, "llama.cpp's converter")
