"""Assets ``benchmark_data`` (the items every model is scored on) and ``benchmark_eval`` (one partition
per candidate: standard benchmarks through lm-evaluation-harness; an adapted model gated on its base)."""

import dagster as dg

import lmforge.benchdata
import lmforge.benchmarks
from assets.common import md_table
from assets.factory import stage_asset


def _kept_base_knowledge(summary: dict, params, out) -> list[dg.AssetCheckResult]:
    gate = summary["gate"]
    return [dg.AssetCheckResult(
        check_name="kept_base_knowledge", passed=summary["checks"]["kept_base_knowledge"],
        description=gate["reason"] if gate else "not an adapted model: nothing to compare with",
        metadata={"tasks": dg.MetadataValue.md(lmforge.benchmarks.gate_markdown(gate))} if gate else {})]


benchmark_data = stage_asset(
    "benchmark_data", lmforge.benchdata.run_benchmark_data,
    show=lambda summary, params, out: {"tasks": dg.MetadataValue.md(md_table([{"task": t, **r} for t, r in summary["tasks"].items()])),
                                       "path": dg.MetadataValue.path(str(out / "tasks"))},
    kinds={"python", "lm_eval"},
    description="The standard benchmark sets (pinned files of benchmarks.dir) and the user's own (benchmarks.user, bad rows "
    "quarantined), checked for 13-gram contamination by the training split, cut into the seeded subset every model is "
    "scored on, with lm-evaluation-harness task YAMLs over them.",
)

benchmark_eval = stage_asset(
    "benchmark_eval", lmforge.benchmarks.run_benchmark_eval,
    show=lambda summary, params, out: {"benchmarks": dg.MetadataValue.md((out / "benchmarks.md").read_text())},
    checks=_kept_base_knowledge,
    kinds={"python", "pytorch", "lm_eval", "mlflow"},
    pool="training",
    check_specs=[dg.AssetCheckSpec("kept_base_knowledge", asset="benchmark_eval", blocking=True,
                                   description="An adapted candidate lost no more than benchmarks.max_regression points on any task "
                                   "against its base model (beyond 2 paired standard errors).")],
    description="Per-task accuracy ± standard error on the standard benchmarks (lm-evaluation-harness) and XSTest refusals; "
    "an adapted candidate is also gated on its base model, item by item.",
)
