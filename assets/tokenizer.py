"""Assets ``tokenizer`` and ``packed``: the vocabulary, and every split as packed token blocks."""

import dagster as dg

import lmforge.vocabulary
from assets.common import md_table
from assets.factory import stage_asset


def _tokenizer_tables(summary: dict, params, out) -> dict:
    sample = " | ".join(summary["sample_tokens"][:80])
    return {
        "path": dg.MetadataValue.path(str(out / "hf")),
        "special_tokens": dg.MetadataValue.md(md_table(summary["special_tokens"], ("role", "token"))),
        "sample_tokenization": dg.MetadataValue.md(f"**text**\n\n```\n{summary['sample_text'][:200]}\n```\n\n**tokens**\n\n```\n{sample}\n```"),
    }


def _packed_tables(summary: dict, params, out) -> dict:
    table = [{"tokenizer": name, "split": s, **{k: counts[f"{s}_{k}"] for k in ("documents", "tokens", "blocks", "padding")}}
             for name, counts in summary["by_tokenizer"].items() for s in ("train", "val", "test")]
    return {"splits": dg.MetadataValue.md(md_table(table))}


tokenizer = stage_asset(
    "tokenizer", lmforge.vocabulary.run_tokenizer, section="tokenizer", show=_tokenizer_tables,
    kinds={"python", "huggingface"},
    description="Tokenizer trained on the train split only (byte-level BPE, WordPiece, Unigram or "
    "characters), saved as a PreTrainedTokenizerFast directory; measured on val.",
)

packed = stage_asset(
    "packed", lmforge.vocabulary.run_pack, section="tokenizer", show=_packed_tables,
    kinds={"python", "numpy"},
    description="Every split tokenized in parallel with each tokenizer a candidate reads (the trained one, "
    "each base model's own), documents separated by EOS/SEP, packed into fixed-length blocks in "
    "memory-mappable token files under packed/<tokenizer>.",
)
