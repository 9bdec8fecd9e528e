"""Mixed precision where it pays: bf16 matrix products under ``torch.autocast``, weights and optimiser
state kept in fp32.

bf16 is only faster where the hardware multiplies bf16 natively: CUDA GPUs with bf16, and CPUs with
AVX512-BF16 or AMX (measured on a 2-core AVX512-BF16 CPU: a LoRA step of SmolLM2-135M on 8×128
tokens 7.0 s → 4.9 s, a full fine-tuning step 8.0 s → 4.7 s).  Elsewhere bf16 is emulated and slower
than fp32, so ``auto`` resolves per device and the resolved value is what runs record.

Evaluation (perplexity, benchmarks, ROUGE) stays in the model's own dtype: it is the yardstick.
"""

from __future__ import annotations

import torch

from models.train_config import MixedPrecision


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve(precision: MixedPrecision, device: torch.device | str) -> str:
    """``"32"`` or ``"bf16-mixed"``: ``auto`` becomes bf16-mixed where :func:`native_bf16`."""
    if precision == "auto":
        return "bf16-mixed" if native_bf16(device) else "32"
    return precision


def autocast(precision: MixedPrecision, device: torch.device | str):
    """The context to run forward passes in: bf16 autocast, or nothing (fp32)."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolve(precision, device) == "bf16-mixed")
