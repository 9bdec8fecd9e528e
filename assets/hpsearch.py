"""The asset of the group ``hpsearch``: an Optuna study over the settings of pretraining or SFT
fine-tuning (lmforge/hpsearch.py).  Off the default run: ``hpsearch_job``, or ``lmforge run --select hpsearch``."""

import dagster as dg

import lmforge.hpsearch
from assets.common import declared, materialized, md_table, summary_metadata
from assets.resources import ParamsResource


@dg.asset(
    **declared("hpsearch"),
    kinds={"python", "optuna", "pytorch", "mlflow"},
    pool="training",
    description="An Optuna study over hpsearch.space (each trial: hpsearch.candidate pretrained, or the champion fine-tuned on the SFT "
    "task set, with the trial's values, pruned by its validation curve, a nested MLflow run), stored in SQLite so that a killed search resumes; the best trial's values as a params "
    "overlay (best_params.yaml) for `lmforge run --params`.",
)
def hpsearch(context: dg.AssetExecutionContext, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = lmforge_params.load()
    summary = lmforge.hpsearch.run_hpsearch(params, dagster_run_id=context.run_id, report=context.log.info)
    rows = [{"trial": t["number"], "state": t["state"], "val loss": "" if t["value"] is None else f"{t['value']:.4f}",
             **{k.rsplit(".", 1)[-1]: v for k, v in t["params"].items()}} for t in summary["trial_log"]]
    return materialized("hpsearch", params, {**summary_metadata(summary),
                                             "trials_table": dg.MetadataValue.md(md_table(rows)),
                                             "overlay": dg.MetadataValue.path(summary["overlay"]),
                                             "mlflow_run_id": summary["mlflow_run_id"]})
