"""Hyper-parameter search: an Optuna study over the settings of pretraining or of SFT fine-tuning,
whose best trial becomes a params overlay that ``lmforge run --params`` takes
(docs/preference-and-search.md).

Every learning rate, warm-up, LoRA rank and batch size in params.yaml is a hand-picked number; this
searches them.  ``hpsearch.space`` maps dotted params keys (``pretrain.train.lr``,
``finetune.train.lora_lr``, ``finetune.lora.r``, ...) to ranges.  Each trial trains
``hpsearch.stage`` with the trial's values merged into the params file in force (exactly what the
overlay file will give): ``pretrain``, the candidate ``hpsearch.candidate`` for ``hpsearch.max_steps``
steps or its own, scored by its final validation loss; ``finetune_sft``, the champion fine-tuned on
the SFT task set with ``hpsearch.method``, scored by its best epoch's validation loss.  Its validation
curve goes to the study as it trains (by step, or by epoch), and the pruner stops a trial whose curve
falls below the median of the earlier ones' (``models.training.StepPruning``, or ``fit``'s ``on_epoch``).

The study lives in SQLite beside the artifacts (``<artifacts>/hpsearch/study.db``), named after the
search's settings, so a killed search resumes where it stopped: the trials it finished stay, the
one it was running is run again with the same values, and the sampler is seeded by the number of
finished trials, so that the resumed search proposes what an uninterrupted one would have.  Every
materialization is an MLflow run with a nested run per trial.  With ``hpsearch.engine: ray`` the
trials run as Ray tasks on the cluster, ``hpsearch.parallel`` at a time, sharing the study's storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from lmforge.artifacts import write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.params import BASE_TIER, LmforgeError, Params, ParamsError, current_tier, deep_merge, load_params, params_file
from lmforge.stages import Stage


HPSEARCH = Stage("hpsearch", group="hpsearch", params=("hpsearch", "pretrain", "tokenizer", "finetune"),
                 reads=("packed", "select/summary.json", "task_data/sft"), in_dvc=False,
                 note="a study that resumes: its state is its own SQLite file (hpsearch.storage), not DVC's; off the default run")


#: The user attribute of a trial a killed search left behind: it runs again, and does not count toward the budget.
INTERRUPTED = "interrupted"


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"pretrain.train.lr": 0.01}`` → ``{"pretrain": {"train": {"lr": 0.01}}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _trial_params(values: dict[str, Any]) -> Params:
    """The params file in force, at the tier in force, with a trial's values merged in."""
    try:
        return load_params(tier=current_tier(), overrides=nested(values))
    except ParamsError as exc:
        raise LmforgeError(f"hpsearch.space: {exc}") from None


#: ``hpsearch.stage`` → the metric its trials are scored by (minimized).
METRICS = {"pretrain": "final_val_loss", "finetune_sft": "best_val_loss"}
#: ``hpsearch.stage`` → the params section its trials read: a key elsewhere would change nothing they train.
SECTIONS = {"pretrain": "pretrain", "finetune_sft": "finetune"}


def target(params: Params) -> str:
    """What the trials train, in words and names: the candidate, or finetune_sft and its method."""
    h = params.hpsearch
    return h.candidate if h.stage == "pretrain" else f"finetune_sft-{h.method}"


def study_name(params: Params) -> str:
    """The target and a hash of everything that makes trials comparable: another space, step
    budget, sampler or pruner starts another study (in the same file)."""
    h = params.hpsearch
    key = json.dumps({"space": {k: dataclasses.asdict(v) for k, v in sorted(h.space.items())},
                      "max_steps": h.max_steps if h.stage == "pretrain" else None,
                      "sampler": h.sampler, "pruner": h.pruner, "startup_trials": h.startup_trials, "seed": h.seed,
                      "tier": current_tier()}, sort_keys=True)
    return f"{target(params)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def storage_url(params: Params) -> str:
    return params.hpsearch.storage or f"sqlite:///{params.stage_dir('hpsearch') / 'study.db'}"


def _sampler(params: Params, finished: int):
    """A sampler seeded by the number of finished trials: the same history proposes the same values,
    resumed or not."""
    import optuna

    h = params.hpsearch
    if h.sampler == "random":
        return optuna.samplers.RandomSampler(seed=h.seed + finished)
    return optuna.samplers.TPESampler(seed=h.seed + finished, n_startup_trials=h.startup_trials)


def _pruner(params: Params):
    import optuna

    h = params.hpsearch
    return optuna.pruners.MedianPruner(n_startup_trials=h.startup_trials) if h.pruner == "median" else optuna.pruners.NopPruner()


def _suggest(trial, key: str, dim) -> Any:
    if dim.type == "categorical":
        return trial.suggest_categorical(key, dim.choices)
    if dim.type == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
    return trial.suggest_float(key, dim.low, dim.high, log=dim.log)


def _finished(study) -> list:
    """Trials that count toward the budget: completed, pruned, or failed on their own (a trial that
    diverged), but not one a killed search left behind."""
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED))]


def _retry_interrupted(study, say) -> int:
    """A trial still RUNNING in the file was killed with its search (one search runs a study at a
    time: the asset's pool): mark it failed and queue its values to run first."""
    from optuna.trial import TrialState

    stale = [t for t in study.trials if t.state == TrialState.RUNNING]
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        say(f"hpsearch: trial {t.number} was interrupted: it runs again with the same values")
    return len(stale)


def _pretrain_trial(params: Params, trial, out_dir: Path, logger, report) -> float:
    """Pretrain the candidate, its validation curve reported to ``trial`` by step; its final validation loss."""
    from lmforge.candidates import get, packed_dir, tokenizer_dir
    from models.training import StepPruning, pretrain

    h = params.hpsearch
    cand = get(params, h.candidate, "hpsearch")
    if cand.kind == "as_is":
        raise LmforgeError(f"hpsearch.candidate: '{h.candidate}' is used as is: nothing trains (search a scratch or `use: adapt` candidate)")
    train = cand.train
    if h.max_steps is not None:
        # at least one validation before the end: the pruner's input
        train = dataclasses.replace(train, max_steps=h.max_steps, val_every=min(train.val_every, max(1, h.max_steps // 2)),
                                    checkpoint_every=min(train.checkpoint_every, h.max_steps))
    logger.log_hyperparams({"max_steps": train.max_steps})
    try:
        result = pretrain(cand.arch, train, packed_dir(params, cand.tokenizer), tokenizer_dir(params, cand.tokenizer), out_dir,
                          params.pretrain.scale, logger=logger, progress=False, report=report,
                          init_from=tokenizer_dir(params, cand.tokenizer) if cand.kind == "adapt" else None,
                          callbacks=[StepPruning(trial)])
    finally:
        for bulky in ("checkpoints", "hf"):  # the weights of a trial: the overlay run trains the best one again
            shutil.rmtree(out_dir / bulky, ignore_errors=True)
    (out_dir / "history.json").write_text(json.dumps({"train": result["train_losses"], "val": result["val_losses"]}) + "\n")
    return float(result["final_val_loss"])


def _finetune_sft_trial(params: Params, trial, out_dir: Path, logger, report) -> float:
    """Fine-tune the champion on the SFT task set with ``hpsearch.method``, each epoch's validation
    loss reported to ``trial`` (the pruner stops it between epochs); the best epoch's validation loss,
    which ``finetune_sft`` run with the overlay scores again (``<method>_val_loss`` in its summary)."""
    import optuna

    from lmforge.finetune import sft_task, train_sft

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key != "epoch":
                logger.experiment.log_metric(logger.run_id, key, value, step=epoch)
        trial.report(metrics["val_loss"], step=epoch)
        if epoch < params.finetune.train.epochs and trial.should_prune():  # a trial at its last epoch completes
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: val loss {metrics['val_loss']:.4f}")

    _model, fitted = train_sft(params, sft_task(params), params.hpsearch.method, report or (lambda _msg: None), on_epoch)
    (out_dir / "history.json").write_text(json.dumps({"epochs": fitted.history, "best_epoch": fitted.best_epoch}) + "\n")
    return float(fitted.best_score)


#: ``hpsearch.stage`` → a trial of it: (params, trial, its fresh directory, its MLflow logger, report) → the value to minimize.
TRIALS = {"pretrain": _pretrain_trial, "finetune_sft": _finetune_sft_trial}


def run_trial(values: dict[str, Any], trial, out_dir: Path, mlflow_parent: str | None, report=None) -> float:
    """Train ``hpsearch.stage`` with ``values`` in ``out_dir`` (fresh), as a nested MLflow run, reporting
    its validation curve to ``trial`` (pruning raises ``optuna.TrialPruned``); the value it scored."""
    import optuna
    from pytorch_lightning.loggers import MLFlowLogger

    from lmforge.tracking import artifact_location, tracking_uri

    params = _trial_params(values)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an interrupted trial starts over: its values, not its half-trained weights
    out_dir.mkdir(parents=True)
    logger = MLFlowLogger(experiment_name=params.mlflow.experiment, run_name=f"trial {trial.number}", tracking_uri=tracking_uri(params),
                          tags={"stage": "hpsearch", "optuna_trial": str(trial.number), "study": trial.study.study_name,
                                **({"mlflow.parentRunId": mlflow_parent} if mlflow_parent else {})},
                          artifact_location=artifact_location(params))
    logger.log_hyperparams(values)
    status = "FAILED"
    try:
        value = TRIALS[params.hpsearch.stage](params, trial, out_dir, logger, report)
        status = "FINISHED"
    except optuna.TrialPruned:
        status = "KILLED"
        raise
    finally:
        logger.experiment.set_terminated(logger.run_id, status)
    logger.experiment.log_metric(logger.run_id, METRICS[params.hpsearch.stage], value)
    return value


def overlay(params: Params, best: dict[str, Any]) -> dict[str, Any]:
    """The params file in force with the best values written in: at the top level for the base tier,
    in the tier's overrides for another, so that ``lmforge run --params FILE [--tier T]`` uses them."""
    data = yaml.safe_load(params_file().read_text(encoding="utf-8")) or {}
    tier = current_tier()
    if tier == BASE_TIER:
        return deep_merge(data, nested(best))
    data.setdefault("tiers", {})[tier] = deep_merge(data["tiers"].get(tier) or {}, nested(best))
    return data


def _trial_row(t) -> dict[str, Any]:
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "last_step": max(t.intermediate_values) if t.intermediate_values else None,
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None}


def _outcome(values: dict[str, Any], trial, out_dir: Path, parent: str | None, report) -> tuple[str, float | None, str]:
    """(state, value, what happened) of one trial: COMPLETE with its loss, PRUNED, or FAIL when it
    diverged (a result of the search, not a failure of it)."""
    import optuna

    try:
        value = run_trial(values, trial, out_dir, parent, report)
    except optuna.TrialPruned as exc:
        return "PRUNED", None, str(exc)
    except FloatingPointError as exc:
        return "FAIL", None, f"failed: {exc}"
    return "COMPLETE", value, f"val loss {value:.4f}"


def _propose(params: Params, study, pending: int, say) -> tuple[Any, dict[str, Any]]:
    """The next trial and its values, from a sampler seeded by the trials finished or under way."""
    h = params.hpsearch
    study.sampler = _sampler(params, len(_finished(study)) + pending)
    trial = study.ask()
    values = {key: _suggest(trial, key, dim) for key, dim in h.space.items()}
    say(f"hpsearch: trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    return trial, values


def _tell(study, trial, outcome: tuple[str, float | None, str], say) -> None:
    from optuna.trial import TrialState

    state, value, message = outcome
    study.tell(trial, value) if state == "COMPLETE" else study.tell(trial, state=TrialState[state])
    say(f"hpsearch: trial {trial.number}: {message}")


def _run_here(params: Params, study, over_budget, trials_dir: Path, parent: str, say) -> tuple[int, bool]:
    """Trials one after another in this process; (trials run, stopped by the time budget)."""
    ran = 0
    while len(_finished(study)) < params.hpsearch.trials:
        if over_budget():
            return ran, True
        trial, values = _propose(params, study, 0, say)
        _tell(study, trial, _outcome(values, trial, trials_dir / str(trial.number), parent, say), say)
        ran += 1
    return ran, False


def _ray_trial(values: dict[str, Any], name: str, storage: str, trial_id: int, out_dir: str, parent: str) -> tuple[str, float | None, str]:
    """One trial in a Ray task: the study from its storage and the trial by id, so that its reports and
    the pruner's decisions go through the storage the driver reads."""
    import optuna

    params = _trial_params(values)
    study = optuna.load_study(study_name=name, storage=storage, pruner=_pruner(params))
    return _outcome(values, optuna.trial.Trial(study, trial_id), Path(out_dir), parent, print)


def _run_on_ray(params: Params, study, over_budget, trials_dir: Path, parent: str, say) -> tuple[int, bool]:
    """Trials as Ray tasks on ``cluster``, ``hpsearch.parallel`` at a time; the driver asks and tells.
    The tasks read the params file, the data and the study where the driver does: on a cluster they
    must be on storage every node reaches (``hpsearch.storage``: a database server)."""
    import ray

    from lmforge.cluster import connected
    from lmforge.params import REPO_ROOT

    h, resources = params.hpsearch, params.cluster.resources_per_worker
    env = {"LMFORGE_ROOT": str(REPO_ROOT), "LMFORGE_PARAMS": str(params_file()), "LMFORGE_TIER": current_tier()}
    ran, stopped = 0, False
    with connected(params.cluster, say):
        task = ray.remote(_ray_trial).options(num_cpus=resources.get("CPU", 1.0), num_gpus=resources.get("GPU", 0.0), max_retries=0,
                                              runtime_env={"env_vars": env})
        pending: dict[Any, Any] = {}
        while True:
            while len(pending) < h.parallel and len(_finished(study)) + len(pending) < h.trials:
                if over_budget():
                    stopped = True
                    break
                trial, values = _propose(params, study, len(pending), say)
                pending[task.remote(values, study.study_name, storage_url(params), trial._trial_id, str(trials_dir / str(trial.number)), parent)] = trial
            if not pending:
                return ran, stopped
            [ready], _ = ray.wait(list(pending), num_returns=1)
            _tell(study, pending.pop(ready), ray.get(ready), say)
            ran += 1


def run_hpsearch(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Run (or resume) the study until it holds ``hpsearch.trials`` finished trials or
    ``hpsearch.max_minutes`` pass; write the best trial's overlay (``best_params.yaml``) and summary."""
    import optuna
    from optuna.trial import TrialState

    from lmforge.tracking import tracked_run

    say = ctx.log
    h = params.hpsearch
    if not h.space:
        raise LmforgeError("hpsearch.space is empty: name the settings to search, e.g. pretrain.train.lr: {type: float, low: 0.0003, high: 0.01, log: true}")
    for key, dim in h.space.items():  # a bad key or a value of the wrong type fails here, by name
        _trial_params({key: dim.choices[0] if dim.type == "categorical" else int(dim.low) if dim.type == "int" else dim.low})
    outside = [key for key in h.space if key.split(".")[0] != SECTIONS[h.stage]]
    if outside:
        raise LmforgeError(f"hpsearch.space: {', '.join(outside)}: nothing a {h.stage} trial trains reads it "
                           f"(hpsearch.stage: {h.stage} searches {SECTIONS[h.stage]}.* keys)")
    if h.stage == "finetune_sft":  # no champion or no valid task set: said once, before any trial
        from lmforge.finetune import sft_task

        sft_task(params)
    out = params.stage_dir("hpsearch")
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name(params)
    study = optuna.create_study(study_name=name, storage=storage_url(params), direction="minimize", load_if_exists=True, pruner=_pruner(params))
    retried = _retry_interrupted(study, say)
    started = time.monotonic()
    deadline = started + h.max_minutes * 60 if h.max_minutes else None
    with tracked_run(params, "hpsearch", {"stage": "hpsearch", "study": name, **ctx.tags()}) as (client, parent):
        run = _run_on_ray if h.engine == "ray" else _run_here
        ran, stopped_by_budget = run(params, study, lambda: deadline is not None and time.monotonic() >= deadline, out / "trials", parent, say)
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise LmforgeError(f"hpsearch: no trial of study {name} completed yet" + (" (hpsearch.max_minutes ran out)" if stopped_by_budget else ""))
        best = study.best_trial
        for key, value in best.params.items():
            client.log_param(parent, f"best.{key}", value)
        client.log_metric(parent, "best_val_loss", best.value)
        client.set_tag(parent, "best_trial", str(best.number))
    (out / "best_params.yaml").write_text(
        f"# {params_file().name} with the best values of hpsearch study {name} (trial {best.number}, {METRICS[h.stage]} {best.value:.4f}).\n"
        "# Use it: lmforge run --params " + str(out / "best_params.yaml") + (f" --tier {current_tier()}" if current_tier() != BASE_TIER else "") + "\n"
        + yaml.safe_dump(overlay(params, best.params), sort_keys=False, allow_unicode=True), encoding="utf-8")
    trials = [_trial_row(t) for t in study.trials]
    summary = {"study": name, "storage": storage_url(params), "stage": h.stage, "target": target(params), "trials": len(_finished(study)), "budget_trials": h.trials,
               "ran_now": ran, "retried": retried, "stopped_by_budget": stopped_by_budget,
               "pruned": sum(t["state"] == "PRUNED" for t in trials), "failed": sum(t["state"] == "FAIL" for t in trials),
               "best_trial": best.number, "best_value": best.value, "best_params": best.params, "metric": METRICS[h.stage],
               "overlay": str(out / "best_params.yaml"), "seconds": time.monotonic() - started, "mlflow_run_id": parent, "trial_log": trials}
    write_params(out, h)
    write_summary(out, summary)
    return summary
