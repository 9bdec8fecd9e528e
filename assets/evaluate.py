"""Assets ``evaluate`` (one partition per candidate) and ``select`` (the champion)."""

import dagster as dg

import lmforge.evaluate
import lmforge.select
from assets.common import inline_png, md_table
from assets.factory import stage_asset


def _evaluation(summary: dict, params, out) -> dict:
    splits = [{"split": s, **{k: f"{summary[f'{s}_{k}']:.4g}" for k in ("perplexity", "bits_per_byte", "token_accuracy", "top5_accuracy")}}
              for s in params.evaluate.splits]
    speeds = [{"batch": b, **{k: f"{summary[f'{k}_b{b}']:.4g}" for k in ("tokens_per_second", "latency_ms", "peak_memory_mb")}}
              for b in params.evaluate.speed_batch_sizes]
    return {
        "scores": dg.MetadataValue.md(md_table(splits)),
        "speed": dg.MetadataValue.md(md_table(speeds)),
        "context_curve": inline_png(out / "context_curve.png", "context curve"),
        "samples": dg.MetadataValue.md((out / "samples.md").read_text()),
        "crows_pairs": dg.MetadataValue.md((out / "crows_pairs.md").read_text()),
    }


def _selection(summary: dict, params, out) -> dict:
    return {
        "champion": summary["champion"],
        "path": dg.MetadataValue.path(str(params.path(summary["champion_dir"]))),
        "factor_matrix": dg.MetadataValue.md((out / "factors.md").read_text()),
        "scores": inline_png(out / "scores.png", "scores"),
    }


evaluate = stage_asset(
    "evaluate", lmforge.evaluate.run_evaluate, section="evaluate", show=_evaluation,
    checks=lambda summary, params, out: [dg.AssetCheckResult(check_name="metrics_finite", passed=summary["checks"]["metrics_finite"],
                                                             description=f"test perplexity {summary['perplexity']}")],
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    check_specs=[
        dg.AssetCheckSpec("metrics_finite", asset="evaluate", blocking=True, description="Perplexity is finite on every evaluated split."),
    ],
    description="Perplexity, bits per byte, token and top-5 accuracy on val and test; perplexity at 1×/2×/4× "
    "the training context; tokens/s and memory at batch 1 and 8; generation samples; social bias on CrowS-Pairs.",
)

select = stage_asset(
    "select", lmforge.select.run_select, section="select", show=_selection,
    kinds={"python", "mlflow"},
    description="Weighted factor matrix over the evaluated candidates (quality, benchmark accuracy, speed, size, training cost, "
    "context extrapolation, CrowS-Pairs and XSTest; weights in params.yaml); names the champion.",
)
