"""The ``kept_benchmarks`` check of the stages that gate their models on the model they came from."""

import dagster as dg

import lmforge.benchmarks


def kept_benchmarks(gates: dict[str, dict]) -> dg.AssetCheckResult:
    """The warning check ``kept_benchmarks`` of a stage that gates several models on their parent
    (``lmforge.benchmarks.benchmark_gates``): each model's reason, and its per-task table as metadata."""
    return dg.AssetCheckResult(check_name="kept_benchmarks", passed=all(g["passed"] for g in gates.values()), severity=dg.AssetCheckSeverity.WARN,
                               description="; ".join(f"{m}: {g['reason']}" for m, g in gates.items()) or "no model",
                               metadata={m: dg.MetadataValue.md(lmforge.benchmarks.gate_markdown(g)) for m, g in gates.items()})
