"""Jobs: named selections of assets that users launch, schedule or trigger from sensors.

A job that holds the partitioned assets (one partition per pretraining candidate) is launched for all
candidates with "Materialize all" in the UI (a backfill: the unpartitioned assets once, each candidate's
pretrain/evaluate in a run of its own) or for one candidate from its Launchpad.
"""

from __future__ import annotations

import dagster as dg

from assets.resources import TIER_TAG
from lmforge import stages

#: The feedback and preference loops' assets: their sensor runs them when users' feedback arrives, not when data changes.
FEEDBACK = dg.AssetSelection.groups("feedback")
PREFERENCE = dg.AssetSelection.groups("preference")
#: The hyper-parameter search: launched by hand (or `lmforge run --select hpsearch`); it writes a params overlay.
HPSEARCH = dg.AssetSelection.groups("hpsearch")
#: Every asset of the pipeline, raw documents to registered model: the stages dvc.yaml holds too (the
#: raw-data source is observed, not materialized; the stages declared ``in_dvc=False``, the feedback and
#: preference loops and the search, run on their own or when asked).
EVERYTHING = dg.AssetSelection.all() - dg.AssetSelection.assets(*stages.off_the_pipeline())
#: From the vocabulary onward: what a retrain recomputes when the validated splits stand.
FROM_VOCABULARY = dg.AssetSelection.assets("tokenizer", "base_models").downstream() - HPSEARCH

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
    selection=dg.AssetSelection.assets("evaluate", "benchmark_eval"),
    description="Evaluate and benchmark pretrained candidates (one partition per candidate); then run `select`.",
)

#: Validate the task sets, fine-tune the champion, score against the baselines.
finetune_job = dg.define_asset_job(
    "finetune_job",
    selection=dg.AssetSelection.groups("finetune") | dg.AssetSelection.assets("select"),
    description="Choose the champion (select), validate the task sets and fine-tune it (classification, SFT).",
)

#: Compress the champion, register it (and its quantized variant) in MLflow, export it as GGUF, complete the batch of prompts.
deploy_job = dg.define_asset_job(
    "deploy_job",
    selection=dg.AssetSelection.groups("deploy"),
    description="Quantize, prune and distil the champion; register it and its quantized variant with aliases; "
    "export it as GGUF files for llama.cpp and Ollama; complete the prompts of batch_inference.file with the registered champion (batch_inference).",
)

#: Retrieval, RAG and prompt workflows over the cleaned corpus and the current champion.
rag_job = dg.define_asset_job(
    "rag_job",
    selection=dg.AssetSelection.groups("rag"),
    description="Build the retrieval index, compare answers with and without retrieval, evaluate prompt templates "
    "and few-shot examples, sweep sampling settings (the best is tagged on the champion's registry version).",
)

#: The whole graph with params.yaml as it is (the demo tier).
full_job = dg.define_asset_job(
    "full_job",
    selection=EVERYTHING,
    description="The whole pipeline, raw documents to registered model, with params.yaml as it is (the demo tier).",
)

#: Everything from the vocabulary onward, on the current splits.
retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=FROM_VOCABULARY,
    description="Retrain from the tokenizer onward (pretraining, evaluation, fine-tuning, compression, registry) on the current splits.",
)

#: The size tiers (params.yaml `tiers:`): the same graph with the tier's overrides, writing its own artifacts.
tiny_job = dg.define_asset_job(
    "tiny_job",
    selection=EVERYTHING,
    tags={TIER_TAG: "tiny"},
    description="The whole pipeline at the tiny tier (~5 minutes on 2 CPU cores; artifacts/tiny, registry lmforge-tiny).",
)
gpu_job = dg.define_asset_job(
    "gpu_job",
    selection=EVERYTHING,
    tags={TIER_TAG: "gpu"},
    description="The whole pipeline at the GPU tier (125M-parameter candidates, bf16, FSDP2 over every visible GPU).",
)

#: Users' feedback → examples → fine-tuning → a new version that takes the alias only when better.
feedback_job = dg.define_asset_job(
    "feedback_job",
    selection=FEEDBACK,
    description="The feedback loop: collect and validate users' feedback (feedback_examples), fine-tune the aliased model on it "
    "(feedback_finetune) and, only if it beats that model on the held-out sft test part, register it and move the alias.",
)

#: Users' preferences → pairs → DPO → a new version that takes the alias only when it ranks held-out pairs better.
preference_job = dg.define_asset_job(
    "preference_job",
    selection=PREFERENCE,
    description="Preference tuning: collect and validate chosen/rejected pairs (feedback_preferences), tune the aliased model on them "
    "with DPO (preference_tune) and, only if it ranks held-out pairs better and keeps its benchmarks, register it and move the alias.",
)

#: An Optuna study over a pretraining candidate's settings; its best trial becomes a params overlay.
hpsearch_job = dg.define_asset_job(
    "hpsearch_job",
    selection=HPSEARCH,
    description="Hyper-parameter search (hpsearch): an Optuna study over hpsearch.space, resumable; writes best_params.yaml for `lmforge run --params`.",
)

JOBS = [data_job, tokenizer_job, pretrain_job, evaluation_job, finetune_job, deploy_job, rag_job, full_job, retrain_job, tiny_job, gpu_job,
        feedback_job, preference_job, hpsearch_job]
