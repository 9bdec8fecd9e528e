"""Asset ``clean``: ingested documents → normalised, filtered, deduplicated documents."""

import dagster as dg

import lmforge.clean
from assets.common import declared, materialized, md_table, overrides_config, sample_rows, stage_params, summary_metadata
from assets.resources import ParamsResource
from lmforge.artifacts import load_dataset_dir
from lmforge.params import CleanParams

CleanConfig = overrides_config(CleanParams, "CleanConfig")
CleanConfig.__doc__ = "Overrides of params.yaml `clean` for one run. Used by: clean and its checks."


@dg.asset(
    **declared("clean"),
    kinds={"python", "arrow"},
    description="Ordered cleaning steps, Gopher-style quality filters, exact and MinHash near "
    "deduplication. Gated by the great-expectations suite (blocking checks).",
)
def clean(context: dg.AssetExecutionContext, config: CleanConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = stage_params(lmforge_params.load(), "clean", config)
    summary = lmforge.clean.run_clean(params, report=context.log.info)
    context.log.info(f"clean: kept {summary['kept']} of {summary['documents_in']} ({summary['by_reason']})")
    stage = params.stage_dir("clean")
    return materialized("clean", params, {
        **summary_metadata(summary),
        "path": dg.MetadataValue.path(str(stage)),
        "rejections": dg.MetadataValue.md(md_table(summary["by_reason"], ("reason", "count"))),
        "sample": dg.MetadataValue.md(sample_rows(load_dataset_dir(stage / "dataset", "clean"))),
    })
