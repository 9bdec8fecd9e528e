"""Assets of the group ``deploy``: ``quantize``, ``prune``, ``distil``, ``register``, ``register_quantized`` and ``export``."""

import dagster as dg

import lmforge.compress
from assets.gates import kept_benchmarks
from assets.common import declared, materialized, md_table, overrides_config, stage_params, summary_metadata
from assets.resources import ParamsResource
from lmforge.params import DistilParams, PruneParams, QuantizeParams

QuantizeConfig = overrides_config(QuantizeParams, "QuantizeConfig")
QuantizeConfig.__doc__ = "Overrides of params.yaml `quantize` for one run. Used by: quantize."
PruneConfig = overrides_config(PruneParams, "PruneConfig")
PruneConfig.__doc__ = "Overrides of params.yaml `prune` for one run. Used by: prune."
DistilConfig = overrides_config(DistilParams, "DistilConfig")
DistilConfig.__doc__ = "Overrides of params.yaml `distil` for one run. Used by: distil."


def _variants_metadata(summary: dict, out) -> dict:
    return {**summary_metadata(summary), "variants": dg.MetadataValue.md((out / "variants.md").read_text()),
            "path": dg.MetadataValue.path(str(out / "models")), "mlflow_run_id": summary["mlflow_run_id"]}


@dg.asset(
    **declared("quantize"),
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    check_specs=[dg.AssetCheckSpec("perplexity_within_threshold", asset="quantize", blocking=True,
                                   description="A quantized variant's test perplexity rose by at most quantize.max_perplexity_increase "
                                   "and it kept the champion's benchmark accuracy (benchmarks.max_regression, paired)."),
                 dg.AssetCheckSpec("kept_benchmarks", asset="quantize", description="Every variant's benchmark gate against the champion.")],
    description="bf16/fp16 casts, int8 dynamic (CPU), int8/int4 weight-only (torchao) variants of the champion: size, "
    "CPU speed at batch 1 and 8, perplexity change, measured side by side.",
)
def quantize(context: dg.AssetExecutionContext, config: QuantizeConfig, lmforge_params: ParamsResource):
    params = stage_params(lmforge_params.load(), "quantize", config)
    summary = lmforge.compress.run_quantize(params, dagster_run_id=context.run_id, report=context.log.info)
    yield materialized("quantize", params, {**_variants_metadata(summary, params.stage_dir("quantize")), "chosen": str(summary["chosen"])})
    chosen = summary["chosen"]
    yield dg.AssetCheckResult(
        check_name="perplexity_within_threshold", passed=chosen is not None,
        description=f"{chosen}: perplexity {summary['perplexity_increase']:+.2%}, benchmarks kept" if chosen
        else f"every variant lost more than {summary['max_perplexity_increase']:.0%} perplexity or failed its benchmark gate",
    )
    yield kept_benchmarks(summary["benchmark_gates"])


@dg.asset(
    **declared("prune"),
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    description="Magnitude pruning of the champion's linear layers (unstructured and structured), scored like quantize.",
)
def prune(context: dg.AssetExecutionContext, config: PruneConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = stage_params(lmforge_params.load(), "prune", config)
    summary = lmforge.compress.run_prune(params, dagster_run_id=context.run_id, report=context.log.info)
    return materialized("prune", params, _variants_metadata(summary, params.stage_dir("prune")))


@dg.asset(
    **declared("distil"),
    kinds={"python", "pytorch", "mlflow"},
    pool="training",
    check_specs=[dg.AssetCheckSpec("beats_from_scratch", asset="distil", description="The distilled student beats the same student trained from scratch.")],
    description="A smaller student trained on the champion's logits (KL + CE), against the same student trained from scratch.",
)
def distil(context: dg.AssetExecutionContext, config: DistilConfig, lmforge_params: ParamsResource):
    params = stage_params(lmforge_params.load(), "distil", config)
    summary = lmforge.compress.run_distil(params, dagster_run_id=context.run_id, report=context.log.info)
    rows = [{"model": k, "parameters": summary["teacher_parameters"] if k == "teacher" else summary["student_parameters"],
             "test perplexity": f"{summary[f'{k}_perplexity']:.2f}"} for k in ("teacher", "distilled", "from_scratch")]
    yield materialized("distil", params, {**summary_metadata(summary), "results": dg.MetadataValue.md(md_table(rows)),
                                         "mlflow_run_id": summary["mlflow_run_id"]})
    yield dg.AssetCheckResult(check_name="beats_from_scratch", passed=summary["beats_from_scratch"], severity=dg.AssetCheckSeverity.WARN,
                              description=f"perplexity {summary['distilled_perplexity']:.2f} vs {summary['from_scratch_perplexity']:.2f} from scratch")


@dg.asset(
    **declared("register"),
    kinds={"python", "mlflow"},
    description="The champion as a new version of the MLflow registered model (registry.name), tagged with its lineage; "
    "aliases `candidate`, and `champion` when at least as good as the reigning one on the same data.",
)
def register(context: dg.AssetExecutionContext, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = lmforge_params.load()
    from lmforge.registry import run_register  # here, not at the top: MLflow's pyfunc takes a second to import

    summary = run_register(params, dagster_run_id=context.run_id, report=context.log.info)
    name = params.registry.name
    return materialized("register", params, {**summary_metadata(summary), "champion_uri": f"models:/{name}@champion",
                                          "candidate_uri": f"models:/{name}/{summary['candidate_version']}"})


@dg.asset(
    **declared("register_quantized"),
    kinds={"python", "mlflow"},
    description="The chosen quantized variant of the registered champion as a new version; alias `quantized`.",
)
def register_quantized(context: dg.AssetExecutionContext, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = lmforge_params.load()
    from lmforge.registry import run_register_quantized

    summary = run_register_quantized(params, dagster_run_id=context.run_id, report=context.log.info)
    return materialized("register_quantized", params, {**summary_metadata(summary), "uri": f"models:/{params.registry.name}@quantized"})


@dg.asset(
    **declared("export"),
    kinds={"python", "gguf", "mlflow"},
    pool="training",
    check_specs=[dg.AssetCheckSpec("round_trip_perplexity", asset="export", blocking=True,
                                   description="Each GGUF file, read back by transformers, and each ONNX model, read back by ONNX "
                                   "Runtime, scores the champion's test perplexity within export.max_perplexity_increase of its kind.")],
    description="The champion as GGUF files (export.types, e.g. Q4_1) for llama.cpp and Ollama, written by llama.cpp's own "
    "converter, and as ONNX models (export.onnx, e.g. int8) for ONNX Runtime (lmforge serve --engine onnx), written by ONNX "
    "Runtime GenAI's model builder; each read back and scored; logged with their sha256 on the champion's registry version.",
)
def export(context: dg.AssetExecutionContext, lmforge_params: ParamsResource):
    params = lmforge_params.load()
    from lmforge.export import describe, run_export  # here, not at the top: MLflow takes a second to import

    summary = run_export(params, dagster_run_id=context.run_id, report=context.log.info)
    rows = [{"type": k, "file": f["file"], "MB": f"{f['bytes'] / 1e6:.0f}", "perplexity": f"{f['perplexity']:.2f}",
             "change": f"{f['perplexity_increase']:+.2%}", "sha256": f["sha256"][:12]} for k, f in summary["files"].items()]
    yield materialized("export", params, {**summary_metadata(summary), "files": dg.MetadataValue.md(md_table(rows) if rows else "none"),
                                          "path": dg.MetadataValue.path(str(params.stage_dir("export"))), "mlflow_run_id": summary["mlflow_run_id"]})
    yield dg.AssetCheckResult(check_name="round_trip_perplexity", passed=summary["passed"], description=describe(summary),
                              severity=dg.AssetCheckSeverity.WARN if summary.get("unsupported") else dg.AssetCheckSeverity.ERROR)
