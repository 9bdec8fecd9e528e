"""Quantization: size, CPU generation speed and perplexity of each variant against full precision,
measured side by side in one run.

For every variant (default: int8 dynamic and int8 weight-only, bf16, and ONNX Runtime's int8 graph) it prints the linear-weight size
ratio (fp32 bytes / variant bytes), the speedup of greedy generation with the KV cache at batch 1 and
8 (tokens/s variant / tokens/s fp32 within each round, median and spread over the rounds; the
rounds time every model in turn, as the quantize stage does, so that machine noise hits all of
them) and the perplexity change on the test split.  Goals (the serving issue's): ≥ 1.5× faster CPU
generation at batch 1 and 8 in the slowest round, ≤ 2% perplexity increase.

    .venv/bin/python benchmarks/quantization.py                      # the demo champion (after `make demo`)
    .venv/bin/python benchmarks/quantization.py --preset 125m        # + a randomly initialised 125m model:
                                                                      #   speed at a realistic matrix size
    .venv/bin/python benchmarks/quantization.py --model-dir DIR      # another model directory: size and speed only

Small models are dominated by per-token overheads (Python, attention, sampling), so int8 kernels only
pay off once the linear layers are large: ``--preset`` shows where the crossover lies on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compare(source: Path, variants: list[str], rounds: int, new_tokens: int, score, keep: tuple[str, ...] = ()) -> None:
    import statistics

    from models.evaluation import speed_side_by_side
    from models.generation import load
    from models.quantization import UnsupportedVariant, linear_weight_bytes, quantize

    reference, _, _ = load(source, device="cpu")
    base_ppl = score(reference) if score else None
    print(f"\n{source}: {sum(p.numel() for p in reference.parameters()):,} parameters, linear weights {linear_weight_bytes(reference) / 2**20:.1f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        models = {"fp32": reference}
        for variant in variants:
            try:
                quantize(source, variant, Path(tmp) / variant, keep)
            except UnsupportedVariant as exc:
                print(f"{variant:>18} | unsupported here: {exc}")
                continue
            models[variant], _, _ = load(Path(tmp) / variant, device="cpu")
        # every model once per round, in turn: a slow spell of the machine slows a whole round alike
        timings = speed_side_by_side(models, torch.arange(5, 37)[None], [1, 8], new_tokens, rounds)
        print(f"{'variant':>18} | size ratio | speedup b1 (rounds' spread) | speedup b8 (rounds' spread) | perplexity change | goals met")
        for variant, model in list(models.items())[1:]:
            ratio = linear_weight_bytes(reference) / linear_weight_bytes(model)
            cells, slowest = [], []
            for b in (1, 8):
                per_round = [v / f for v, f in zip(timings[variant][b]["tokens_per_second"], timings["fp32"][b]["tokens_per_second"])]
                cells.append(f"{statistics.median(per_round):5.2f}× ({min(per_round):.2f}–{max(per_round):.2f})")
                slowest.append(min(per_round))
            change = score(model) / base_ppl - 1 if score else None
            goals = ("yes" if min(slowest) >= 1.5 and change <= 0.02 else "no") if score else "n/a"
            print(f"{variant:>18} | {ratio:9.2f}× | {cells[0]:>27} | {cells[1]:>27} | "
                  f"{f'{change:+.2%}' if score else 'n/a (no test split)':>17} | {goals}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["int8_dynamic", "int8_weight_only", "bf16", "onnx_int8"])
    parser.add_argument("--model-dir", type=Path, help="measure this model directory instead of the champion (no test split: no perplexity)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--preset", help="also measure a randomly initialised model of this preset (e.g. 125m)")
    args = parser.parse_args()

    from lmforge.compress import _scorer
    from lmforge.params import load_params

    params = load_params()
    keep = tuple(params.quantize.keep_full_precision)  # as the quantize asset builds int8_dynamic
    if args.model_dir:
        return compare(args.model_dir, args.variants, args.rounds, args.new_tokens, None, keep)
    select = params.stage_dir("select") / "summary.json"
    if not select.exists():
        sys.exit("no champion yet: run `make demo` (or lmforge run) first")
    champion = params.path(json.loads(select.read_text())["champion_dir"])
    score, _ = _scorer(params, champion)
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
