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

#: One candidate's pretraining per run (pick the partition in the launchpad, or backfill them all).
pretrain_job = dg.define_asset_job(
    "pretrain_job",
    selection=dg.AssetSelection.groups("pretrain"),
    description="Pretrain candidate architectures (one partition per candidate).",
)

#: Evaluate candidates (per partition), then select the champion (after every partition).
evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=dg.AssetSelection.assets("evaluate"),
    description="Evaluate pretrained candidates (one partition per candidate); then run `select`.",
)

#: Validate the task sets, fine-tune the champion, score against the baselines.
finetune_job = dg.define_asset_job(
    "finetune_job",
    selection=dg.AssetSelection.groups("finetune") | dg.AssetSelection.assets("select"),
    description="Choose the champion (select), validate the task sets and fine-tune it (classification, SFT).",
)

#: Compress the champion and register it (and its quantized variant) in MLflow.
deploy_job = dg.define_asset_job(
    "deploy_job",
    selection=dg.AssetSelection.groups("deploy"),
    description="Quantize, prune and distil the champion; register it and its quantized variant with aliases.",
)

JOBS = [data_job, tokenizer_job, pretrain_job, evaluation_job, finetune_job, deploy_job]
