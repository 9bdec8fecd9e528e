"""Reproduce published lm-eval figures of SmolLM2-135M-Instruct with lmforge's benchmark path.

The demo's model, the pinned Q4_1 GGUF dequantized (as every lmforge stage loads it), scored 0-shot on
the *full* HellaSwag, ARC-Challenge and PIQA sets of ``benchmarks.dir`` through the same task files
(``run_benchmark_data``, every item, contaminated or not) and the same ``lmforge.benchmarks.run_harness``
the pipeline uses; printed next to a public lm-eval
run of the HF checkpoint (docs/benchmarks.md).  CPU: 12,360 loglikelihood requests, ~18 minutes
on 2 cores.

    python benchmarks/published_figures.py [--tasks hellaswag arc_challenge piqa] [--max-items 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmforge.benchdata import STANDARD, run_benchmark_data
from lmforge.benchmarks import run_harness
from lmforge.fetch import fetch_smollm2
from lmforge.params import CandidateParams, load_params
from lmforge.sources import materialize, resolve_source
from models.generation import load

#: A public lm-eval (0-shot) run of HuggingFaceTB/SmolLM2-135M-Instruct (the checkpoint, bf16/fp32).
PUBLISHED = {"hellaswag": 42.99, "arc_challenge": 27.73, "piqa": 66.92}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(PUBLISHED), choices=list(STANDARD))
    ap.add_argument("--max-items", type=int, default=0, help="a seeded subset per task (0: the full set)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmforge-published-") as tmp:
        root, params = Path(tmp), load_params()
        b = params.benchmarks
        b.tasks, b.user, b.max_items, b.num_fewshot, b.exclude_contaminated = args.tasks, [], args.max_items, {}, False
        run_benchmark_data(params, out=root / "data", require_split=False)
        materialize(resolve_source(params, CandidateParams(name="smollm2", source=str(fetch_smollm2()), use="as_is")), root / "smollm2")
        model, tokenizer, _ = load(root / "smollm2", device="cpu")
        started = time.perf_counter()
        scores, _ = run_harness(model, tokenizer, root / "data" / "tasks", args.tasks, {n: STANDARD[n].metric for n in args.tasks}, args.batch_size, print)
        seconds = time.perf_counter() - started
    print("\n| task | metric | lmforge (Q4_1 GGUF, dequantized) | published (HF checkpoint) | difference / standard error | items |")
    print("|---|---|---|---|---|---|")
    for name, row in scores.items():
        ours, se = 100 * row["value"], 100 * row["stderr"]
        ref = PUBLISHED.get(name)
        diff = f"{ours - ref:+.2f} / {se:.2f} = {(ours - ref) / se:+.1f} SE" if ref is not None and se else "—"
        print(f"| {name} | {row['metric']} | {ours:.2f} ± {se:.2f} | {ref if ref is not None else '—'} | {diff} | {row['n']} |")
    print(f"\n{sum(r['n'] for r in scores.values())} items in {seconds:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"scores": scores, "published": PUBLISHED, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
