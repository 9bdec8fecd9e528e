"""Asset ``pretrain``: one Dagster partition per candidate architecture in ``params.yaml``."""

import json

import dagster as dg

import lmforge.pretrain
from assets.common import declared, inline_png, materialized, md_table, overrides_config, stage_params, summary_metadata
from assets.resources import ParamsResource
from lmforge.params import ParamsError, PretrainParams, load_params

PretrainConfig = overrides_config(PretrainParams, "PretrainConfig")
PretrainConfig.__doc__ = "Overrides of params.yaml `pretrain` for one run (candidates: edit params.yaml). Used by: pretrain."


def _candidates() -> list[str]:
    """Partition keys, read when the code location loads: reload it after editing the candidates."""
    try:
        return [c.name for c in load_params().pretrain.candidates]
    except ParamsError:
        return []  # the run itself reports the params error in one line


candidates = dg.StaticPartitionsDefinition(_candidates())


@dg.asset(
    **declared("base_models"),
    kinds={"python", "huggingface"},
    description="The existing models that candidates name as their source (GGUF file, local Hugging Face "
    "directory or hub id), checked (safetensors or GGUF only; no remote code) and cached as safetensors "
    "directories with their tokenizer, sha256 and licence.",
)
def base_models(context: dg.AssetExecutionContext, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = lmforge_params.load()
    summary = lmforge.pretrain.run_base_models(params, report=context.log.info)
    rows = [{"name": slug, **info} for slug, info in summary["sources"].items()]
    return materialized("base_models", params, {"models": summary["models"], "sources": dg.MetadataValue.md(md_table(rows))})


@dg.asset(
    **declared("pretrain"),
    kinds={"python", "pytorch", "mlflow"},
    partitions_def=candidates,
    pool="training",  # dagster.yaml limits the pool to one run at a time on this machine
    check_specs=[
        dg.AssetCheckSpec("weights_finite", asset="pretrain", blocking=True, description="Every exported weight is finite."),
        dg.AssetCheckSpec(
            "beats_unigram_baseline", asset="pretrain", blocking=True,
            description="Final val loss below the unigram (context-free) baseline.",
        ),
    ],
    description="One candidate: trained from scratch or adapted from a base model with PyTorch Lightning, "
    "here or on Ray Train workers of a cluster (pretrain.scale.engine; resumes from its newest checkpoint), "
    "or a base model taken as is; exported in Hugging Face format, tracked in MLflow.",
)
def pretrain(context: dg.AssetExecutionContext, config: PretrainConfig, lmforge_params: ParamsResource):
    params = stage_params(lmforge_params.load(), "pretrain", config)
    candidate = context.partition_key
    where = f"on {params.cluster.workers} Ray Train workers" if params.pretrain.scale.engine == "ray" else "here"
    context.log.info(f"pretrain {candidate}: started {where} (progress at each validation; metrics in MLflow)")
    summary = lmforge.pretrain.run_pretrain(params, candidate, dagster_run_id=context.run_id, report=context.log.info)
    out = params.stage_dir("pretrain") / candidate
    from models.training import weights_finite  # here, not at the top: Lightning takes seconds to import

    finite = weights_finite(out / "hf")
    beats = summary["final_val_loss"] < summary["unigram_baseline"]
    context.log.info(f"pretrain {candidate}: val loss {summary['final_val_loss']:.4f} (unigram {summary['unigram_baseline']:.4f})")
    history = json.loads((out / "history.json").read_text())
    table = "| step | val loss |\n|---|---|\n" + "\n".join(f"| {s} | {v:.4f} |" for s, v in history["val_losses"])
    yield materialized("pretrain", params, {
        **summary_metadata(summary),
        "path": dg.MetadataValue.path(str(out / "hf")),
        "mlflow_run_id": summary["mlflow_run_id"],
        "val_losses": dg.MetadataValue.md(table),
        "loss_curve": inline_png(out / "loss_curve.png", "loss curve"),
    }, check_results=[
        dg.AssetCheckResult(check_name="weights_finite", passed=finite, description="all finite" if finite else "NaN or inf in the weights"),
        dg.AssetCheckResult(
            check_name="beats_unigram_baseline",
            passed=beats,
            description=f"val loss {summary['final_val_loss']:.4f} {'<' if beats else '≥'} unigram {summary['unigram_baseline']:.4f}",
        ),
    ])
