"""The asset ``batch_inference`` (group ``deploy``): a file of prompts → completions with the registered champion.

A module of its own rather than part of ``assets/deploy.py``: a module's assets share one code version
(``lmforge.codegraph``), and an edit here must not make quantize, prune, distil and register out of date.
"""

import dagster as dg

from assets.common import declared, materialized, md_table, overrides_config, stage_params, summary_metadata
from assets.resources import ParamsResource
from lmforge.params import BatchInferenceParams

# lmforge.batch_inference is imported inside the function: it imports torch, and the code location loads faster without it.

BatchInferenceConfig = overrides_config(BatchInferenceParams, "BatchInferenceConfig")
BatchInferenceConfig.__doc__ = "Overrides of params.yaml `batch_inference` for one run (another model, batch size, sampling). Used by: batch_inference."


@dg.asset(
    **declared("batch_inference"),
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    description="Completions for every prompt of batch_inference.file (JSONL or CSV) with the registered champion "
    "(or batch_inference.model), in batches, resumable: a killed run continues where it stopped. Bad rows are "
    "quarantined; the summary gives counts and tokens/s.",
)
def batch_inference(context: dg.AssetExecutionContext, config: BatchInferenceConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    import lmforge.batch_inference

    params = stage_params(lmforge_params.load(), "batch_inference", config)
    summary = lmforge.batch_inference.run_batch_inference(params, report=context.log.info)
    if "skipped" in summary:
        return materialized("batch_inference", params, {"skipped": summary["skipped"]})
    out = params.stage_dir("batch_inference")
    return materialized("batch_inference", params, {
        **summary_metadata(summary), "model": summary["model"], "model_version": summary["model_version"],
        "samples": dg.MetadataValue.md(md_table(lmforge.batch_inference.samples(out))),
        "path": dg.MetadataValue.path(str(out / lmforge.batch_inference.COMPLETIONS)),
    })
