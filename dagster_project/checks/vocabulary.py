"""Gates on the tokenizer: exact round trips where the algorithm promises them, few unknown tokens."""

import dagster as dg

from assets.resources import ParamsResource
from lmforge.artifacts import read_params, read_summary


@dg.asset_check(asset="tokenizer", blocking=True, description="Byte-level BPE decodes every val document back to its exact text.")
def round_trip_exact(lmforge_params: ParamsResource) -> dg.AssetCheckResult:
    stage = lmforge_params.load().stage_dir("tokenizer")
    summary = read_summary(stage)
    rate = summary["round_trip_rate"]
    if summary["algorithm"] != "bpe":
        return dg.AssetCheckResult(passed=True, description=f"not required for {summary['algorithm']} (round-trip rate {rate:.2%})", metadata={"round_trip_rate": rate})
    return dg.AssetCheckResult(
        passed=rate == 1.0,
        description="every document round-trips exactly" if rate == 1.0 else f"only {rate:.2%} of documents round-trip exactly",
        metadata={"round_trip_rate": rate},
    )


@dg.asset_check(asset="tokenizer", blocking=True, description="Unknown-token rate on val under tokenizer.max_unk_rate.")
def unk_rate_below_threshold(lmforge_params: ParamsResource) -> dg.AssetCheckResult:
    stage = lmforge_params.load().stage_dir("tokenizer")
    summary, used = read_summary(stage), read_params(stage)
    rate, limit = summary["unk_rate"], used["max_unk_rate"]
    return dg.AssetCheckResult(
        passed=rate <= limit,
        description=f"UNK rate {rate:.4%} {'≤' if rate <= limit else '>'} {limit:.4%}" + ("" if rate <= limit else ": raise vocab_size or use bpe"),
        metadata={"unk_rate": rate, "max_unk_rate": limit},
    )
