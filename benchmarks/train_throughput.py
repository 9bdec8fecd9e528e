"""Training throughput: lmforge's Lightning step vs a plain PyTorch loop, side by side in one run.

Same Hugging Face model (built from the same config and seed), same batches (the packed demo corpus,
same collator), same threads, same optimizer and schedule, same gradient clipping.  The ratio
lmforge / plain tokens per second is what the framework costs (goal ≥ 0.95 on CPU).  The two
measurements alternate (plain, lmforge, plain, lmforge ...) so that machine noise hits both.  On a GPU
it also prints MFU from FLOPs per token and ``--peak-tflops``.

    .venv/bin/python benchmarks/train_throughput.py [--preset cpu-small] [--steps 40] [--rounds 2]

``--engine ray`` compares instead lmforge's local training with the same training on Ray Train
(``pretrain.scale.engine: ray``) on a Ray instance started on this machine: one worker with every
core against the local process with every core (the ratio is Ray's overhead; goal ≥ 0.8 on one
machine, ≥ 0.95 on a GPU), then as many workers as cores (or GPUs), data parallel, and a projection
of the throughput of N workers from the measured per-worker throughput and scaling efficiency.

Needs ``artifacts/packed`` and ``artifacts/tokenizer`` (``make demo`` or ``lmforge run -s group:tokenizer``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def plain_loop(arch, cfg, packed: Path, tokenizer, steps: int) -> float:
    """Tokens/s of a hand-written loop over the same data, model and optimizer."""
    from torch.utils.data import DataLoader

    from models.architectures import build_model
    from models.lightning_module import StreamSampler, lr_factor
    from models.training import collator_for, special_ids
    from models.data import PackedBlocks

    torch.manual_seed(cfg.seed)
    model = build_model(arch, special_ids(tokenizer)).to(DEVICE)
    blocks = PackedBlocks(packed, "train")
    loader = DataLoader(blocks, batch_size=cfg.batch_size, sampler=StreamSampler(len(blocks), cfg.seed), collate_fn=collator_for(arch.objective, tokenizer, cfg.seed))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=DEVICE == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    model.train()
    it = iter(loader)
    start = None
    for step in range(steps + 1):
        if step == 1:  # the first step warms up allocators and kernels, for both contenders
            start = time.perf_counter()
        batch = {k: v.to(DEVICE) for k, v in next(it).items()}
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size * blocks.block_size / (time.perf_counter() - start)


def lightning_loop(arch, cfg, packed: Path, tokenizer_dir: Path, steps: int) -> float:
    """Tokens/s of lmforge's training (Lightning Trainer, LMModule, PackedDataModule)."""
    from dataclasses import replace

    from models.train_config import Scale
    from models.training import pretrain

    with tempfile.TemporaryDirectory() as out:
        run = replace(cfg, max_steps=steps + 1, val_every=10**9, checkpoint_every=10**9)
        summary = pretrain(arch, run, packed, tokenizer_dir, Path(out), Scale(accelerator=DEVICE if DEVICE == "cpu" else "gpu"), progress=False)
    return summary["tokens_per_second"]  # measured between optimizer steps, the first one excluded


def ray_loop(arch, cfg, packed: Path, tokenizer_dir: Path, steps: int, workers: int, cpus_per_worker: float) -> dict:
    """Tokens/s (all workers, measured inside them as for the local run) and the wall time of the
    same training on ``workers`` Ray Train workers; the driver is this process."""
    from dataclasses import replace

    from models.ray_training import RaySettings, launch_on_ray
    from models.train_config import Scale

    settings = RaySettings(workers=workers, use_gpu=DEVICE == "cuda", resources_per_worker={"CPU": cpus_per_worker},
                           max_failures=0, name=f"benchmark-{time.time_ns()}")
    with tempfile.TemporaryDirectory() as out:
        settings.storage_path = str(Path(out) / "ray")
        run = replace(cfg, max_steps=steps + 1, val_every=10**9, checkpoint_every=10**9)
        start = time.perf_counter()
        summary = launch_on_ray(arch, run, packed, tokenizer_dir, Path(out), Scale(strategy="ddp", engine="ray", accelerator=DEVICE if DEVICE == "cpu" else "gpu"),
                                settings, report=lambda _line: None)
    return {"tokens_per_second": summary["tokens_per_second"], "wall_s": time.perf_counter() - start}


def compare_engines(arch, cfg, packed: Path, tok_dir: Path, args) -> None:
    """Local vs Ray Train on this machine, side by side, then data parallel on every core (or GPU)."""
    import os

    import ray

    cores = os.cpu_count() or 1
    slots = torch.cuda.device_count() if DEVICE == "cuda" else cores
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        local, one = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            local.append({"tokens_per_second": lightning_loop(arch, cfg, packed, tok_dir, args.steps), "wall_s": time.perf_counter() - start})
            one.append(ray_loop(arch, cfg, packed, tok_dir, args.steps, 1, cores))
            print(f"  local {local[-1]['tokens_per_second']:9.0f} tok/s ({local[-1]['wall_s']:5.1f} s)   "
                  f"ray, 1 worker × {cores} CPU {one[-1]['tokens_per_second']:9.0f} tok/s ({one[-1]['wall_s']:5.1f} s)")
        best_local = max(r["tokens_per_second"] for r in local)
        best_one = max(r["tokens_per_second"] for r in one)
        startup = min(r["wall_s"] for r in one) - min(r["wall_s"] for r in local)
        goal = 0.95 if DEVICE == "cuda" else 0.8
        print(f"best: local {best_local:.0f} tok/s, Ray Train {best_one:.0f} tok/s, ratio {best_one / best_local:.3f} "
              f"(goal >= {goal}); Ray's fixed start-up cost {startup:.1f} s per run")
        many = ray_loop(arch, cfg, packed, tok_dir, args.steps, slots, cores / slots if DEVICE == "cpu" else 1)
        per_worker = many["tokens_per_second"] / slots
        # on a GPU machine: n GPUs against one; on a CPU: the same cores split into workers, against one process
        efficiency = many["tokens_per_second"] / ((best_one * slots) if DEVICE == "cuda" else best_local)
        print(f"ray, {slots} workers (DDP, {'NCCL' if DEVICE == 'cuda' else 'gloo'}): {many['tokens_per_second']:.0f} tok/s, "
              f"{per_worker:.0f} per worker; {'scaling efficiency' if DEVICE == 'cuda' else 'against one process on the same cores'}: "
              f"{efficiency:.2f}")
        print(f"projection: N workers × {per_worker:.0f} tok/s per worker (measured with the gradient all-reduce; over a network "
              "between nodes it costs more than here):")
        for n in (8, 32, 128):
            print(f"  {n:4d} workers: ~{per_worker * n:,.0f} tok/s")
    finally:
        ray.shutdown()


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per-device peak, for MFU on GPU (H100 bf16: 989)")
    parser.add_argument("--engine", default="local", choices=["local", "ray"], help="local: against a plain loop; ray: local against Ray Train")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from models.architectures import flops_per_token, from_name
    from models.train_config import TrainConfig

    packed, tok_dir = REPO / "artifacts" / "packed" / "trained", REPO / "artifacts" / "tokenizer" / "hf"
    if not (packed / "meta.json").exists():
        sys.exit("artifacts/packed not found: run `make demo` (or `lmforge run -s group:tokenizer`) first")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    arch = from_name(args.preset, vocab_size=len(tokenizer))
    cfg = TrainConfig(batch_size=args.batch_size, precision=args.precision, max_steps=args.steps + 1)
    print(f"{args.preset} ({arch.family}), batch {args.batch_size} × 256 tokens, {torch.get_num_threads()} threads, {DEVICE}")
    if args.engine == "ray":
        compare_engines(arch, cfg, packed, tok_dir, args)
        return
    plain, ours = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(arch, cfg, packed, tokenizer, args.steps))
        ours.append(lightning_loop(arch, cfg, packed, tok_dir, args.steps))
        print(f"  plain {plain[-1]:9.0f} tok/s   lmforge {ours[-1]:9.0f} tok/s")
    best_plain, best_ours = max(plain), max(ours)
    print(f"best: plain {best_plain:.0f} tok/s, lmforge {best_ours:.0f} tok/s, ratio {best_ours / best_plain:.3f} (goal >= 0.95)")
    if DEVICE == "cuda":
        mfu = best_ours * flops_per_token(arch) / (args.peak_tflops * 1e12)
        print(f"MFU {mfu:.1%} at {args.peak_tflops} TFLOP/s peak")


if __name__ == "__main__":
    main()
