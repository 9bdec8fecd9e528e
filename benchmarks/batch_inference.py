"""Batch inference: tokens/s one prompt at a time vs in batches, side by side in one run (goal ≥ 3×).

One model, loaded once (the demo champion ``models:/lmforge@champion`` from the project's registry by
default), the same prompts (``data/prompts/prompts.jsonl``, else the demo's questions built in memory),
the same greedy settings, the same threads.  Both sides call ``models.generation.complete``, the
function the ``batch_inference`` asset runs per batch: batch 1 (one ``model.generate`` per prompt) and
batch ``--batch-size``.  Tokens counted are the tokens each prompt really generated (up to its
end-of-sequence token; the padding of rows that finished early in a batch is not counted).  The two
alternate (one by one, batched, one by one, batched ...) so that machine noise hits both; the best
round of each is compared.

    .venv/bin/python benchmarks/batch_inference.py [--model DIR|URI] [--prompts 16] [--batch-size 8] [--max-new-tokens 24] [--rounds 2]

Needs the registered champion (``make demo``), or ``--model`` a model directory
(e.g. ``artifacts/pretrain/smollm2/hf``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def demo_prompts() -> list[str]:
    """The demo's batch-inference prompts: the file ``lmforge demo-corpus`` writes, or the same built here."""
    path = REPO / "data" / "prompts" / "prompts.jsonl"
    if path.is_file():
        return [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from lmforge import demo_corpus

    modules = [m for m in sorted(sys.stdlib_module_names) if not m.startswith("_")]
    return [r["prompt"] for r in demo_corpus.demo_prompts([name for name, _ in demo_corpus.distributions()], modules)]


def timed(model, tokenizer, prompts: list[str], sampling, batch_size: int, chat: bool) -> tuple[float, int, list[str]]:
    """(seconds, generated tokens, completions) of ``prompts`` in batches of ``batch_size``."""
    from models.generation import complete

    texts, tokens = [], 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        for g in complete(model, tokenizer, prompts[first : first + batch_size], sampling, chat=chat, offset=first):
            texts.append(g.text)
            tokens += g.completion_tokens
    return time.perf_counter() - start, tokens, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or MLflow URI (default: models:/<registry.name>@champion)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per side (the demo's, repeated if it has fewer)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lmforge.batch_inference import chat_mode, default_model, load_model
    from lmforge.params import SamplingParams, load_params
    from lmforge.tracking import tracking_uri

    params = load_params()
    ref = args.model or default_model(params.registry.name)
    model, tokenizer, version = load_model(ref, tracking_uri(params))
    chat = chat_mode("auto", tokenizer, ref)
    pool = demo_prompts()
    prompts = [pool[i % len(pool)] for i in range(args.prompts)]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    parameters = sum(p.numel() for p in model.parameters())
    load = os.getloadavg()[0]
    print(f"{ref} ({version}, {parameters / 1e6:.1f} M parameters, chat {'on' if chat else 'off'}), {len(prompts)} prompts × "
          f"≤{args.max_new_tokens} new tokens, greedy, {torch.get_num_threads()} threads, {model.device}, load average {load:.2f} at start")
    timed(model, tokenizer, prompts[:1], sampling, 1, chat)  # warm-up: allocators, kernels, caches
    single, batched = [], []
    agree = 0
    for _ in range(args.rounds):
        seconds, tokens, one = timed(model, tokenizer, prompts, sampling, 1, chat)
        single.append(tokens / seconds)
        seconds_b, tokens_b, many = timed(model, tokenizer, prompts, sampling, args.batch_size, chat)
        batched.append(tokens_b / seconds_b)
        agree = sum(a == b for a, b in zip(one, many))
        print(f"  one by one {single[-1]:7.1f} tok/s ({tokens} tokens, {seconds:5.1f} s)   "
              f"batch {args.batch_size} {batched[-1]:7.1f} tok/s ({tokens_b} tokens, {seconds_b:5.1f} s)")
    best_single, best_batched = max(single), max(batched)
    print(f"identical completions one by one and batched: {agree} of {len(prompts)} (left padding changes float rounding, rarely the argmax)")
    print(f"best: one by one {best_single:.1f} tok/s, batch {args.batch_size} {best_batched:.1f} tok/s, "
          f"ratio {best_batched / best_single:.2f}× (goal >= 3×); load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
