"""Items/s of lmforge's benchmark scoring vs scoring one request at a time, side by side.

The same model (SmolLM2-135M-Instruct, the demo's, dequantized), the same seeded items of the
configured tasks (``benchmarks.tasks``) and the same lm-eval tasks, scored through
``lmforge.benchmarks.run_harness`` three ways, in turn within each round so that a slow phase of the
machine hits all of them:

- lmforge: contexts shared by their answers (``models.scoring``), batch B;
- lm-eval's ``hf`` model as it is, batch B;
- lm-eval's ``hf`` model, one request at a time (batch 1).

Prints items/s, the ratios to one request at a time (goal: lmforge ≥ 3× on 2 cores) and whether
the accuracies agree.

    python benchmarks/eval_throughput.py [--items 24] [--batch-size 16] [--tasks hellaswag piqa ...] [--rounds 2]
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
    ap.add_argument("--tasks", nargs="+", default=None, choices=[t for t in STANDARD if t != "gsm8k"],
                    help="default: benchmarks.tasks of params.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-throughput-") as tmp:
        root, params = Path(tmp), load_params()
        b = params.benchmarks
        args.tasks = args.tasks or [t for t in b.tasks if t != "gsm8k"]
        b.tasks, b.user, b.max_items, b.num_fewshot = args.tasks, [], args.items, {}
        run_benchmark_data(params, out=root / "data", require_split=False)
        materialize(resolve_source(params, CandidateParams(name="smollm2", source=str(fetch_smollm2()), use="as_is")), root / "model")
        model, tokenizer, _ = load(root / "model", device="cpu")
        metrics = {n: STANDARD[n].metric for n in args.tasks}
        ways = {f"lmforge (shared contexts, batch {args.batch_size})": (True, args.batch_size),
                f"lm-eval hf (batch {args.batch_size})": (False, args.batch_size), "lm-eval hf (one at a time)": (False, 1)}
        seconds: dict[str, list[float]] = {w: [] for w in ways}
        results = {}
        for _ in range(args.rounds):
            for way, (shared, batch) in ways.items():
                start = time.perf_counter()
                results[way], _ = run_harness(model, tokenizer, root / "data" / "tasks", args.tasks, metrics, batch, shared=shared)
                seconds[way].append(time.perf_counter() - start)
    base = "lm-eval hf (one at a time)"
    n = sum(r["n"] for r in results[base].values())
    print(f"{n} items over {len(args.tasks)} tasks ({', '.join(args.tasks)}), best of {args.rounds} round(s), {torch.get_num_threads()} threads")
    print("| scoring | items/s | × one at a time | same accuracies |\n|---|---|---|---|")
    for way in ways:
        same = all(results[way][t]["value"] == results[base][t]["value"] for t in args.tasks)
        print(f"| {way} | {n / min(seconds[way]):.2f} | {min(seconds[base]) / min(seconds[way]):.2f}× | {same} |")


if __name__ == "__main__":
    main()
