"""Assets ``base_models`` (existing models named by candidates) and ``pretrain`` (one partition per
candidate of ``params.yaml``)."""

import json

import dagster as dg

import lmforge.pretrain
from assets.common import inline_png, md_table
from assets.factory import stage_asset


def _sources(summary: dict, params, out) -> dict:
    return {"sources": dg.MetadataValue.md(md_table([{"name": slug, **info} for slug, info in summary["sources"].items()]))}


def _training(summary: dict, params, out) -> dict:
    history = json.loads((out / "history.json").read_text())
    table = "| step | val loss |\n|---|---|\n" + "\n".join(f"| {s} | {v:.4f} |" for s, v in history["val_losses"])
    return {"path": dg.MetadataValue.path(str(out / "hf")), "val_losses": dg.MetadataValue.md(table),
            "loss_curve": inline_png(out / "loss_curve.png", "loss curve")}


def _pretrain_checks(summary: dict, params, out) -> list[dg.AssetCheckResult]:
    from models.training import weights_finite  # here, not at the top: Lightning takes seconds to import

    finite = weights_finite(out / "hf")
    beats = summary["final_val_loss"] < summary["unigram_baseline"]
    return [
        dg.AssetCheckResult(check_name="weights_finite", passed=finite, description="all finite" if finite else "NaN or inf in the weights"),
        dg.AssetCheckResult(check_name="beats_unigram_baseline", passed=beats,
                            description=f"val loss {summary['final_val_loss']:.4f} {'<' if beats else '≥'} unigram {summary['unigram_baseline']:.4f}"),
    ]


base_models = stage_asset(
    "base_models", lmforge.pretrain.run_base_models, show=_sources,
    kinds={"python", "huggingface"},
    description="The existing models that candidates name as their source (GGUF file, local Hugging Face "
    "directory or hub id), checked (safetensors or GGUF only; no remote code) and cached as safetensors "
    "directories with their tokenizer, sha256 and licence.",
)

pretrain = stage_asset(
    "pretrain", lmforge.pretrain.run_pretrain, section="pretrain", show=_training, checks=_pretrain_checks,
    kinds={"python", "pytorch", "mlflow"},
    pool="training",  # dagster.yaml limits the pool to one run at a time on this machine
    check_specs=[
        dg.AssetCheckSpec("weights_finite", asset="pretrain", blocking=True, description="Every exported weight is finite."),
        dg.AssetCheckSpec("beats_unigram_baseline", asset="pretrain", blocking=True,
                          description="Final val loss below the unigram (context-free) baseline."),
    ],
    description="One candidate: trained from scratch or adapted from a base model with PyTorch Lightning, "
    "here or on Ray Train workers of a cluster (pretrain.scale.engine; resumes from its newest checkpoint), "
    "or a base model taken as is; exported in Hugging Face format, tracked in MLflow.",
)
