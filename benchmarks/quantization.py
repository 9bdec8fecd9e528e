"""Quantization: size, CPU generation speed and perplexity of each variant against full precision,
measured side by side in one run.

For every variant (default: int8 dynamic and int8 weight-only, bf16) it prints the linear-weight size
ratio (fp32 bytes / variant bytes), the speedup of greedy generation with the KV cache at batch 1 and
8 (tokens/s variant / tokens/s fp32; the timed rounds alternate fp32, variant, fp32, variant... so
that machine noise hits both) and the perplexity change on the test split.  Goals: ≥ 3× smaller
linear weights, ≥ 1.5× faster CPU generation, ≤ 2% perplexity increase.

    .venv/bin/python benchmarks/quantization.py                      # the demo champion (after `make demo`)
    .venv/bin/python benchmarks/quantization.py --preset 125m        # + a randomly initialised 125m model:
                                                                      #   speed at a realistic matrix size

Small models are dominated by per-token overheads (Python, attention, sampling), so int8 kernels only
pay off once the linear layers are large: ``--preset`` shows where the crossover lies on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tokens_per_second(model, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, use_cache=True, pad_token_id=0, temperature=None, top_k=None, top_p=None)
    return ids.shape[0] * new_tokens / (time.perf_counter() - start)


def compare(source: Path, variants: list[str], rounds: int, new_tokens: int, score, keep: tuple[str, ...] = ()) -> None:
    from models.generation import load
    from models.quantization import UnsupportedVariant, linear_weight_bytes, quantize

    reference, _, _ = load(source, device="cpu")
    ids = torch.arange(5, 37)[None]
    base_ppl = score(reference) if score else None
    print(f"\n{source}: {sum(p.numel() for p in reference.parameters()):,} parameters, linear weights {linear_weight_bytes(reference) / 2**20:.1f} MiB")
    print(f"{'variant':>18} | size ratio | speedup b1 | speedup b8 | perplexity change")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            try:
                quantize(source, variant, Path(tmp) / variant, keep)
            except UnsupportedVariant as exc:
                print(f"{variant:>18} | unsupported here: {exc}")
                continue
            model, _, _ = load(Path(tmp) / variant, device="cpu")
            ratio = linear_weight_bytes(reference) / linear_weight_bytes(model)
            speedups = []
            for b in (1, 8):
                batch = ids.repeat(b, 1)
                tokens_per_second(reference, batch, 4), tokens_per_second(model, batch, 4)  # warm-up
                ref, var = [], []
                for _ in range(rounds):  # alternate, so that noise hits both
                    ref.append(tokens_per_second(reference, batch, new_tokens))
                    var.append(tokens_per_second(model, batch, new_tokens))
                speedups.append(max(var) / max(ref))
            change = f"{score(model) / base_ppl - 1:+.2%}" if score else "n/a (random weights)"
            print(f"{variant:>18} | {ratio:10.2f}× | {speedups[0]:9.2f}× | {speedups[1]:9.2f}× | {change}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["int8_dynamic", "int8_weight_only", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--preset", help="also measure a randomly initialised model of this preset (e.g. 125m)")
    args = parser.parse_args()

    from lmforge.compress import _scorer
    from lmforge.params import load_params

    params = load_params()
    select = params.stage_dir("select") / "summary.json"
    if not select.exists():
        sys.exit("no champion yet: run `make demo` (or lmforge run) first")
    champion = params.path(json.loads(select.read_text())["champion_dir"])
    score, _ = _scorer(params, champion)
    keep = tuple(params.quantize.keep_full_precision)  # as the quantize asset builds int8_dynamic
    compare(champion, args.variants, args.rounds, args.new_tokens, lambda m: score(m).perplexity, keep)
    if args.preset:
        from transformers import AutoTokenizer

        from models.architectures import build_model, from_name
        from models.training import special_ids

        tokenizer = AutoTokenizer.from_pretrained(champion)
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            build_model(from_name(args.preset, vocab_size=len(tokenizer)), special_ids(tokenizer)).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            compare(Path(tmp), args.variants, args.rounds, args.new_tokens, None, keep)


if __name__ == "__main__":
    main()
