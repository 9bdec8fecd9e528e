"""Asset ``split``: cleaned documents → deterministic train / val / test."""

import dagster as dg

import lmforge.split
from assets.common import md_table
from assets.factory import stage_asset

split = stage_asset(
    "split", lmforge.split.run_split, section="split",
    show=lambda summary, params, out: {
        "splits": dg.MetadataValue.md(md_table({name: summary[name] for name in lmforge.split.SPLITS}, ("split", "documents")))},
    kinds={"python", "arrow"},
    description="Hash-based train/val/test split; near-duplicate clusters stay in one split.",
)
