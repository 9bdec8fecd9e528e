"""Assets of the ``rag`` group: ``retrieval_index``, ``rag_eval``, ``prompt_eval``, ``sampling_sweep``."""

import dagster as dg

from assets.common import declared, materialized, md_table, overrides_config, stage_params, summary_metadata
from assets.resources import ParamsResource
from lmforge.params import RagParams

# lmforge.rag is imported inside the functions: it imports torch, and the code location loads faster without it.

RagConfig = overrides_config(RagParams, "RagConfig")
RagConfig.__doc__ = "Overrides of params.yaml `rag` for one run. Used by: retrieval_index, rag_eval, prompt_eval, sampling_sweep."


def _retrieval_table(summary: dict) -> str:
    import lmforge.rag

    methods = [m for m in lmforge.rag.METHODS if f"{m}_mrr" in summary]
    keys = [k.removeprefix("bm25_") for k in summary if k.startswith("bm25_")]
    return md_table([{"method": m, **{k: f"{summary[f'{m}_{k}']:.3f}" for k in keys}} for m in methods])


@dg.asset(
    **declared("retrieval_index"),
    kinds={"python", "bm25s", "pytorch"},
    check_specs=[dg.AssetCheckSpec("finds_known_items", asset="retrieval_index", blocking=True,
                                   description="The best method's recall@k is above chance (k / number of chunks).")],
    description="The cleaned corpus in overlapping chunks with a BM25 index and a dense index (the champion's "
    "embeddings), scored on known items: recall@k and MRR of a held-out chunk's sentence finding that chunk.",
)
def retrieval_index(context: dg.AssetExecutionContext, config: RagConfig, lmforge_params: ParamsResource):
    import lmforge.rag

    params = stage_params(lmforge_params.load(), "rag", config)
    summary = lmforge.rag.run_retrieval_index(params, dagster_run_id=context.run_id, report=context.log.info)
    k = max(params.rag.recall_at)
    best, chance = summary[f"{summary['best_method']}_recall_at_{k}"], summary[f"random_recall_at_{k}"]
    yield materialized("retrieval_index", params, {**summary_metadata(summary), "known_items": dg.MetadataValue.md(_retrieval_table(summary)),
                                         "path": dg.MetadataValue.path(str(params.stage_dir("retrieval_index")))})
    yield dg.AssetCheckResult(check_name="finds_known_items", passed=best > chance,
                              description=f"{summary['best_method']} recall@{k} {best:.3f} vs chance {chance:.4f}")


@dg.asset(
    **declared("rag_eval"),
    kinds={"python", "pytorch", "mlflow"},
    description="With and without retrieved chunks: the champion's perplexity on held-out continuations, and "
    "ROUGE of the fine-tuned summariser on the summarisation test set.",
)
def rag_eval(context: dg.AssetExecutionContext, config: RagConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    import lmforge.rag

    params = stage_params(lmforge_params.load(), "rag", config)
    summary = lmforge.rag.run_rag_eval(params, dagster_run_id=context.run_id, report=context.log.info)
    return materialized("rag_eval", params, {**summary_metadata(summary), "comparison": dg.MetadataValue.md(lmforge.rag.comparison_table(summary))})


@dg.asset(
    **declared("prompt_eval"),
    kinds={"python", "pytorch", "mlflow"},
    description="The prompt templates (prompts/) zero-shot and few-shot (fixed or retrieved examples) on the "
    "fine-tuning task sets, with the champion: macro-F1 of label likelihoods, ROUGE of summaries.",
)
def prompt_eval(context: dg.AssetExecutionContext, config: RagConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    import lmforge.rag

    params = stage_params(lmforge_params.load(), "rag", config)
    summary = lmforge.rag.run_prompt_eval(params, dagster_run_id=context.run_id, report=context.log.info)
    def cell(key: str) -> str:  # absent: the task is left out of finetune.tasks
        return f"{summary[key]:.3f}" if key in summary else "not configured"

    table = md_table([{"mode": m, "classification macro-F1": cell(f"classification_{m}_macro_f1"),
                       "summaries ROUGE-L": cell(f"sft_{m}_rougeL")} for m in summary["modes"]])
    return materialized("prompt_eval", params, {**summary_metadata(summary), "modes": dg.MetadataValue.md(table)})


@dg.asset(
    **declared("sampling_sweep"),
    kinds={"python", "pytorch", "mlflow"},
    description="Temperature × top-k × top-p, scored on the task sets' val parts (ROUGE-L, macro-F1, distinct-2, "
    "repetition); the best setting is tagged `sampling_best` on the champion's registry version.",
)
def sampling_sweep(context: dg.AssetExecutionContext, config: RagConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    import lmforge.rag

    params = stage_params(lmforge_params.load(), "rag", config)
    summary = lmforge.rag.run_sampling_sweep(params, dagster_run_id=context.run_id, report=context.log.info)
    if "skipped" in summary:
        return materialized("sampling_sweep", params, {"skipped": summary["skipped"]})
    grid = md_table([{k: f"{v:.3g}" for k, v in row.items()} for row in summary["grid"]])
    return materialized("sampling_sweep", params, {**summary_metadata(summary), "best": str(summary["best"]), "grid": dg.MetadataValue.md(grid)})
