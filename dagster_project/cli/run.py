"""``lmforge run`` and ``lmforge summary``: materialize assets with Dagster, print what they made."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from dagster_project.cli.common import app, PARAMS_HELP, TIER_HELP, fail, use_params
from dagster_project.errors import root_cause
from lmforge import stages as declared_stages
from lmforge.artifacts import read_summary
from lmforge.params import BASE_TIER, REPO_ROOT, LmforgeError, current_tier, load_params, params_file

#: The instance settings lmforge ships (this checkout's .dagster/dagster.yaml), copied into new homes.
INSTANCE_TEMPLATE = Path(__file__).resolve().parents[2] / ".dagster" / "dagster.yaml"


@functools.cache
def stages() -> dict[str, bool]:
    """Every stage (materializable asset) in the order of the asset graph, and whether it is
    partitioned (one summary per candidate), read from the Definitions rather than copied here."""
    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).partitions_def is not None
            for key in graph.toposorted_asset_keys if graph.get(key).is_materializable}


#: What ``lmforge run`` computes without --select: every asset but the feedback and preference loops', which run
#: on users' feedback (their sensor, or ``--select group:preference``), not on the data, and the search, which runs
#: when asked (``--select hpsearch``): the stages declared ``in_dvc=False`` (dagster_project.jobs.EVERYTHING).
PIPELINE = " and ".join(f"not key:{name}" for name in declared_stages.off_the_pipeline())


@app.command()
def run(
    select: Optional[str] = typer.Option(
        None, "--select", "-s", help="Dagster asset selection, e.g. 'ingest', 'key:clean+', 'group:data' (runs them even if up to date)."
    ),
    params: Optional[Path] = typer.Option(None, help=PARAMS_HELP),
    tier: Optional[str] = typer.Option(None, "--tier", "-t", help=TIER_HELP),
    config: Optional[Path] = typer.Option(None, help="YAML run config: per-stage overrides, as in the UI launchpad."),
    partition: Optional[list[str]] = typer.Option(
        None, "--partition", "-p", help="Candidate(s) to pretrain (partitioned assets); default: every candidate."
    ),
    force: bool = typer.Option(False, "--force", help="Recompute every selected asset, even those that are up to date."),
    stale: bool = typer.Option(False, "--stale", help="With --select: only the selected assets that are out of date (as without --select)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print what is out of date and would be computed."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Dagster's debug events too and tracebacks."),
) -> None:
    """Materialize assets (with their checks) and print each stage's summary.

    Without --select, the pipeline (every asset but the feedback and preference loops' and the search: `--select group:preference` runs one);
    only what is out of date in this params file's artifacts directory is
    recomputed (a change of code, parameters or raw documents; see dagster_project.staleness), and
    the run ends with the pipeline's summary table.  The unpartitioned assets the partitioned ones need run first, in one run; then each
    partition (pretraining candidate: pretrain, evaluate), one run per partition; then the other
    unpartitioned assets (select, fine-tuning, ...).  A failed partition does not stop the others.
    """
    import yaml

    use_params(params, tier)
    try:
        load_params()  # a config mistake is reported before Dagster starts
        run_config = yaml.safe_load(config.read_text()) if config else {}
    except LmforgeError as exc:
        fail(str(exc))
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read run config {config}: {exc}")
    ok = _materialize(select or PIPELINE, run_config or {}, verbose, partition, stale_only=(select is None or stale) and not force, dry_run=dry_run,
                      record=not run_config)
    if select is None and not dry_run:
        _print_table(load_params())
    if not ok:
        raise typer.Exit(1)


#: The tag with which ``lmforge run`` marks its runs: this host and process, so that a later ``lmforge run`` can tell a
#: run whose process was killed (it never ended, and still holds its ``training`` pool slot) from one still going.
PROCESS_TAG = "lmforge/process"


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _release_dead_runs(instance) -> None:
    """Mark the runs an ``lmforge run`` of this host started, whose process is gone without ending them
    (killed, out of memory), as failed, and free the pool slots they held: else the next run of a
    ``training`` asset (a resumed search, a resumed pretraining) would wait for them forever."""
    import dagster as dg

    host = socket.gethostname()
    alive = (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED)
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=list(alive))):
        run = record.dagster_run
        where, _, pid = run.tags.get(PROCESS_TAG, "").rpartition(":")
        if where != host or not pid.isdigit() or _process_exists(int(pid)):
            continue
        instance.report_run_failed(run, f"its process ({pid}) ended without finishing it (killed?): marked failed by a later `lmforge run`")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        typer.echo(f"note: run {run.run_id[:8]} died with its process {pid}; marked failed and its pool slots freed")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _materialize(select: str, run_config: dict, verbose: bool, partitions: list[str] | None, stale_only: bool, dry_run: bool = False,
                 record: bool = False) -> bool:
    """Run the selection (see ``run``); with ``record``, write what succeeded into dvc.lock (``_record_in_dvc``)."""
    import dagster as dg

    from assets.resources import TIER_TAG
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
        fail(f"invalid selection '{select}': {str(exc).splitlines()[0]}")
    if not keys:
        fail(f"selection '{select}' matches no asset (assets: {', '.join(sorted(k.to_user_string() for k in graph.get_all_asset_keys()))})")
    partitioned = sorted(k for k in keys if graph.get(k).partitions_def is not None)
    plain = sorted(k for k in keys if graph.get(k).partitions_def is None)
    known = sorted({p for k in partitioned for p in graph.get(k).partitions_def.get_partition_keys()})
    for p in partitions or []:
        if p not in known:
            fail(f"no partition '{p}' (partitions: {', '.join(known) or 'none selected'})")
    logger = {"log_level": "DEBUG" if verbose else "INFO", "tracebacks": verbose}
    run_config = {**run_config, "loggers": {"console": {"config": logger}}}
    tier = os.environ.get("LMFORGE_TIER")
    job = defs.resolve_implicit_global_asset_job_def()
    failed = False
    ran: list[tuple[str, str | None]] = []  # (stage, partition) materialized by a run that succeeded
    with dg.DagsterInstance.get() as instance:
        _release_dead_runs(instance)
        _observe_raw_documents(instance)  # ingest records the raw files' version it read
        todo = _out_of_date(instance, graph, keys, known) if stale_only else {(k, p) for k in partitioned for p in known} | {(k, None) for k in plain}
        if stale_only or dry_run:
            typer.echo(f"up to date: {len(keys) - len({k for k, _ in todo})} of {len(keys)} assets; to compute: "
                       + (", ".join(sorted({k.to_user_string() + (f"[{p}]" if p else "") for k, p in todo})) or "nothing"))
            _say_where_data_runs({k.to_user_string() for k, _ in todo})
        if dry_run:
            return True
        plain = [k for k in plain if (k, None) in todo]
        # what the partitions need (data, tokenizer) runs first; the rest (select, task sets, fine-tuning)
        # after every partition, so that a failure there cannot keep the candidates from training
        needed = dg.AssetSelection.assets(*partitioned).upstream().resolve(graph) if partitioned else set(plain)
        runs = [([k for k in plain if k in needed], None)]
        runs += [([k for k in partitioned if (k, p) in todo], p) for p in (partitions or known)]
        runs += [([k for k in plain if k not in needed], None)]
        for selection, partition_key in [(s, p) for s, p in runs if s]:
            result = job.execute_in_process(
                run_config=run_config, instance=instance, asset_selection=selection, partition_key=partition_key,
                raise_on_error=False, tags={PROCESS_TAG: _this_process(), **({TIER_TAG: tier} if tier else {})},
            )
            ok = _report(result, partition_key)
            failed |= not ok
            if ok:
                ran += [(e.asset_key.to_user_string(), partition_key) for e in result.get_asset_materialization_events()]
            elif partition_key is None:  # a failed partition does not stop the others; the rest does
                break
    if record:
        _record_in_dvc(ran)
    return not failed


def _say_where_data_runs(names: set[str]) -> None:
    """Which of the stages to compute hand their work to Ray Data: those declared with a Ray path
    (``Stage(engines=...)``), when ``cluster.data_engine`` asks for it."""
    engine = load_params().cluster.data_engine
    declared = declared_stages.stages()
    elsewhere = sorted(n for n in names if n in declared and declared[n].engine(engine) != "local")
    if elsewhere:
        typer.echo(f"on Ray Data (cluster.data_engine: {engine}): {', '.join(elsewhere)}")


def _record_in_dvc(ran: list[tuple[str, str | None]]) -> None:
    """Record the DVC stages a run materialized in ``dvc.lock``, as ``dvc commit`` (and ``dvc repro``)
    would: the hashes of their deps, params and outs now.  Then ``dvc status`` is clean after
    ``lmforge run`` (``make demo`` on a fresh clone included) and ``dvc repro`` runs only what changed
    since.  Ingest's run records the data it read (``data.dvc``) too.

    Only a run that ``dvc repro`` could have made is recorded: from this checkout's params.yaml at the
    base tier, with no run config (what DVC's params say), in a DVC repository, and not inside
    ``dvc repro`` itself (``$DVC_STAGE``: DVC records its stage when the command ends)."""
    if not ran or os.environ.get("DVC_STAGE") or not (REPO_ROOT / ".dvc").is_dir():
        return
    if params_file() != REPO_ROOT / "params.yaml" or current_tier() != BASE_TIER:
        return
    candidates = [c.name for c in load_params().pretrain.candidates]
    targets = declared_stages.dvc_addresses(ran, candidates)
    if "ingest" in targets and (REPO_ROOT / "data.dvc").is_file():
        targets.append("data.dvc")
    if not targets:
        return
    try:
        proc = subprocess.run(_dvc_commit_command(targets), cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        typer.secho(f"warning: could not record the run in dvc.lock ({exc}); `dvc commit` does it by hand", fg=typer.colors.YELLOW, err=True)
        return
    if proc.returncode:
        reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no message"]
        typer.secho(f"warning: `dvc commit` of {len(targets)} stage(s) failed: {reason[0]}", fg=typer.colors.YELLOW, err=True)
    else:
        typer.echo(f"recorded in dvc.lock: {', '.join(targets)}")


def _dvc_commit_command(targets: list[str], root: Path = REPO_ROOT) -> list[str]:
    """``dvc commit --force`` of ``targets`` in the repository ``root``, run by DVC's own Python through
    ``dvc_commit.py`` (one parse of dvc.yaml for all of them, not one per stage) where DVC lives in a
    virtual environment, as the Makefile installs it; the ``dvc`` command itself otherwise (run in ``root``)."""
    linked = Path(sys.executable).parent / "dvc"  # the Makefile links DVC's own venv here
    dvc = linked if linked.exists() else Path(shutil.which("dvc") or "dvc")
    python = dvc.resolve().parent / "python"
    if python.exists():
        return [str(python), "-P", str(Path(__file__).with_name("dvc_commit.py")), str(root), *targets]
    return [str(dvc), "commit", "--force", "--quiet", *targets]


def _observe_raw_documents(instance) -> None:
    """Record the raw files' fingerprint as `raw_documents`' version when it changed (as the sensor
    does), so that the UI shows `ingest` stale after new documents arrive."""
    from dagster_project.sensors import RAW_DOCUMENTS, report_raw_version
    from lmforge.ingest import source_fingerprint

    try:
        fingerprint = source_fingerprint(load_params())[0]
    except LmforgeError:
        return  # ingest reports the missing source
    record = instance.get_latest_data_version_record(RAW_DOCUMENTS, is_source=True)
    if record is None or record.asset_observation.tags.get("dagster/data_version") != fingerprint:
        report_raw_version(instance, fingerprint)


def _out_of_date(instance, graph, keys, partitions: list[str]) -> set:
    """(asset key, partition) pairs of the selection that are out of date in this params file's
    artifacts directory (``dagster_project.staleness``), or downstream of one that is."""
    from dagster_project.staleness import Staleness

    judge = Staleness(instance, graph, load_params())
    todo = set()
    for key in graph.toposorted_asset_keys:  # parents first: a recomputed parent makes its children out of date
        if key not in keys:
            continue
        for partition in (partitions if graph.get(key).partitions_def is not None else [None]):
            parent_redone = any((parent, p) in todo for parent in graph.get(key).parent_keys
                                for p in ([partition] if partition and graph.get(parent).partitions_def else partitions + [None]))
            if parent_redone or judge.out_of_date(key, partition):
                todo.add((key, partition))
    return todo


def _report(result, partition: str | None) -> bool:
    """Print what ran, which checks failed and why, then the summaries; return whether all went well.
    A failed warning-level check (e.g. a fine-tuned model not beating its baseline) is printed only."""
    import dagster as dg

    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    failed_checks = [e for e in failed if e.severity != dg.AssetCheckSeverity.WARN]
    for evaluation in failed:
        key = evaluation.asset_check_key
        warning = evaluation.severity == dg.AssetCheckSeverity.WARN
        typer.secho(f"check {'warning' if warning else 'failed'}: {key.asset_key.to_user_string()}/{key.name}: {evaluation.description}",
                    fg=typer.colors.YELLOW if warning else typer.colors.RED, err=True)
    for event in result.get_step_failure_events():
        cls_name, message = root_cause(event.step_failure_data.error)
        if cls_name == "DagsterAssetCheckFailedError":
            continue  # already reported above, check by check
        if cls_name in ("LmforgeError", "ParamsError"):
            typer.secho(f"error in {event.step_key}: {message}", fg=typer.colors.RED, err=True)
        else:
            typer.secho(f"error in {event.step_key}: {cls_name}: {message.splitlines()[-1] if message else ''}", fg=typer.colors.RED, err=True)
            typer.secho("  (full traceback in the run's logs: lmforge run -v, or the Dagster UI)", err=True)
    done = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    _print_summaries([s for s in stages() if s in done], partition)
    if failed_checks and result.success:
        typer.secho("blocking checks failed: downstream assets were not materialized", fg=typer.colors.RED, err=True)
    if not result.success or failed_checks:
        return False
    where = f" [{partition}]" if partition else ""
    typer.secho(f"run {result.run_id[:8]} succeeded: {', '.join(done) or 'nothing materialized'}{where}", fg=typer.colors.GREEN)
    return True


def _print_summaries(selected: list[str], partition: str | None = None) -> None:
    params = load_params()
    for stage in selected:
        if stages()[stage]:
            candidates = [partition] if partition else [c.name for c in params.pretrain.candidates]
            for name in candidates:
                _print_summary(f"{stage}/{name}", params.stage_dir(stage) / name)
        else:
            _print_summary(stage, params.stage_dir(stage))


def _print_summary(label: str, stage_dir: Path) -> None:
    summary = read_summary(stage_dir, missing_ok=True)
    if summary is not None:
        flat = ", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float)) or (isinstance(v, str) and len(v) < 40))
        typer.echo(f"{label:>9}: {flat}")
        reasons = summary.get("by_reason")
        if reasons:
            typer.echo(f"{'':>9}  quarantined by reason: " + ", ".join(f"{k}={v}" for k, v in reasons.items()))


def _print_table(params) -> None:
    from lmforge.report import render, rows

    typer.echo(f"\nlmforge: {params.artifacts}")
    typer.echo(render(rows(params)))


@app.command()
def summary(
    params: Optional[Path] = typer.Option(None, help=PARAMS_HELP),
    tier: Optional[str] = typer.Option(None, "--tier", "-t", help=TIER_HELP),
    every_stage: bool = typer.Option(False, "--stages", help="Every number of every stage's summary.json instead of the table."),
) -> None:
    """The pipeline at a glance: documents, vocabulary, candidates, champion, fine-tuning, compression, registry."""
    use_params(params, tier)
    try:
        if every_stage:
            _print_summaries(list(stages()))
        else:
            _print_table(load_params())
    except LmforgeError as exc:
        fail(str(exc))
