"""Training settings as plain dataclasses (no torch import), so that ``params.yaml`` can be parsed
into them without loading PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults suit the cpu-small preset on the demo corpus."""

    max_steps: int = 300
    max_minutes: float | None = None  # wall-clock budget; None: steps only
    batch_size: int = 8  # blocks per optimizer step and device, before accumulation
    accumulate: int = 1  # gradient accumulation: effective batch = batch_size × accumulate × devices
    lr: float = 3e-3  # small models tolerate high rates; ~3e-4 for 125M+
    min_lr_ratio: float = 0.1  # cosine decays to lr × min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on matrices only: biases, norms and gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["32", "bf16-mixed"] = "32"
    compile: bool = False  # torch.compile the model (GPU: faster after warm-up; CPU: rarely worth it)
    val_every: int = 50  # steps between validations
    val_batches: int = 10
    early_stopping_patience: int = 0  # validations without improvement before stopping; 0: off
    checkpoint_every: int = 50
    seed: int = 1337
    num_workers: int = 0  # data loading is a memory-mapped slice: workers rarely pay on CPU


@dataclass
class Scale:
    """Where and how to run: the same code from a laptop CPU to multi-node GPUs."""

    # auto: one CPU or GPU; ddp: data parallel; fsdp: fully sharded (Lightning FSDPStrategy, GPUs);
    # fsdp2: per-parameter sharding (torch fully_shard via ModelParallelStrategy; GPUs, and CPU with gloo)
    strategy: Literal["auto", "ddp", "fsdp", "fsdp2"] = "auto"
    devices: int = 1  # per node; -1: every visible device
    num_nodes: int = 1  # > 1: launch with torchrun or SLURM (README "Scaling")
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    activation_checkpointing: bool = False  # fsdp: recompute block activations in backward (memory ↓, time ↑)
    state_dict: Literal["sharded", "full"] = "sharded"  # fsdp checkpoints: one file per rank, or gathered
    peak_tflops: float = 0.0  # per device, for MFU (H100 bf16 dense: 989); 0: MFU not reported
