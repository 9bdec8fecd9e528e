"""The asset ``batch_inference`` (group ``deploy``): a file of prompts → completions with the registered champion.

A module of its own rather than part of ``assets/deploy.py``: a module's assets share one code version
(``lmforge.codegraph``), and an edit here must not make quantize, prune, distil and register out of date.
"""

import dagster as dg

from assets.common import md_table
from assets.factory import stage_asset


# lmforge.batch_inference is imported when the stage runs: it imports torch, and the code location loads faster without it.
def _run(params, ctx):
    import lmforge.batch_inference

    return lmforge.batch_inference.run_batch_inference(params, ctx=ctx)


def _samples(summary: dict, params, out) -> dict:
    import lmforge.batch_inference

    return {"model": summary["model"], "model_version": summary["model_version"],
            "samples": dg.MetadataValue.md(md_table(lmforge.batch_inference.samples(out))),
            "path": dg.MetadataValue.path(str(out / lmforge.batch_inference.COMPLETIONS))}


batch_inference = stage_asset(
    "batch_inference", _run, section="batch_inference", show=_samples,
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    description="Completions for every prompt of batch_inference.file (JSONL or CSV) with the registered champion "
    "(or batch_inference.model), in batches, resumable: a killed run continues where it stopped. Bad rows are "
    "quarantined; the summary gives counts and tokens/s.",
)
