"""Evaluation of a trained language model on held-out packed tokens: scores, the context-length
curve, inference speed and memory.  Plain torch; ``lmforge.evaluate`` runs it for each candidate.

- ``lm_scores``: perplexity, bits per byte, next-token (or masked-token) accuracy and top-5 accuracy
  over blocks collated exactly as in training (``models.training.collator_for``).
- ``context_curve``: perplexity of causal models on sequences of 1×, 2×, 4×... the training block
  length, over the same tokens for every length.  Learned position embeddings cannot go past their
  table (reported as None); RoPE and ALiBi can, and the curve shows how well they extrapolate.
- ``speed``: generated tokens per second at several batch sizes, KV cache on, and peak memory;
  ``speed_side_by_side`` the same for several models in alternating rounds (for ratios).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from models.generation import context_limit, peak_memory
from models.metrics import LMScores, score


@torch.no_grad()
def lm_scores(model, blocks, collate, byte_lengths: np.ndarray, objective: str, batch_size: int = 8, max_blocks: int = 0) -> LMScores:
    """Scores of ``model`` on the blocks (all of them, or the first ``max_blocks``).  Load masked LMs
    with ``AutoModelForMaskedLM``: the masked-token predictions are scored."""
    model.eval()
    if max_blocks:
        blocks = Subset(blocks, range(min(max_blocks, len(blocks))))
    total = LMScores()
    for batch in DataLoader(blocks, batch_size=batch_size, collate_fn=collate):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        batch.pop("next_sentence_label", None)  # BERT's NSP head is a pretraining aid, not evaluated
        out = model(**batch)
        total += score(out.logits, batch["labels"], byte_lengths, shift=objective == "causal")
    return total


@torch.no_grad()
def context_curve(
    model, stream: np.ndarray, block_size: int, multiples: list[int], byte_lengths: np.ndarray, batch_size: int = 8, pad_id: int | None = None
) -> dict[int, LMScores | None]:
    """Scores at each context length ``block_size × m`` over the same tokens: ``stream`` is cut to a
    whole number of the longest sequences, then reshaped for each length.  None where the model
    cannot attend that far (learned positions) or the stream is shorter than one sequence."""
    model.eval()
    limit = context_limit(model.config)
    longest = block_size * max(multiples)
    usable = (len(stream) // longest) * longest
    curve: dict[int, LMScores | None] = {}
    for m in multiples:
        length = block_size * m
        if usable == 0 or (limit is not None and length > limit):
            curve[m] = None
            continue
        sequences = torch.from_numpy(stream[:usable].astype(np.int64)).view(-1, length)
        total = LMScores()
        for start in range(0, len(sequences), max(1, batch_size // m)):
            ids = sequences[start : start + max(1, batch_size // m)].to(model.device)
            labels = ids if pad_id is None else ids.masked_fill(ids == pad_id, -100)
            total += score(model(input_ids=ids).logits, labels, byte_lengths, shift=True)
        curve[m] = total
    return curve


def _generate(model, ids: torch.Tensor, new_tokens: int, objective: str) -> int:
    """One timed unit of work: exactly ``new_tokens`` greedy tokens per row with the KV cache (a
    forward pass over ``ids`` for masked LMs, which do not generate); the tokens it produced or read."""
    if objective == "mlm":
        model(input_ids=ids)
        return ids.numel()
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, use_cache=True, pad_token_id=model.config.pad_token_id, temperature=None, top_k=None, top_p=None,
    )
    return ids.shape[0] * new_tokens


def _timed(model, ids: torch.Tensor, new_tokens: int, objective: str) -> tuple[float, int]:
    """(seconds, tokens) of one ``_generate``, waiting for a GPU to finish."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = _generate(model, ids, new_tokens, objective)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


@torch.no_grad()
def speed(model, prompt_ids: torch.Tensor, batch_sizes: list[int], new_tokens: int, objective: str) -> list[dict[str, Any]]:
    """Tokens per second and peak memory at each batch size.

    Causal and seq2seq models generate exactly ``new_tokens`` tokens greedily after ``prompt_ids``
    (one row, repeated across the batch) with the KV cache; masked LMs (no generation) are timed on
    forward passes over the prompt.  One untimed warm-up run first, then the best of three."""
    model.eval()
    rows = []
    for b in batch_sizes:
        ids = prompt_ids.repeat(b, 1).to(model.device)
        with peak_memory(model.device) as memory:  # the warm-up allocates the KV cache: measure it too
            _generate(model, ids, new_tokens, objective)
            seconds, tokens = min(_timed(model, ids, new_tokens, objective) for _ in range(3))
        rows.append({"batch_size": b, "tokens_per_second": tokens / seconds, "latency_ms": 1000 * seconds, "peak_memory_mb": memory["peak_mb"]})
    return rows


@torch.no_grad()
def speed_side_by_side(models: dict[str, Any], prompt_ids: torch.Tensor, batch_sizes: list[int], new_tokens: int,
                       rounds: int, objective: str = "causal") -> dict[str, dict[int, dict[str, Any]]]:
    """Tokens per second of several models measured in alternating rounds, for ratios that hold.

    Timing one model after the other lets a machine that slows down for a while (another job, a
    thermal limit) favour whichever ran first; a quantized variant once read 5.35× at batch 8 that
    way, and 0.68× on an idle machine.  Here every model generates once per round at each batch size,
    in turn, so a slow spell slows a whole round alike and the caller divides round by round.

    Per model and batch size: ``tokens_per_second`` (one value per round), ``latency_ms`` (likewise)
    and ``peak_memory_mb`` (of the untimed warm-up, which allocates the KV cache)."""
    out: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in models}
    for b in batch_sizes:
        inputs = {}
        for name, model in models.items():
            model.eval()
            inputs[name] = prompt_ids.repeat(b, 1).to(model.device)
            with peak_memory(model.device) as memory:
                _generate(model, inputs[name], new_tokens, objective)
            out[name][b] = {"tokens_per_second": [], "latency_ms": [], "peak_memory_mb": memory["peak_mb"]}
        for _ in range(rounds):
            for name, model in models.items():
                seconds, tokens = _timed(model, inputs[name], new_tokens, objective)
                out[name][b]["tokens_per_second"].append(tokens / seconds)
                out[name][b]["latency_ms"].append(1000 * seconds)
    return out


def weights_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
