"""Assets of the ``rag`` group: ``retrieval_index``, ``rag_eval``, ``prompt_eval``, ``sampling_sweep``."""

import dagster as dg

from assets.common import md_table
from assets.factory import stage_asset


def _rag(function: str):
    """``lmforge.rag``'s stage function ``function``, imported when the stage runs: it imports torch, and
    the code location loads faster without it."""
    def run(params, ctx):
        import lmforge.rag

        return getattr(lmforge.rag, function)(params, ctx=ctx)

    return run


def _retrieval_table(summary: dict, params, out) -> dict:
    import lmforge.rag

    methods = [m for m in lmforge.rag.METHODS if f"{m}_mrr" in summary]
    keys = [k.removeprefix("bm25_") for k in summary if k.startswith("bm25_")]
    return {"known_items": dg.MetadataValue.md(md_table([{"method": m, **{k: f"{summary[f'{m}_{k}']:.3f}" for k in keys}} for m in methods]))}


def _finds_known_items(summary: dict, params, out) -> list[dg.AssetCheckResult]:
    k = max(params.rag.recall_at)
    best, chance = summary[f"{summary['best_method']}_recall_at_{k}"], summary[f"random_recall_at_{k}"]
    return [dg.AssetCheckResult(check_name="finds_known_items", passed=best > chance,
                                description=f"{summary['best_method']} recall@{k} {best:.3f} vs chance {chance:.4f}")]


def _comparison(summary: dict, params, out) -> dict:
    import lmforge.rag

    return {"comparison": dg.MetadataValue.md(lmforge.rag.comparison_table(summary))}


def _modes(summary: dict, params, out) -> dict:
    def cell(key: str) -> str:  # absent: the task is left out of finetune.tasks
        return f"{summary[key]:.3f}" if key in summary else "not configured"

    return {"modes": dg.MetadataValue.md(md_table([{"mode": m, "classification macro-F1": cell(f"classification_{m}_macro_f1"),
                                                    "summaries ROUGE-L": cell(f"sft_{m}_rougeL")} for m in summary["modes"]]))}


def _grid(summary: dict, params, out) -> dict:
    return {"best": str(summary["best"]), "grid": dg.MetadataValue.md(md_table([{k: f"{v:.3g}" for k, v in row.items()} for row in summary["grid"]]))}


retrieval_index = stage_asset(
    "retrieval_index", _rag("run_retrieval_index"), section="rag", show=_retrieval_table, checks=_finds_known_items,
    kinds={"python", "bm25s", "pytorch"},
    check_specs=[dg.AssetCheckSpec("finds_known_items", asset="retrieval_index", blocking=True,
                                   description="The best method's recall@k is above chance (k / number of chunks).")],
    description="The cleaned corpus in overlapping chunks with a BM25 index and a dense index (the champion's "
    "embeddings), scored on known items: recall@k and MRR of a held-out chunk's sentence finding that chunk.",
)

rag_eval = stage_asset(
    "rag_eval", _rag("run_rag_eval"), section="rag", show=_comparison,
    kinds={"python", "pytorch", "mlflow"},
    description="With and without retrieved chunks: the champion's perplexity on held-out continuations, and "
    "ROUGE of the fine-tuned summariser on the summarisation test set.",
)

prompt_eval = stage_asset(
    "prompt_eval", _rag("run_prompt_eval"), section="rag", show=_modes,
    kinds={"python", "pytorch", "mlflow"},
    description="The prompt templates (prompts/) zero-shot and few-shot (fixed or retrieved examples) on the "
    "fine-tuning task sets, with the champion: macro-F1 of label likelihoods, ROUGE of summaries.",
)

sampling_sweep = stage_asset(
    "sampling_sweep", _rag("run_sampling_sweep"), section="rag", show=_grid,
    kinds={"python", "pytorch", "mlflow"},
    description="Temperature × top-k × top-p, scored on the task sets' val parts (ROUGE-L, macro-F1, distinct-2, "
    "repetition); the best setting is tagged `sampling_best` on the champion's registry version.",
)
