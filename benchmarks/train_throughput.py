"""Training throughput: lmforge's Lightning step vs a plain PyTorch loop, side by side in one run.

Same Hugging Face model (built from the same config and seed), same batches (the packed demo corpus,
same collator), same threads, same optimizer and schedule, same gradient clipping.  The ratio
lmforge / plain tokens per second is what the framework costs (goal ≥ 0.95 on CPU).  The two
measurements alternate (plain, lmforge, plain, lmforge ...) so that machine noise hits both.  On a GPU
it also prints MFU from FLOPs per token and ``--peak-tflops``.

    .venv/bin/python benchmarks/train_throughput.py [--preset cpu-small] [--steps 40] [--rounds 2]

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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per-device peak, for MFU on GPU (H100 bf16: 989)")
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
