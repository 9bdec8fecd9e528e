"""Assets of the group ``deploy``: ``quantize``, ``prune``, ``distil``, ``register``, ``register_quantized`` and ``export``."""

import dagster as dg

import lmforge.compress
from assets.common import md_table
from assets.factory import stage_asset
from assets.gates import kept_benchmarks


def _variants(summary: dict, params, out) -> dict:
    return {"variants": dg.MetadataValue.md((out / "variants.md").read_text()), "path": dg.MetadataValue.path(str(out / "models")),
            **({"chosen": str(summary["chosen"])} if "chosen" in summary else {})}


def _quantize_checks(summary: dict, params, out) -> list[dg.AssetCheckResult]:
    chosen = summary["chosen"]
    return [dg.AssetCheckResult(
        check_name="perplexity_within_threshold", passed=chosen is not None,
        description=f"{chosen}: perplexity {summary['perplexity_increase']:+.2%}, benchmarks kept" if chosen
        else f"every variant lost more than {summary['max_perplexity_increase']:.0%} perplexity or failed its benchmark gate",
    ), kept_benchmarks(summary["benchmark_gates"])]


def _distil_results(summary: dict, params, out) -> dict:
    rows = [{"model": k, "parameters": summary["teacher_parameters"] if k == "teacher" else summary["student_parameters"],
             "test perplexity": f"{summary[f'{k}_perplexity']:.2f}"} for k in ("teacher", "distilled", "from_scratch")]
    return {"results": dg.MetadataValue.md(md_table(rows))}


# lmforge.registry and lmforge.export are imported when their stage runs: MLflow's pyfunc takes a second to import,
# and the code location loads faster without it.
def _register(params, ctx):
    from lmforge.registry import run_register

    return run_register(params, ctx=ctx)


def _register_quantized(params, ctx):
    from lmforge.registry import run_register_quantized

    return run_register_quantized(params, ctx=ctx)


def _export(params, ctx):
    from lmforge.export import run_export

    return run_export(params, ctx=ctx)


def _export_files(summary: dict, params, out) -> dict:
    rows = [{"type": k, "file": f["file"], "MB": f"{f['bytes'] / 1e6:.0f}", "perplexity": f"{f['perplexity']:.2f}",
             "change": f"{f['perplexity_increase']:+.2%}", "sha256": f["sha256"][:12]} for k, f in summary["files"].items()]
    return {"files": dg.MetadataValue.md(md_table(rows) if rows else "none")}


def _round_trip(summary: dict, params, out) -> list[dg.AssetCheckResult]:
    from lmforge.export import describe

    return [dg.AssetCheckResult(check_name="round_trip_perplexity", passed=summary["passed"], description=describe(summary),
                                severity=dg.AssetCheckSeverity.WARN if summary.get("unsupported") else dg.AssetCheckSeverity.ERROR)]


quantize = stage_asset(
    "quantize", lmforge.compress.run_quantize, section="quantize", show=_variants, checks=_quantize_checks,
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    check_specs=[dg.AssetCheckSpec("perplexity_within_threshold", asset="quantize", blocking=True,
                                   description="A quantized variant's test perplexity rose by at most quantize.max_perplexity_increase "
                                   "and it kept the champion's benchmark accuracy (benchmarks.max_regression, paired)."),
                 dg.AssetCheckSpec("kept_benchmarks", asset="quantize", description="Every variant's benchmark gate against the champion.")],
    description="bf16/fp16 casts, int8 dynamic (CPU), int8/int4 weight-only (torchao) variants of the champion: size, "
    "CPU speed at batch 1 and 8, perplexity change, measured side by side.",
)

prune = stage_asset(
    "prune", lmforge.compress.run_prune, section="prune", show=_variants,
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    description="Magnitude pruning of the champion's linear layers (unstructured and structured), scored like quantize.",
)

distil = stage_asset(
    "distil", lmforge.compress.run_distil, section="distil", show=_distil_results,
    checks=lambda summary, params, out: [dg.AssetCheckResult(
        check_name="beats_from_scratch", passed=summary["beats_from_scratch"], severity=dg.AssetCheckSeverity.WARN,
        description=f"perplexity {summary['distilled_perplexity']:.2f} vs {summary['from_scratch_perplexity']:.2f} from scratch")],
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    check_specs=[dg.AssetCheckSpec("beats_from_scratch", asset="distil", description="The distilled student beats the same student trained from scratch.")],
    description="A smaller student trained on the champion's logits (KL + CE), against the same student trained from scratch.",
)

register = stage_asset(
    "register", _register,
    show=lambda summary, params, out: {"champion_uri": f"models:/{params.registry.name}@champion",
                                       "candidate_uri": f"models:/{params.registry.name}/{summary['candidate_version']}"},
    kinds={"python", "mlflow"},
    description="The champion as a new version of the MLflow registered model (registry.name), tagged with its lineage; "
    "aliases `candidate`, and `champion` when at least as good as the reigning one on the same data.",
)

register_quantized = stage_asset(
    "register_quantized", _register_quantized,
    show=lambda summary, params, out: {"uri": f"models:/{params.registry.name}@quantized"},
    kinds={"python", "mlflow"},
    description="The chosen quantized variant of the registered champion as a new version; alias `quantized`.",
)

export = stage_asset(
    "export", _export, show=_export_files, checks=_round_trip,
    kinds={"python", "gguf", "mlflow"},
    pool="training",
    check_specs=[dg.AssetCheckSpec("round_trip_perplexity", asset="export", blocking=True,
                                   description="Each GGUF file, read back by transformers, and each ONNX model, read back by ONNX "
                                   "Runtime, scores the champion's test perplexity within export.max_perplexity_increase of its kind.")],
    description="The champion as GGUF files (export.types, e.g. Q4_1) for llama.cpp and Ollama, written by llama.cpp's own "
    "converter, and as ONNX models (export.onnx, e.g. int8) for ONNX Runtime (lmforge serve --engine onnx), written by ONNX "
    "Runtime GenAI's model builder; each read back and scored; logged with their sha256 on the champion's registry version.",
)
