"""Pretraining with PyTorch Lightning: the module (model, loss, optimizer, schedule) and the data.

Kept deliberately thin so that the training step costs what a plain PyTorch loop costs: one forward
of the Hugging Face model, its own loss, one backward.  Everything here runs unchanged on a laptop
CPU and on GPUs; the strategy (DDP, FSDP) is the Trainer's business (``models.training``).

Exact resumption: each rank reads its own contiguous share of the blocks, in an order that is a pure
function of (seed, rank, position in its stream), and the data module saves how many samples were
consumed in every checkpoint, so a run restored from step N sees exactly the batches an uninterrupted
run would have seen after step N.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from models.architectures import ArchConfig, SpecialIds, build_model
from models.data import PackedBlocks
from models.loading import load_model
from models.train_config import TrainConfig


def rank_share(n: int, rank: int, world: int) -> range:
    """The training blocks rank ``rank`` of ``world`` owns: a contiguous ``1/world`` of the packed file.

    Contiguous so that a node reads one slice of the file's pages (not a scattered ``1/world`` of every
    page), which is what lets a worker stream its share from shared storage, or hold a copy of only
    its slice, however large the corpus."""
    if n < world:
        raise ValueError(f"the train split has {n} blocks, too few to give each of {world} workers one: "
                         "train on fewer workers or on more data")
    return range(rank * n // world, (rank + 1) * n // world)


class StreamSampler(Sampler[int]):
    """Endless, resumable block order in which each rank reads only its own share (``rank_share``).

    A rank draws its share in a fresh permutation every epoch, seeded by (seed, epoch, rank), so the
    order is a pure function of the position in the rank's stream.  ``start`` counts the samples
    consumed over all ranks (what checkpoints record); every rank consumes the same number per step,
    so rank r goes on from ``start // world`` of its own stream: exactly where it stopped when the run
    resumes on the same number of ranks.  On another number, each rank takes its new share from the
    same point of its epochs (the same share of the epoch done), so the run keeps its epoch count, but
    the epoch in progress draws its blocks afresh: some of them may come twice and some not at all
    until it ends.  One rank (a laptop) draws the whole split in a fresh permutation every epoch."""

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.share, self.seed, self.rank = rank_share(n, rank, world), seed, rank
        self.position = start // world  # samples this rank consumed before

    def __iter__(self):
        epoch, offset = divmod(self.position, len(self.share))
        while True:
            order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.share))
            for i in order[offset:]:
                yield self.share.start + int(i)
            epoch, offset = epoch + 1, 0


class PackedDataModule(pl.LightningDataModule):
    """Packed blocks of ``artifacts/packed``, collated for the objective."""

    def __init__(self, packed_dir: Path, collate, train: TrainConfig):
        super().__init__()
        self.packed_dir, self.collate, self.cfg = Path(packed_dir), collate, train
        self.consumed = 0  # samples, all ranks; restored from checkpoints by load_state_dict
        self._since = (0, 0)  # (samples consumed, global step) when this process's stream started

    def setup(self, stage: str | None = None) -> None:
        self.train_blocks = PackedBlocks(self.packed_dir, "train")
        self.val_blocks = PackedBlocks(self.packed_dir, "val")

    def samples_per_step(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        return self.cfg.batch_size * self.cfg.accumulate * world

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = StreamSampler(len(self.train_blocks), self.cfg.seed, self.consumed, rank, world)
        self._since = (self.consumed, self.trainer.global_step if self.trainer is not None else 0)
        return DataLoader(self.train_blocks, batch_size=self.cfg.batch_size, sampler=sampler, collate_fn=self.collate, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        n = min(len(self.val_blocks), self.cfg.val_batches * self.cfg.batch_size)
        subset = torch.utils.data.Subset(self.val_blocks, range(n))
        return DataLoader(subset, batch_size=self.cfg.batch_size, collate_fn=self.collate)

    def state_dict(self) -> dict[str, Any]:
        """Samples consumed so far, counted from where this process's stream started: a run resumed on
        another number of processes consumes another number of samples per step from there on."""
        consumed, step = self._since
        return {"consumed": consumed + (self.trainer.global_step - step) * self.samples_per_step()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = state["consumed"]


class LMModule(pl.LightningModule):
    """Any lmforge architecture, trained with its own loss (causal, MLM+NSP or span corruption), or
    an existing causal model (``init_from``: a Hugging Face directory) trained further on its own loss.

    ``train.max_minutes`` is a time budget that shapes the learning-rate schedule: the cosine follows
    whichever is further along, the steps or the clock, and training stops when the budget is spent,
    so a run cut short by its budget still ends annealed instead of mid-cosine.
    """

    def __init__(self, arch: dict | None, ids: dict, train: dict, tokens_per_sample: int, init_from: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.ids, self.cfg = SpecialIds(**ids), TrainConfig(**train)
        self.arch = ArchConfig(**arch) if arch is not None else None
        self.tokens_per_sample = tokens_per_sample
        if init_from is not None:
            self.model = load_model(init_from, "causal", dtype=torch.float32, attn_implementation="sdpa").train()
        else:
            self.model = build_model(self.arch, self.ids)
        if self.cfg.compile:
            self.model = torch.compile(self.model)
        self.budget_fraction = 0.0  # share of train.max_minutes spent (rank 0's clock, all ranks agree)
        self._elapsed_before = 0.0  # seconds spent by the runs this one resumes
        self._clock = time.perf_counter()

    def on_train_start(self) -> None:
        self._clock = time.perf_counter()

    def elapsed_seconds(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._clock

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """After each optimizer step: read the clock, then move the schedule on.  In this order (Lightning
        steps the scheduler before ``on_train_batch_end``), the rate set after the step that spends the
        budget is the floor (warm-up over) however long a step takes: a run stopped by its budget ends
        at lr × min_lr_ratio, and each step's rate follows the clock of the step before it."""
        if self.cfg.max_minutes:
            fraction = self.elapsed_seconds() / (60 * self.cfg.max_minutes)
            if self.trainer.world_size > 1:  # one clock for all ranks: the schedule must be the same everywhere
                fraction = self.trainer.strategy.broadcast(fraction, src=0)
            self.budget_fraction = fraction
            if fraction >= 1.0:
                self.trainer.should_stop = True
        scheduler.step()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["elapsed_seconds"] = self.elapsed_seconds()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._elapsed_before = checkpoint.get("elapsed_seconds", 0.0)

    def configure_model(self) -> None:
        """FSDP2: shard every transformer block, then the rest, over the data-parallel mesh.

        The blocks are the classes ``transformers`` itself never splits (``_no_split_modules``), so
        this works for every family without naming its layers.
        """
        from pytorch_lightning.strategies import ModelParallelStrategy

        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        blocks = set(getattr(self.model, "_no_split_modules", None) or [])
        for module in self.model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._sharded = True

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step}: lower pretrain.lr, "
                "keep pretrain.grad_clip on, or use precision 32"
            )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)  # before clipping
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a sharded DTensor
            self.log("train/grad_norm", norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by global norm here rather than through Lightning, which refuses two of our GPU setups:
        a fused optimizer under bf16-mixed (its AMP plugin assumes a fused step unscales gradients, but
        bf16 has no scaler) and FSDP (its plugin has no reference to the root module)."""
        if not gradient_clip_val:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if isinstance(root, FullyShardedDataParallel):  # FSDP1: flat shards, the root computes the global norm
            root.clip_grad_norm_(gradient_clip_val)
        else:  # one device, DDP (gradients already reduced) and FSDP2 (DTensor gradients)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], gradient_clip_val)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"  # the fused CUDA kernel: one launch for all parameters
        optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, self.cfg, self.budget_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lr_factor(step: int, cfg: TrainConfig, budget_fraction: float = 0.0) -> float:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` at ``max_steps``, or at the
    end of the time budget (``budget_fraction`` reaching 1) if that comes first."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, max(budget_fraction, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def module_args(arch: ArchConfig | None, ids: SpecialIds, train: TrainConfig, block_size: int, init_from: str | None = None) -> dict:
    return {"arch": asdict(arch) if arch is not None else None, "ids": asdict(ids), "train": asdict(train),
            "tokens_per_sample": block_size, "init_from": init_from}
