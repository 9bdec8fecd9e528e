"""Loading a saved model directory: the one place that knows which ``transformers`` Auto class opens a
model of each objective, and how to read every directory format lmforge writes.

Every format but two is a plain Hugging Face directory that ``from_pretrained`` opens (lmforge's own
models, fine-tuned and pruned ones, the bf16/fp16 casts and torchao's weight-only quantization).  Two
exceptions carry a recipe (``RECIPE``) beside their config (``models.quantization``).
``int8_dynamic``: PyTorch's dynamically quantized modules are not a ``transformers`` format, so the
directory holds the quantized state dict and the recipe names the linear layers left in full
precision; ``load_dir`` rebuilds the model from them.  ``onnx_int8``: an ONNX graph that ONNX
Runtime runs (``models.onnx_genai.OnnxCausalLM``, which generates and scores like a ``transformers``
model); the recipe names its folder.  That reader lives here rather than in ``models.quantization`` so that loading any
model never depends on the code that builds the variants.

Nothing here imports torch or ``transformers`` at module level: importing ``models.generation`` (the
CLI's ``generate``) stays cheap until a model is actually loaded.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: How a model predicts tokens → the ``transformers`` Auto class that loads it with that head.
AUTO_CLASSES = {"causal": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM", "seq2seq": "AutoModelForSeq2SeqLM"}

#: Beside an ``int8_dynamic`` model's config: the variant and the linear layers kept in fp32; beside an
#: ``onnx_int8`` one: the variant, ``runtime: onnxruntime`` and the folder of its graph (``onnx``).
RECIPE = "lmforge_quantization.json"
#: The ``int8_dynamic`` model's weights (``torch.save`` of its state dict: quantized tensors are not safetensors).
QUANTIZED_STATE = "quantized_state_dict.pt"


def objective_of(config) -> str:
    """``causal``, ``mlm`` or ``seq2seq``: how a model predicts tokens, from its Hugging Face config."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in ("bert", "roberta", "distilbert"):
        return "mlm"
    return "causal"


def auto_class(objective: str):
    """The ``transformers`` Auto class for ``objective`` (a key of ``AUTO_CLASSES``)."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[objective])


def load_model(path: str | Path, objective: str | None = None, **options: Any):
    """The model in ``path`` with its objective's head, as ``from_pretrained`` returns it (the caller
    picks train or eval mode and the device).  ``objective``: None reads it from the model's config;
    a caller that accepts only one kind of model names it.  ``options`` go to ``from_pretrained``
    (``dtype``, ``attn_implementation``, ``quantization_config``, ``trust_remote_code``, ...)."""
    if objective is None:
        from transformers import AutoConfig

        objective = objective_of(AutoConfig.from_pretrained(path))
    return auto_class(objective).from_pretrained(path, **options)


def gguf_options(file_name: str) -> dict[str, Any]:
    """``from_pretrained`` options that read a GGUF file dequantized to float32 with no GGUF quantizer
    left attached (``save_pretrained`` refuses a model that has one)."""
    from transformers import GgufConfig

    return {"gguf_file": file_name, "quantization_config": GgufConfig(dequantize=True)}


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within this block, gguf-py parses each GGUF file once and builds its tensor-name table once per architecture.

    Why: ``transformers`` opens a GGUF file once for the config, once for the tokenizer and once for the
    weights, and gguf-py's ``GGUFReader`` parses all the metadata each time, one numpy slice per string:
    ~5 s a parse for SmolLM2's 49,152 tokens and merges on 2 cores.  Mapping the weights' names rebuilds
    gguf-py's name table for every module it visits (397 times for SmolLM2, ~6 s).  Dequantizing SmolLM2
    (``lmforge.sources.materialize``, its licence read included) took 41 s, 27 s with this block.
    ``transformers`` imports both names from ``gguf`` inside the functions that use them, so it picks up
    these while the block runs; the readers are read-only.  The swap is process-wide: meant for one load
    at a time, as lmforge's stages and ``lmforge serve`` load models.
    """
    import gguf

    reader_class, name_table = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_table)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_table


def load_gguf(path: Path):
    """The causal language model in the GGUF file ``path``, dequantized, in eval mode."""
    with gguf_parsed_once():
        return load_model(path.parent, "causal", **gguf_options(path.name)).eval()


def dynamic_int8(model, keep_full_precision: Collection[str] = ()):
    """``model`` with every ``nn.Linear`` but those named in ``keep_full_precision`` swapped for
    PyTorch's dynamically quantized one, in place: int8 weights with one scale per output channel,
    activations quantized on the fly.  Per channel because a per-tensor scale lets one large row crush
    the others' precision (SmolLM2-135M's test perplexity rose 4.6× with it, 3.7× per channel alone).

    ``models.quantization`` applies it to a trained model; ``load_dir`` to an empty one, before the
    saved int8 weights are loaded into it: both must pick the same modules."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    linears = {name: per_channel_dynamic_qconfig for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and name not in keep_full_precision}
    with warnings.catch_warnings():  # torch marks eager quantization deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, linears, dtype=torch.qint8, inplace=True)


def _load_int8_dynamic(path: Path):
    """Rebuild an ``int8_dynamic`` model: the architecture from its config, the quantized modules from
    the recipe, then the saved int8 weights."""
    import torch
    from transformers import AutoConfig

    recipe = json.loads((path / RECIPE).read_text())
    config = AutoConfig.from_pretrained(path)
    model = dynamic_int8(auto_class(objective_of(config)).from_config(config).eval(), set(recipe["keep_full_precision"]))
    model.load_state_dict(torch.load(path / QUANTIZED_STATE, weights_only=False), strict=False)
    model.tie_weights()
    return model.eval()


def read_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe beside a model that is not a plain ``transformers`` directory (``RECIPE``); None for one that is."""
    return json.loads((path / RECIPE).read_text()) if (path / RECIPE).is_file() else None


def load_dir(path: Path, device: str | None = None) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer, objective) of the model directory ``path``.  ``device``: None
    picks CUDA when there is one; ``int8_dynamic`` and ``onnx_int8`` models stay on the CPU (their
    kernels are CPU ones)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    objective = objective_of(config)
    recipe = read_recipe(path)
    if recipe and recipe.get("runtime") == "onnxruntime":
        from models.onnx_genai import OnnxCausalLM

        model = OnnxCausalLM(path / recipe["onnx"], config)
    elif recipe:
        model = _load_int8_dynamic(path)
    else:
        model = load_model(path, objective)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, AutoTokenizer.from_pretrained(path), objective
