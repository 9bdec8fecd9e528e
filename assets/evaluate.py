"""Assets ``evaluate`` (one partition per candidate) and ``select`` (the champion)."""

import dagster as dg

import lmforge.evaluate
import lmforge.select
from assets.common import declared, inline_png, materialized, md_table, overrides_config, stage_params, summary_metadata
from assets.pretrain import candidates
from assets.resources import ParamsResource
from lmforge.params import EvaluateParams, SelectParams

EvaluateConfig = overrides_config(EvaluateParams, "EvaluateConfig")
EvaluateConfig.__doc__ = "Overrides of params.yaml `evaluate` for one run. Used by: evaluate."
SelectConfig = overrides_config(SelectParams, "SelectConfig")
SelectConfig.__doc__ = "Overrides of params.yaml `select` for one run (weights: edit params.yaml). Used by: select."


@dg.asset(
    **declared("evaluate"),
    kinds={"python", "pytorch", "mlflow"},
    partitions_def=candidates,
    pool="training",
    check_specs=[
        dg.AssetCheckSpec("metrics_finite", asset="evaluate", blocking=True, description="Perplexity is finite on every evaluated split."),
    ],
    description="Perplexity, bits per byte, token and top-5 accuracy on val and test; perplexity at 1×/2×/4× "
    "the training context; tokens/s and memory at batch 1 and 8; generation samples; social bias on CrowS-Pairs.",
)
def evaluate(context: dg.AssetExecutionContext, config: EvaluateConfig, lmforge_params: ParamsResource):
    params = stage_params(lmforge_params.load(), "evaluate", config)
    candidate = context.partition_key
    summary = lmforge.evaluate.run_evaluate(params, candidate, dagster_run_id=context.run_id, report=context.log.info)
    out = params.stage_dir("evaluate") / candidate
    splits = [{"split": s, **{k: f"{summary[f'{s}_{k}']:.4g}" for k in ("perplexity", "bits_per_byte", "token_accuracy", "top5_accuracy")}}
              for s in params.evaluate.splits]
    speeds = [{"batch": b, **{k: f"{summary[f'{k}_b{b}']:.4g}" for k in ("tokens_per_second", "latency_ms", "peak_memory_mb")}}
              for b in params.evaluate.speed_batch_sizes]
    yield materialized("evaluate", params, {
        **summary_metadata(summary),
        "scores": dg.MetadataValue.md(md_table(splits)),
        "speed": dg.MetadataValue.md(md_table(speeds)),
        "context_curve": inline_png(out / "context_curve.png", "context curve"),
        "samples": dg.MetadataValue.md((out / "samples.md").read_text()),
        "crows_pairs": dg.MetadataValue.md((out / "crows_pairs.md").read_text()),
        "mlflow_run_id": summary["mlflow_run_id"],
    }, check_results=[
        dg.AssetCheckResult(check_name="metrics_finite", passed=summary["checks"]["metrics_finite"],
                            description=f"test perplexity {summary['perplexity']}"),
    ])


@dg.asset(
    **declared("select"),
    kinds={"python", "mlflow"},
    description="Weighted factor matrix over the evaluated candidates (quality, benchmark accuracy, speed, size, training cost, "
    "context extrapolation, CrowS-Pairs and XSTest; weights in params.yaml); names the champion.",
)
def select(context: dg.AssetExecutionContext, config: SelectConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = stage_params(lmforge_params.load(), "select", config)
    summary = lmforge.select.run_select(params, dagster_run_id=context.run_id)
    out = params.stage_dir("select")
    context.log.info(f"select: champion {summary['champion']} (score {summary['champion_score']:.3f})")
    return materialized("select", params, {
        "champion": summary["champion"],
        "champion_score": summary["champion_score"],
        "path": dg.MetadataValue.path(str(params.path(summary["champion_dir"]))),
        "factor_matrix": dg.MetadataValue.md((out / "factors.md").read_text()),
        "scores": inline_png(out / "scores.png", "scores"),
        "mlflow_run_id": summary["mlflow_run_id"],
    })
