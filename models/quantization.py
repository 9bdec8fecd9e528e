"""Smaller, faster variants of a trained model: dtype casts and int8/int4 quantization, and magnitude
pruning.  Every variant is saved in a directory that ``models.loading.load_dir`` opens like any other.

- ``bf16`` / ``fp16``: every weight cast to 16 bits (half the size; fast where the hardware has
  16-bit matmuls, which laptop CPUs mostly lack);
- ``int8_dynamic``: PyTorch's dynamic quantization of ``nn.Linear`` (int8 weights per output channel,
  activations quantized on the fly, fbgemm/onednn int8 kernels): the CPU recipe.  Saved as the
  quantized state dict plus ``lmforge_quantization.json`` (the recipe to rebuild the modules), the
  one format ``from_pretrained`` cannot read: ``models.loading`` reads it;
- ``int8_weight_only`` / ``int4_weight_only``: torchao weight-only quantization through
  ``transformers``' ``TorchAoConfig`` (saved and reloaded by ``from_pretrained``); int4 needs kernels
  some devices lack, and is then reported as unsupported rather than faked.
- ``onnx_int8``: the model as an ONNX graph with int8 weights (ONNX Runtime GenAI's model builder,
  ``models.onnx_genai``), run by ONNX Runtime: one compiled graph per token instead of a Python step
  through every layer, which is what holds a small model back on a CPU.  Saved as the graph in
  ``onnx/`` with the config, the tokenizer and the recipe; a model the builder or ONNX Runtime cannot
  take (another architecture, attention heads under 16 dimensions) is reported as unsupported.

Embeddings and the output head stay in full precision (quantizing them costs the most accuracy), so
the whole-model size shrinks less than the linear layers do: both are reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from models.loading import QUANTIZED_STATE, RECIPE, dynamic_int8, load_model, objective_of
from models.train_config import VARIANTS


class UnsupportedVariant(RuntimeError):
    """The variant cannot be built here (missing kernel or library); the message says why."""


def _torchao_config(variant: str):
    import importlib.util

    from transformers import TorchAoConfig

    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as exc:
        raise UnsupportedVariant(f"{variant}: torchao is not installed ({exc})") from None
    if variant == "int4_weight_only" and importlib.util.find_spec("mslk") is None:
        raise UnsupportedVariant(f"{variant}: torchao's int4 weight packing needs the mslk kernel package, not installed here")
    return TorchAoConfig(Int8WeightOnlyConfig() if variant == "int8_weight_only" else Int4WeightOnlyConfig(group_size=32))


def _tied_head(model) -> set[str]:
    """Names of linear modules whose weight is the input embedding (a tied output head)."""
    embedding = model.get_input_embeddings().weight
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight is embedding}


def quantize(source: Path, variant: str, out: Path, keep_full_precision: tuple[str, ...] = ()):
    """Build ``variant`` of the model in ``source``, save it in ``out`` (with the tokenizer) and return it.
    ``keep_full_precision``: module-name patterns (``fnmatch``) that ``int8_dynamic`` leaves in fp32."""
    from fnmatch import fnmatch

    from transformers import AutoConfig, AutoTokenizer

    objective = objective_of(AutoConfig.from_pretrained(source))
    out.mkdir(parents=True, exist_ok=True)
    if variant in ("bf16", "fp16"):
        model = load_model(source, objective, dtype=torch.bfloat16 if variant == "bf16" else torch.float16)
        model.save_pretrained(str(out))
    elif variant == "int8_dynamic":
        model = load_model(source, objective).eval()
        # a tied head stays in full precision (quantizing it would untie the embedding), and so do the
        # layers the patterns name: their inputs carry outliers that int8 activations cannot hold
        keep = _tied_head(model) | {name for name, m in model.named_modules()
                                    if isinstance(m, torch.nn.Linear) and any(fnmatch(name, p) for p in keep_full_precision)}
        model = dynamic_int8(model, keep)
        model.config.save_pretrained(str(out))
        torch.save(model.state_dict(), out / QUANTIZED_STATE)
        (out / RECIPE).write_text(json.dumps({"variant": variant, "keep_full_precision": sorted(keep)}, indent=2) + "\n")
    elif variant in ("int8_weight_only", "int4_weight_only"):
        try:
            model = load_model(source, objective, quantization_config=_torchao_config(variant))
            model.eval()
            with torch.no_grad():  # fail here, not at generation time, if the device lacks the kernel
                model(input_ids=torch.tensor([[1, 2, 3]], device=model.device))
        except UnsupportedVariant:
            raise
        except Exception as exc:  # torchao raises several types for a kernel this device lacks
            raise UnsupportedVariant(f"{variant}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        model.save_pretrained(str(out), safe_serialization=False)  # torchao tensors are not safetensors
    elif variant == "onnx_int8":
        from transformers import AutoConfig

        from models.onnx_genai import OnnxBuildError, OnnxCausalLM, build

        config = AutoConfig.from_pretrained(source)
        try:
            build(source, out / "onnx", "int8")
            model = OnnxCausalLM(out / "onnx", config)
            model(input_ids=torch.tensor([[1, 2, 3]]))  # fail here, not at generation time, if ONNX Runtime cannot run it
        except Exception as exc:  # the builder's error, or ONNX Runtime's for a graph it cannot run
            message = str(exc) if isinstance(exc, OnnxBuildError) else f"ONNX Runtime cannot run it: {str(exc).strip().splitlines()[0][:200]}"
            raise UnsupportedVariant(f"{variant}: {message}") from None
        config.save_pretrained(str(out))
        (out / RECIPE).write_text(json.dumps({"variant": variant, "runtime": "onnxruntime", "onnx": "onnx"}, indent=2) + "\n")
    else:
        raise ValueError(f"unknown variant '{variant}' (variants: {', '.join(VARIANTS)})")
    AutoTokenizer.from_pretrained(source).save_pretrained(str(out))
    return model.eval()


def tensor_bytes(t: Any) -> int:
    """Bytes a weight really occupies: int8/int4 data plus scales for quantized tensors."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__"):  # torchao tensor subclasses: sum their inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if t.is_quantized:
        scales = t.q_per_channel_scales() if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) else torch.empty(1)
        return t.numel() * t.element_size() + 2 * scales.numel() * 4  # scales and zero points
    return t.numel() * t.element_size()


def linear_weight_bytes(model) -> int:
    """Bytes of the weights of every linear layer (quantized or not), tied output heads excluded."""
    if hasattr(model, "linear_weight_bytes"):  # an ONNX graph counts its own (``OnnxCausalLM``)
        return model.linear_weight_bytes()
    total = 0
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            total += tensor_bytes(module.weight())
        elif isinstance(module, torch.nn.Linear) and module.weight is not embedding:
            total += tensor_bytes(module.weight)
    return total


def disk_bytes(path: Path) -> int:
    """Size of the saved weights (every file but the tokenizer's and the configs, in subfolders too)."""
    skip = ("tokenizer", "config", "generation_config", "genai_config", "special_tokens", "chat_template", "vocab", "merges", RECIPE)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith(skip))


def prune(model, sparsity: float, structured: bool) -> float:
    """Magnitude pruning of every linear layer but a tied head, made permanent; returns the share of
    linear weights that are now zero.  Unstructured: the smallest |w| individually; structured: whole
    output rows with the smallest L2 norm (what removes matmul work on dense hardware)."""
    from torch.nn.utils import prune as torch_prune

    embedding = model.get_input_embeddings().weight
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not embedding]
    for m in linears:
        if structured:
            torch_prune.ln_structured(m, "weight", amount=sparsity, n=2, dim=0)
        else:
            torch_prune.l1_unstructured(m, "weight", amount=sparsity)
        torch_prune.remove(m, "weight")
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return zeros / max(sum(m.weight.numel() for m in linears), 1)
