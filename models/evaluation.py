"""Evaluation of a trained language model on held-out packed tokens: scores, the context-length
curve, inference speed and memory.  Plain torch; ``lmforge.evaluate`` runs it for each candidate.

- ``lm_scores``: perplexity, bits per byte, next-token (or masked-token) accuracy and top-5 accuracy
  over blocks collated exactly as in training (``models.training.collator_for``).
- ``context_curve``: perplexity of causal models on sequences of 1×, 2×, 4×... the training block
  length, over the same tokens for every length.  Learned position embeddings cannot go past their
  table (reported as None); RoPE and ALiBi can, and the curve shows how well they extrapolate.
- ``speed``: generated tokens per second at several batch sizes, KV cache on, and peak memory.
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


@torch.no_grad()
def speed(model, prompt_ids: torch.Tensor, batch_sizes: list[int], new_tokens: int, objective: str) -> list[dict[str, Any]]:
    """Tokens per second and peak memory at each batch size.

    Causal and seq2seq models generate exactly ``new_tokens`` tokens greedily after ``prompt_ids``
    (one row, repeated across the batch) with the KV cache; masked LMs (no generation) are timed on
    forward passes over the prompt.  One untimed warm-up run first, then the best of three."""
    model.eval()

    def run(ids: torch.Tensor) -> int:
        """One timed unit of work; returns the tokens it produced (or read, for masked LMs)."""
        if objective == "mlm":
            model(input_ids=ids)
            return ids.numel()
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True, pad_token_id=model.config.pad_token_id, temperature=None, top_k=None, top_p=None,
        )
        return ids.shape[0] * new_tokens

    rows = []
    for b in batch_sizes:
        ids = prompt_ids.repeat(b, 1).to(model.device)
        times = []
        with peak_memory(model.device) as memory:  # the warm-up allocates the KV cache: measure it too
            run(ids)
            for _ in range(3):
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                tokens = run(ids)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        rows.append({"batch_size": b, "tokens_per_second": tokens / min(times), "latency_ms": 1000 * min(times), "peak_memory_mb": memory["peak_mb"]})
    return rows


def weights_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
