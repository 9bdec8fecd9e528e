"""Jobs: named selections of assets that users launch, schedule or trigger from sensors."""

from __future__ import annotations

import dagster as dg

#: Raw documents → validated splits.  The checks of the selected assets run with them.
data_job = dg.define_asset_job(
    "data_job",
    selection=dg.AssetSelection.groups("data"),
    description="Ingest, clean (with the great-expectations gate) and split the corpus.",
)

#: The vocabulary and the packed token datasets (the data stages must have run).
tokenizer_job = dg.define_asset_job(
    "tokenizer_job",
    selection=dg.AssetSelection.groups("tokenizer"),
    description="Train the tokenizer on the train split and pack every split into token blocks.",
)

JOBS = [data_job, tokenizer_job]
