"""The ``lmforge`` command line: the same Dagster assets as the UI, from a terminal, DVC or CI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from lmforge.params import REPO_ROOT, LmforgeError, load_params

app = typer.Typer(
    help="lmforge: raw documents → validated splits → ... → a registered model, as Dagster assets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

#: The instance settings lmforge ships (this checkout's .dagster/dagster.yaml), copied into new homes.
INSTANCE_TEMPLATE = Path(__file__).resolve().parents[1] / ".dagster" / "dagster.yaml"
STAGES = ("ingest", "clean", "split", "tokenizer", "packed", "pretrain")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _use_params(params: Optional[Path]) -> None:
    if params is not None:
        os.environ["LMFORGE_PARAMS"] = str(params.resolve())


@app.command()
def run(
    select: str = typer.Option("*", "--select", "-s", help="Dagster asset selection, e.g. 'ingest', 'key:clean+', 'group:data'."),
    params: Optional[Path] = typer.Option(None, help="Params file to use instead of params.yaml (same as $LMFORGE_PARAMS)."),
    config: Optional[Path] = typer.Option(None, help="YAML run config: per-stage overrides, as in the UI launchpad."),
    partition: Optional[list[str]] = typer.Option(
        None, "--partition", "-p", help="Candidate(s) to pretrain (partitioned assets); default: every candidate."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Dagster's debug events too and tracebacks."),
) -> None:
    """Materialize the selected assets (with their checks) and print each stage's summary.

    Unpartitioned assets run first, in one run; then each partition of the partitioned ones
    (pretraining candidates), one run per partition.
    """
    import yaml

    _use_params(params)
    try:
        load_params()  # a config mistake is reported before Dagster starts
        run_config = yaml.safe_load(config.read_text()) if config else {}
    except LmforgeError as exc:
        _fail(str(exc))
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read run config {config}: {exc}")
    _materialize(select, run_config or {}, verbose, partition)


def _materialize(select: str, run_config: dict, verbose: bool, partitions: list[str] | None) -> None:
    import dagster as dg

    from dagster_project.definitions import defs

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / ".dagster")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():  # telemetry off, the `training` pool limited to one run
        shutil.copy(INSTANCE_TEMPLATE, home / "dagster.yaml")
    graph = defs.resolve_asset_graph()
    warnings.filterwarnings("ignore", category=dg.BetaWarning)  # the selection grammar is "beta" upstream
    try:
        keys = dg.AssetSelection.from_string(select).resolve(graph)
    except Exception as exc:  # the selection grammar raises several types
        _fail(f"invalid selection '{select}': {str(exc).splitlines()[0]}")
    if not keys:
        _fail(f"selection '{select}' matches no asset (assets: {', '.join(sorted(k.to_user_string() for k in graph.get_all_asset_keys()))})")
    plain = sorted(k for k in keys if graph.get(k).partitions_def is None)
    partitioned = sorted(k for k in keys if graph.get(k).partitions_def is not None)
    known = sorted({p for k in partitioned for p in graph.get(k).partitions_def.get_partition_keys()})
    for p in partitions or []:
        if p not in known:
            _fail(f"no partition '{p}' (partitions: {', '.join(known) or 'none selected'})")
    logger = {"log_level": "DEBUG" if verbose else "INFO", "tracebacks": verbose}
    run_config = {**run_config, "loggers": {"console": {"config": logger}}}
    job = defs.resolve_implicit_global_asset_job_def()
    runs = ([(plain, None)] if plain else []) + [(partitioned, p) for p in (partitions or known) if partitioned]
    with dg.DagsterInstance.get() as instance:
        for selection, partition_key in runs:
            result = job.execute_in_process(
                run_config=run_config, instance=instance, asset_selection=selection, partition_key=partition_key, raise_on_error=False
            )
            _report(result, partition_key)


def _root_cause(error) -> tuple[str, str]:
    """The innermost error of a step failure, as (class name, message without the class prefix)."""
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    prefix = message.split(":", 1)[0]
    if prefix.rsplit(".", 1)[-1] == error.cls_name:
        message = message.split(":", 1)[1].strip()
    return error.cls_name or "Error", message


def _report(result, partition: str | None) -> None:
    """Print what ran, which checks failed and why, then the summaries; exit non-zero on failure."""
    failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed]
    for evaluation in failed_checks:
        key = evaluation.asset_check_key
        typer.secho(f"check failed: {key.asset_key.to_user_string()}/{key.name}: {evaluation.description}", fg=typer.colors.RED, err=True)
    for event in result.get_step_failure_events():
        cls_name, message = _root_cause(event.step_failure_data.error)
        if cls_name == "DagsterAssetCheckFailedError":
            continue  # already reported above, check by check
        if cls_name in ("LmforgeError", "ParamsError"):
            typer.secho(f"error in {event.step_key}: {message}", fg=typer.colors.RED, err=True)
        else:
            typer.secho(f"error in {event.step_key}: {cls_name}: {message.splitlines()[-1] if message else ''}", fg=typer.colors.RED, err=True)
            typer.secho("  (full traceback in the run's logs: lmforge run -v, or the Dagster UI)", err=True)
    done = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    _print_summaries([s for s in STAGES if s in done], partition)
    if failed_checks and result.success:
        typer.secho("blocking checks failed: downstream assets were not materialized", fg=typer.colors.RED, err=True)
    if not result.success or failed_checks:
        raise typer.Exit(1)
    where = f" [{partition}]" if partition else ""
    typer.secho(f"run {result.run_id[:8]} succeeded: {', '.join(done) or 'nothing materialized'}{where}", fg=typer.colors.GREEN)


def _print_summaries(stages: list[str], partition: str | None = None) -> None:
    params = load_params()
    for stage in stages:
        if stage == "pretrain":
            candidates = [partition] if partition else [c.name for c in params.pretrain.candidates]
            for name in candidates:
                _print_summary(f"{stage}/{name}", params.stage_dir(stage) / name / "summary.json")
        else:
            _print_summary(stage, params.stage_dir(stage) / "summary.json")


def _print_summary(label: str, path: Path) -> None:
    if path.exists():
        summary = json.loads(path.read_text())
        flat = ", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float)) or (isinstance(v, str) and len(v) < 40))
        typer.echo(f"{label:>9}: {flat}")
        reasons = summary.get("by_reason")
        if reasons:
            typer.echo(f"{'':>9}  quarantined by reason: " + ", ".join(f"{k}={v}" for k, v in reasons.items()))


@app.command()
def summary(params: Optional[Path] = typer.Option(None, help="Params file to use instead of params.yaml.")) -> None:
    """Print the summary.json of every stage materialized so far."""
    _use_params(params)
    try:
        _print_summaries(list(STAGES))
    except LmforgeError as exc:
        _fail(str(exc))


@app.command("demo-corpus")
def demo_corpus(
    data: Path = typer.Option(REPO_ROOT / "data", help="Where to write raw/ and finetune/."),
    force: bool = typer.Option(False, help="Rewrite even if raw/ already holds files."),
) -> None:
    """Write the offline demo corpus (installed packages' descriptions, stdlib docstrings, HTML pages)."""
    from lmforge.demo_corpus import build_demo_corpus

    raw = data / "raw"
    if raw.is_dir() and any(raw.iterdir()) and not force:
        typer.echo(f"{raw} already holds files; leaving it as it is (use --force to rewrite)")
        return
    counts = build_demo_corpus(data, REPO_ROOT / "requirements.lock")
    typer.echo(f"demo corpus written to {data}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if data.resolve() == (REPO_ROOT / "data").resolve():
        _compare_with_data_dvc(REPO_ROOT)


def _compare_with_data_dvc(root: Path) -> None:
    """Tell the user plainly whether the corpus built here is the one the committed data.dvc records."""
    import platform

    dvc_file = root / "data.dvc"
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc_file.exists() or not dvc.exists():
        return
    # `dvc data status` compares the workspace with data.dvc by content, whether or not the DVC cache
    # holds the data (on a fresh clone it does not, and plain `dvc status` reports that as a change)
    status = subprocess.run([str(dvc), "data", "status", "--json", "data"], cwd=root, capture_output=True, text=True)
    if status.returncode != 0:
        typer.secho(f"note: could not compare with data.dvc: {status.stderr.strip()}", fg=typer.colors.YELLOW)
        return
    uncommitted = json.loads(status.stdout or "{}").get("uncommitted", {})
    if not any(changes for changes in uncommitted.values()):
        typer.echo("the corpus matches data.dvc byte for byte")
        return
    import yaml

    recorded = (yaml.safe_load(dvc_file.read_text()) or {}).get("meta") or {}
    lock = root / "requirements.lock"
    lock_sha = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None
    reasons = []
    if recorded.get("python") and recorded["python"] != platform.python_version():
        reasons.append(f"data.dvc was recorded with Python {recorded['python']}, this is Python {platform.python_version()}")
    if recorded.get("requirements_lock_sha256") and recorded["requirements_lock_sha256"] != lock_sha:
        reasons.append("requirements.lock changed since data.dvc was recorded")
    typer.secho(
        "note: the demo corpus built here differs from the one recorded in data.dvc"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + ". It is made from the installed packages and the standard library of this Python, so another "
        "Python or other packages give other documents. Nothing is broken: every stage runs on the corpus "
        "built here. To version it, run 'dvc add data' and commit data.dvc.",
        fg=typer.colors.YELLOW,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
