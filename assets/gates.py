"""The ``kept_benchmarks`` check of the stages that gate their models on the model they came from, and the
two blocking checks of the loops that tune the aliased model (feedback, preference)."""

import dagster as dg

import lmforge.benchmarks


def kept_benchmarks(gates: dict[str, dict]) -> dg.AssetCheckResult:
    """The warning check ``kept_benchmarks`` of a stage that gates several models on their parent
    (``lmforge.benchmarks.benchmark_gates``): each model's reason, and its per-task table as metadata."""
    return dg.AssetCheckResult(check_name="kept_benchmarks", passed=all(g["passed"] for g in gates.values()), severity=dg.AssetCheckSeverity.WARN,
                               description="; ".join(f"{m}: {g['reason']}" for m, g in gates.items()) or "no model",
                               metadata={m: dg.MetadataValue.md(lmforge.benchmarks.gate_markdown(g)) for m, g in gates.items()})


def tuned_checks(asset: str, beats_description: str) -> list[dg.AssetCheckSpec]:
    """``beats_current`` (the loop's own held-out measure) and ``kept_benchmarks`` (against the aliased
    model): both must pass before the loop's register step moves the alias."""
    return [dg.AssetCheckSpec("beats_current", asset=asset, blocking=True, description=beats_description),
            dg.AssetCheckSpec("kept_benchmarks", asset=asset, blocking=True,
                              description="No benchmark task lost more than benchmarks.max_regression points against the current "
                              "aliased model (beyond 2 paired standard errors).")]


def tuned_results(summary: dict, beats_description: str) -> list[dg.AssetCheckResult]:
    """The results of ``tuned_checks`` from a tuning stage's summary (``beats_current``, ``kept_benchmarks``, ``benchmark_gate``)."""
    gate = summary["benchmark_gate"]
    return [dg.AssetCheckResult(check_name="beats_current", passed=summary["beats_current"], description=beats_description),
            dg.AssetCheckResult(check_name="kept_benchmarks", passed=summary["kept_benchmarks"], description=gate["reason"],
                                metadata={"tasks": dg.MetadataValue.md(lmforge.benchmarks.gate_markdown(gate))})]
