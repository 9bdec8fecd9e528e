"""The asset of the group ``hpsearch``: an Optuna study over the settings of pretraining or SFT
fine-tuning (lmforge/hpsearch.py).  Off the default run: ``hpsearch_job``, or ``lmforge run --select hpsearch``."""

import dagster as dg

import lmforge.hpsearch
from assets.common import md_table
from assets.factory import stage_asset


def _trials(summary: dict, params, out) -> dict:
    rows = [{"trial": t["number"], "state": t["state"], "val loss": "" if t["value"] is None else f"{t['value']:.4f}",
             **{k.rsplit(".", 1)[-1]: v for k, v in t["params"].items()}} for t in summary["trial_log"]]
    return {"trials_table": dg.MetadataValue.md(md_table(rows)), "overlay": dg.MetadataValue.path(summary["overlay"])}


hpsearch = stage_asset(
    "hpsearch", lmforge.hpsearch.run_hpsearch, show=_trials,
    kinds={"python", "optuna", "pytorch", "mlflow"},
    pool="training",
    description="An Optuna study over hpsearch.space (each trial: hpsearch.candidate pretrained, or the champion fine-tuned on the SFT "
    "task set, with the trial's values, pruned by its validation curve, a nested MLflow run), stored in SQLite so that a killed search "
    "resumes; the best trial's values as a params overlay (best_params.yaml) for `lmforge run --params`.",
)
