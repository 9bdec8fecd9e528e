"""Items/s of lmforge's benchmark scoring, batched (``benchmarks.batch_size``) vs one request at a time.

The same model (SmolLM2-135M-Instruct, the demo's, dequantized), the same seeded items and the same
lm-eval tasks, scored through ``lmforge.benchmarks.run_harness`` at batch size B and at batch size 1,
alternating (B, 1, B, 1) so that a slow phase of the machine hits both; prints items/s and the ratio
(goal: ≥ 3× on 2 cores).

    python benchmarks/eval_throughput.py [--items 24] [--batch-size 16] [--tasks arc_challenge piqa winogrande]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lmforge.benchdata import STANDARD, run_benchmark_data
from lmforge.benchmarks import run_harness
from lmforge.fetch import fetch_smollm2
from lmforge.params import CandidateParams, load_params
from lmforge.sources import materialize, resolve_source
from models.generation import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=24, help="items per task")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=["arc_challenge", "piqa", "winogrande"], choices=[t for t in STANDARD if t != "gsm8k"])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-throughput-") as tmp:
        root, params = Path(tmp), load_params()
        b = params.benchmarks
        b.tasks, b.user, b.max_items, b.num_fewshot = args.tasks, [], args.items, {}
        run_benchmark_data(params, out=root / "data", require_split=False)
        materialize(resolve_source(params, CandidateParams(name="smollm2", source=str(fetch_smollm2()), use="as_is")), root / "model")
        model, tokenizer, _ = load(root / "model", device="cpu")
        metrics = {n: STANDARD[n].metric for n in args.tasks}
        seconds = {args.batch_size: [], 1: []}
        results = {}
        for _ in range(args.rounds):
            for batch in (args.batch_size, 1):
                start = time.perf_counter()
                results[batch], _ = run_harness(model, tokenizer, root / "data" / "tasks", args.tasks, metrics, batch)
                seconds[batch].append(time.perf_counter() - start)
    n = sum(r["n"] for r in results[1].values())
    same = all(results[1][t]["value"] == results[args.batch_size][t]["value"] for t in args.tasks)
    fast, slow = n / min(seconds[args.batch_size]), n / min(seconds[1])
    print(f"{n} items over {len(args.tasks)} tasks, best of {args.rounds} rounds each, {torch.get_num_threads()} threads")
    print(f"batched (batch {args.batch_size}): {fast:.2f} items/s · one request at a time: {slow:.2f} items/s · ratio {fast / slow:.2f}×")
    print(f"same accuracies both ways: {same}")


if __name__ == "__main__":
    main()
