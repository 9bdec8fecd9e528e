"""Assets ``benchmark_data`` (the items every model is scored on) and ``benchmark_eval`` (one partition
per candidate: standard benchmarks through lm-evaluation-harness; an adapted model gated on its base)."""

import dagster as dg

import lmforge.benchdata
import lmforge.benchmarks
from assets.common import declared, materialized, md_table, summary_metadata
from assets.pretrain import candidates
from assets.resources import ParamsResource


@dg.asset(
    **declared("benchmark_data"),
    kinds={"python", "lm_eval"},
    description="The standard benchmark sets (pinned files of benchmarks.dir) and the user's own (benchmarks.user, bad rows "
    "quarantined), checked for 13-gram contamination by the training split, cut into the seeded subset every model is "
    "scored on, with lm-evaluation-harness task YAMLs over them.",
)
def benchmark_data(context: dg.AssetExecutionContext, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = lmforge_params.load()
    summary = lmforge.benchdata.run_benchmark_data(params, report=context.log.info)
    rows = [{"task": t, **r} for t, r in summary["tasks"].items()]
    return materialized("benchmark_data", params, {**summary_metadata(summary), "tasks": dg.MetadataValue.md(md_table(rows)),
                                                   "path": dg.MetadataValue.path(str(params.stage_dir("benchmark_data") / "tasks"))})


@dg.asset(
    **declared("benchmark_eval"),
    kinds={"python", "pytorch", "lm_eval", "mlflow"},
    partitions_def=candidates,
    pool="training",
    check_specs=[dg.AssetCheckSpec("kept_base_knowledge", asset="benchmark_eval", blocking=True,
                                   description="An adapted candidate lost no more than benchmarks.max_regression points on any task "
                                   "against its base model (beyond 2 paired standard errors).")],
    description="Per-task accuracy ± standard error on the standard benchmarks (lm-evaluation-harness) and XSTest refusals; "
    "an adapted candidate is also gated on its base model, item by item.",
)
def benchmark_eval(context: dg.AssetExecutionContext, lmforge_params: ParamsResource):
    params = lmforge_params.load()
    candidate = context.partition_key
    summary = lmforge.benchmarks.run_benchmark_eval(params, candidate, dagster_run_id=context.run_id, report=context.log.info)
    out = params.stage_dir("benchmark_eval") / candidate
    gate = summary["gate"]
    yield materialized("benchmark_eval", params, {
        **summary_metadata(summary),
        "benchmarks": dg.MetadataValue.md((out / "benchmarks.md").read_text()),
        "mlflow_run_id": summary["mlflow_run_id"],
    }, check_results=[dg.AssetCheckResult(
        check_name="kept_base_knowledge", passed=summary["checks"]["kept_base_knowledge"],
        description=gate["reason"] if gate else "not an adapted model: nothing to compare with",
        metadata={"tasks": dg.MetadataValue.md(lmforge.benchmarks.gate_markdown(gate))} if gate else {})])
