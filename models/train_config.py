"""Settings of the ``models`` code that ``params.yaml`` is parsed into, as plain dataclasses and
literals (no torch import), so that ``params.yaml`` can be parsed without loading PyTorch.

``lmforge.params`` takes them as its schema, so each default and each allowed value is written once,
here: a default is what a params file that leaves the key out gets.
"""

from __future__ import annotations

import typing
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
    # local: this machine (Lightning, or torchrun for several processes); ray: Ray Train workers on the
    # cluster that params.yaml's ``cluster`` section names (how many: ``cluster.workers``)
    engine: Literal["local", "ray"] = "local"
    devices: int = 1  # per node; -1: every visible device
    num_nodes: int = 1  # > 1: launch with torchrun or SLURM (docs/training-and-scaling.md)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    activation_checkpointing: bool = False  # fsdp: recompute block activations in backward (memory ↓, time ↑)
    state_dict: Literal["sharded", "full"] = "sharded"  # fsdp checkpoints: one file per rank, or gathered
    peak_tflops: float = 0.0  # per device, for MFU (H100 bf16 dense: 989); 0: MFU not reported


#: ``auto``: bf16-mixed where the device multiplies bf16 in hardware (``models.precision``), else fp32.
MixedPrecision = Literal["auto", "32", "bf16-mixed"]


@dataclass
class DistilSettings:
    """How ``models.distillation.train_student`` trains a student (``params.yaml`` → ``distil``)."""

    steps: int = 150  # the same for the distilled student and the from-scratch baseline
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 30
    temperature: float = 2.0  # softens the teacher's distribution: its near-misses carry information
    alpha: float = 0.5  # weight of the teacher's (KL) term against the data's cross-entropy
    teacher_precision: MixedPrecision = "auto"  # the teacher's forward pass (only its logits are used)
    seed: int = 1337


#: An ONNX model that ``models.onnx_genai.build`` writes (ONNX Runtime GenAI's model builder precisions).
OnnxPrecision = Literal["fp32", "int8", "int4"]

#: A variant that ``models.quantization.quantize`` builds (its module docstring says what each is).
Variant = Literal["bf16", "fp16", "int8_dynamic", "int8_weight_only", "int4_weight_only", "onnx_int8"]
VARIANTS: tuple[str, ...] = typing.get_args(Variant)
