"""Assets ``tokenizer`` and ``packed``: the vocabulary, and every split as packed token blocks."""

import dagster as dg

import lmforge.vocabulary
from assets.common import declared, materialized, md_table, overrides_config, stage_params, summary_metadata
from assets.resources import ParamsResource
from lmforge.params import TokenizerParams

TokenizerConfig = overrides_config(TokenizerParams, "TokenizerConfig")
TokenizerConfig.__doc__ = "Overrides of params.yaml `tokenizer` for one run. Used by: tokenizer, packed."


@dg.asset(
    **declared("tokenizer"),
    kinds={"python", "huggingface"},
    description="Tokenizer trained on the train split only (byte-level BPE, WordPiece, Unigram or "
    "characters), saved as a PreTrainedTokenizerFast directory; measured on val.",
)
def tokenizer(context: dg.AssetExecutionContext, config: TokenizerConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = stage_params(lmforge_params.load(), "tokenizer", config)
    summary = lmforge.vocabulary.run_tokenizer(params)
    context.log.info(
        f"tokenizer: {summary['algorithm']} vocab {summary['vocab_size']}, fertility {summary['fertility']}, "
        f"{summary['bytes_per_token']} bytes/token, UNK rate {summary['unk_rate']}"
    )
    sample = " | ".join(summary["sample_tokens"][:80])
    return materialized("tokenizer", params, {
        **summary_metadata(summary),
        "path": dg.MetadataValue.path(str(params.stage_dir("tokenizer") / "hf")),
        "special_tokens": dg.MetadataValue.md(md_table(summary["special_tokens"], ("role", "token"))),
        "sample_tokenization": dg.MetadataValue.md(f"**text**\n\n```\n{summary['sample_text'][:200]}\n```\n\n**tokens**\n\n```\n{sample}\n```"),
    })


@dg.asset(
    **declared("packed"),
    kinds={"python", "numpy"},
    description="Every split tokenized in parallel with each tokenizer a candidate reads (the trained one, "
    "each base model's own), documents separated by EOS/SEP, packed into fixed-length blocks in "
    "memory-mappable token files under packed/<tokenizer>.",
)
def packed(context: dg.AssetExecutionContext, config: TokenizerConfig, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = stage_params(lmforge_params.load(), "tokenizer", config)
    summary = lmforge.vocabulary.run_pack(params)
    context.log.info(f"packed: {summary['train_tokens']} train tokens in {summary['train_blocks']} blocks of {summary['block_size']}")
    table = [{"tokenizer": name, "split": s, **{k: counts[f"{s}_{k}"] for k in ("documents", "tokens", "blocks", "padding")}}
             for name, counts in summary["by_tokenizer"].items() for s in ("train", "val", "test")]
    return materialized("packed", params, {
        **summary_metadata(summary),
        "path": dg.MetadataValue.path(str(params.stage_dir("packed"))),
        "splits": dg.MetadataValue.md(md_table(table)),
    })
