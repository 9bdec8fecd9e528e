"""Asset ``clean``: ingested documents → normalised, filtered, deduplicated documents."""

import dagster as dg

import lmforge.clean
from assets.common import md_table, sample_rows
from assets.factory import stage_asset
from lmforge.artifacts import load_dataset_dir

clean = stage_asset(
    "clean", lmforge.clean.run_clean, section="clean",
    show=lambda summary, params, out: {
        "rejections": dg.MetadataValue.md(md_table(summary["by_reason"], ("reason", "count"))),
        "sample": dg.MetadataValue.md(sample_rows(load_dataset_dir(out / "dataset", "clean"))),
    },
    kinds={"python", "arrow"},
    description="Ordered cleaning steps, Gopher-style quality filters, exact and MinHash near "
    "deduplication. Gated by the great-expectations suite (blocking checks).",
)
