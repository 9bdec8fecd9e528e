"""Asset ``split``: cleaned documents → deterministic train / val / test."""

import dagster as dg

import lmforge.split
from assets.common import declared, materialized, md_table, overrides_config, stage_params, summary_metadata
from assets.resources import ParamsResource
from lmforge.params import SplitParams

SplitConfig = overrides_config(SplitParams, "SplitConfig")
SplitConfig.__doc__ = "Overrides of params.yaml `split` for one run. Used by: split."


@dg.asset(
    **declared("split"),
    kinds={"python", "arrow"},
    description="Hash-based train/val/test split; near-duplicate clusters stay in one split.",
)
def split(context: dg.AssetExecutionContext, config: SplitConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = stage_params(lmforge_params.load(), "split", config)
    summary = lmforge.split.run_split(params)
    context.log.info(f"split: train {summary['train']}, val {summary['val']}, test {summary['test']}")
    for name in lmforge.split.SPLITS:
        if summary[name] == 0 and getattr(params.split, name) > 0:
            context.log.warning(f"split '{name}' is empty: the corpus is too small for its ratio")
    table = {name: summary[name] for name in lmforge.split.SPLITS}
    return materialized("split", params, {
        **summary_metadata(summary),
        "path": dg.MetadataValue.path(str(params.stage_dir("split"))),
        "splits": dg.MetadataValue.md(md_table(table, ("split", "documents"))),
    })
