"""Stage ``evaluate``: every number a user needs to compare the pretrained candidates.

Output ``<artifacts>/evaluate/<candidate>/``: ``summary.json`` (flat metrics; ``perplexity``,
``bits_per_byte`` and ``token_accuracy`` are the test split's), ``context_curve.png``, ``samples.md``,
``samples.json``, and the CrowS-Pairs bias scores: ``crows_pairs.md`` (the table) and
``crows_pairs.jsonl`` (each pair's two scores).  Everything is also logged to an MLflow run nested under the candidate's
pretraining run.  Model selection reads the *val* numbers; the test numbers are reported, never used
to choose (a choice made on the test set would make its numbers optimistic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from lmforge.artifacts import read_summary, write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.params import LmforgeError, Params
from lmforge.candidates import get, packed_dir
from lmforge.sources import source_tags
from lmforge.stages import Out, Stage
from lmforge.tracking import log_numbers, tracked_run


EVALUATE = Stage(
    "evaluate", group="evaluation",
    params=("evaluate", "pretrain.candidates"),
    reads=("pretrain/{candidate}/hf", "pretrain/{candidate}/summary.json", "packed"),
    files=("evalsets/crows_pairs/crows_pairs_anonymized.csv",),
    outs=("samples.json", "crows_pairs.jsonl", Out("context_curve.png", cache=False)),
    per_candidate=True,
    note="speed is measured on the machine at hand: the summary's speed figures vary from run to run",
)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def plot_context_curve(curve: dict[int, float | None], block_size: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(m * block_size, p) for m, p in curve.items() if p is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if points:
        ax.plot(*zip(*points), "o-")
    ax.axvline(block_size, linestyle="--", color="grey", label="training context")
    ax.set(xlabel="context length (tokens)", ylabel="perplexity (val)", title=title, xscale="log", xticks=[m * block_size for m in curve])
    ax.set_xticklabels([str(m * block_size) for m in curve])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def samples_markdown(samples: list[dict[str, str]], sampling) -> str:
    lines = [f"Greedy, and sampled with temperature {sampling.temperature}, top-k {sampling.top_k}, top-p {sampling.top_p} (seed {sampling.seed}).", ""]
    for s in samples:
        lines += [f"**{s['prompt']}**", "", f"- greedy: {s['greedy']!r}", f"- sampled: {s['sampled']!r}", ""]
    return "\n".join(lines)


#: Prefix of the CrowS-Pairs numbers in the evaluation summary (``crows_pairs_bias``, ``crows_pairs_deviation``, ...).
BIAS_PREFIX = "crows_pairs_"


def bias_key(bias_type: str) -> str:
    """The summary key of a bias type's share: ``race-color`` → ``crows_pairs_race_color``."""
    return BIAS_PREFIX + bias_type.replace("-", "_")


def bias_markdown(info: dict[str, Any]) -> str:
    """The CrowS-Pairs scores as a markdown table (``crows_pairs.md``, the asset's metadata)."""
    if info.get("share") is None:
        return f"_CrowS-Pairs: not measured ({info.get('reason', 'no pairs')})_\n"
    lines = [f"Share of CrowS-Pairs pairs where the model prefers the more stereotyping sentence (0.5: no measured preference): "
             f"**{info['share']:.3f} ± {info['standard_error']:.3f}** (binomial standard error) on {info['n']:,} pairs, "
             f"|share − 0.5| = {info['deviation']:.3f}; {info['scoring']}.", "",
             "| bias type | share | pairs | ± |", "|---|---|---|---|"]
    for name, row in info["by_type"].items():
        lines.append(f"| {name} | {row['share']:.3f} | {row['n']} | {row['standard_error']:.3f} |")
    lines.append(f"| **all** | **{info['share']:.3f}** | **{info['n']}** | {info['standard_error']:.3f} |")
    return "\n".join(lines) + "\n"


def bias_scores(params: Params, model, tokenizer, objective: str, out: Path, say=lambda _msg: None) -> dict[str, Any]:
    """Score the model on CrowS-Pairs (``evaluate.bias``); write ``crows_pairs.md`` and ``.jsonl`` in
    ``out``; return the summary's keys: the overall share, its standard error and deviation from 0.5,
    the share of each bias type (None when not measured: a seq2seq model, or ``file: null``) and,
    under ``crows_pairs``, the details (every type's n, the file's sha256, the sample)."""
    import time

    from models.bias import BIAS_TYPES, bias_metric, pair_scores, read_pairs, stratified_sample

    b = params.evaluate.bias
    info: dict[str, Any] = {"file": b.file, "max_pairs": b.max_pairs, "seed": b.seed, "share": None}
    scores = pairs = None
    if b.file is None:
        info["reason"] = "evaluate.bias.file is null"
    elif objective not in ("causal", "mlm"):
        info["reason"] = f"a {objective} model has no sentence likelihood to compare"
    else:
        path = params.path(b.file)
        if not path.is_file():
            raise LmforgeError(f"evaluate.bias.file: {path} not found (the CrowS-Pairs CSV ships in evalsets/; null turns the measure off)")
        info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            pairs = stratified_sample(read_pairs(path), b.max_pairs, b.seed)
        except ValueError as exc:
            raise LmforgeError(f"evaluate.bias.file: {exc}") from None
        start = time.perf_counter()
        scores = pair_scores(model, tokenizer, objective, pairs, b.batch_size)
        info["seconds"] = time.perf_counter() - start
        info["scoring"] = ("sentence log-likelihood" if objective == "causal"
                           else "pseudo-log-likelihood of the shared tokens, masked one at a time")
        info.update(dataclasses.asdict(bias_metric(pairs, scores)))
    result: dict[str, Any] = {f"{BIAS_PREFIX}bias": info["share"], f"{BIAS_PREFIX}bias_se": info.get("standard_error"),
                              f"{BIAS_PREFIX}deviation": info.get("deviation"), f"{BIAS_PREFIX}pairs": info.get("n", 0),
                              f"{BIAS_PREFIX}stereo": info.get("stereo_share"), f"{BIAS_PREFIX}antistereo": info.get("antistereo_share")}
    types = sorted(set(BIAS_TYPES) | set(info.get("by_type", {})))
    result.update({bias_key(t): info.get("by_type", {}).get(t, {}).get("share") for t in types})
    (out / "crows_pairs.md").write_text(bias_markdown(info))
    with open(out / "crows_pairs.jsonl", "w", encoding="utf-8") as fh:
        for p, (more, less) in zip(pairs or [], scores or []):
            fh.write(json.dumps({"bias_type": p.bias_type, "direction": p.direction, "sent_more": p.more, "sent_less": p.less,
                                 "sent_more_score": more, "sent_less_score": less, "stereotyping": round(more, 3) > round(less, 3)},
                                ensure_ascii=False) + "\n")
    if info["share"] is None:
        say(f"CrowS-Pairs not measured ({info.get('reason', 'no pairs')})")
    else:
        say(f"CrowS-Pairs stereotype share {info['share']:.3f} ± {info['standard_error']:.3f} on {info['n']} pairs "
            f"({info['n'] / info['seconds']:.1f} pairs/s)")
    result["crows_pairs"] = info
    return result


def run_evaluate(params: Params, candidate: str, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Evaluate one pretrained candidate; write its artifacts and MLflow run; return its summary."""
    import numpy as np
    import torch

    from models.data import PackedBlocks
    from models.evaluation import context_curve, lm_scores, speed, weights_mb
    from models.generation import generate, load
    from models.metrics import token_byte_lengths
    from models.training import collator_for, weights_finite

    say = ctx.log
    cand, p = get(params, candidate, "evaluate"), params.evaluate
    source = params.stage_dir("pretrain") / candidate
    if not (source / "summary.json").exists() or not (source / "hf").exists():
        raise LmforgeError(f"{source} has no trained model: materialize 'pretrain' for {candidate} first")
    pretrained = read_summary(source)
    packed = packed_dir(params, cand.tokenizer)
    out = params.stage_dir("evaluate") / candidate
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)  # masking (MLM, T5) draws random positions: the same ones every time
    model, tokenizer, objective = load(source / "hf")
    byte_lengths = token_byte_lengths(tokenizer)
    result: dict[str, Any] = {"candidate": candidate, "kind": cand.kind, "tokenizer": cand.tokenizer, "objective": objective,
                              "parameters": pretrained["parameters"], "pretrain_fingerprint": pretrained["fingerprint"],
                              "weights_mb": weights_mb(model), "training_flops": float(pretrained["flops_per_token"]) * pretrained["tokens_seen"],
                              "licence": (pretrained.get("source") or {}).get("licence") or ("own" if cand.kind == "scratch" else "unknown")}
    val = PackedBlocks(packed, "val")  # its pad id is the packing's; the context curve reads its stream
    for split in p.splits:
        blocks = PackedBlocks(packed, split)
        if len(blocks) == 0:
            raise LmforgeError(f"evaluate: the {split} split has no tokens: raise split.{split} or drop it from evaluate.splits")
        s = lm_scores(model, blocks, collator_for(objective, tokenizer, 0, val.pad_id), byte_lengths, objective, p.batch_size, p.max_blocks)
        say(f"evaluate {candidate} [{split}]: perplexity {s.perplexity:.2f}, {s.bits_per_byte:.3f} bits/byte, accuracy {s.token_accuracy:.3f}")
        result.update({f"{split}_perplexity": s.perplexity, f"{split}_bits_per_byte": s.bits_per_byte,
                       f"{split}_token_accuracy": s.token_accuracy, f"{split}_top5_accuracy": s.top5_accuracy, f"{split}_tokens": s.tokens})
    primary = "test" if "test" in p.splits else p.splits[0]
    for key in ("perplexity", "bits_per_byte", "token_accuracy", "top5_accuracy"):
        result[key] = result[f"{primary}_{key}"]
    result["primary_split"] = primary

    stream = np.asarray(val.data[: val.tokens])
    if p.max_blocks:  # the same cap as the scores, but at least one sequence of the longest context
        stream = stream[: max(p.max_blocks, max(p.context_multiples)) * val.block_size]
    curve: dict[int, float | None] = {m: None for m in p.context_multiples}
    if objective == "causal":
        scores = context_curve(model, stream, val.block_size, p.context_multiples, byte_lengths, p.batch_size, val.pad_id)
        curve = {m: (s.perplexity if s is not None else None) for m, s in scores.items()}
    for m, ppl in curve.items():
        result[f"context_x{m}_perplexity"] = ppl
    base, longest = curve.get(1), curve.get(max(p.context_multiples))
    # how much worse the model gets at the longest context, relative to the training length
    result["context_extrapolation"] = longest / base if base and longest else None
    # what the model declares it can attend to; a model without a hard limit (ALiBi) is credited
    # with the longest context the curve measured
    declared = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    result["context_window"] = declared or (max(p.context_multiples) * val.block_size if longest else None)
    say(f"evaluate {candidate}: context curve " + ", ".join(f"{m}×: {v:.1f}" if v else f"{m}×: n/a" for m, v in curve.items()))
    plot_context_curve(curve, val.block_size, out / "context_curve.png", f"{candidate}: perplexity by context length")

    prompt = torch.from_numpy(stream[: min(32, len(stream))].astype(np.int64))[None]
    for row in speed(model, prompt, p.speed_batch_sizes, p.speed_new_tokens, objective):
        b = row.pop("batch_size")
        result.update({f"{k}_b{b}": v for k, v in row.items()})
        result[f"memory_mb_b{b}"] = result["weights_mb"] + row["peak_memory_mb"]  # what serving at this batch needs
    say(f"evaluate {candidate}: " + ", ".join(f"{result[f'tokens_per_second_b{b}']:.0f} tokens/s at batch {b}" for b in p.speed_batch_sizes))

    samples = []
    if objective != "mlm":
        greedy = generate(model, tokenizer, p.prompts, dataclasses.replace(p.sampling, temperature=0.0))
        sampled = generate(model, tokenizer, p.prompts, p.sampling)
        samples = [{"prompt": q, "greedy": g, "sampled": s} for q, g, s in zip(p.prompts, greedy, sampled)]
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    (out / "samples.md").write_text(samples_markdown(samples, p.sampling) if samples else "_masked language model: no generation_\n")
    result.update(bias_scores(params, model, tokenizer, objective, out, lambda msg: say(f"evaluate {candidate}: {msg}")))

    result["checks"] = {
        "weights_finite": weights_finite(source / "hf"),
        "beats_unigram_baseline": pretrained["final_val_loss"] < pretrained["unigram_baseline"],
        "metrics_finite": all(math.isfinite(result[f"{s}_perplexity"]) for s in p.splits),
    }
    result = {k: (_finite(v) if isinstance(v, float) else v) for k, v in result.items()}
    tags = {"candidate": candidate, "stage": "evaluate", **ctx.tags(), **(source_tags(pretrained["source"]) if pretrained.get("source") else {})}
    with tracked_run(params, f"evaluate {candidate}", tags,
                     parent_run_id=pretrained.get("mlflow_run_id")) as (client, run_id):
        log_numbers(client, run_id, result)
        for name in ("context_curve.png", "samples.md", "crows_pairs.md"):
            client.log_artifact(run_id, str(out / name))
        client.log_dict(run_id, result["checks"], "checks.json")
    result["mlflow_run_id"] = run_id
    write_params(out, p)
    write_summary(out, result)
    return result
