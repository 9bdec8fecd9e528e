"""A causal LM as an ONNX model for fast CPU decoding: ONNX Runtime GenAI's model builder writes it,
ONNX Runtime scores it and generates with it.

Why: one request through PyTorch on a 2-core CPU decodes SmolLM2-135M at ~14 tokens/s; most of each
step is Python and framework overhead around small matrix products, not arithmetic (llama.cpp does
~110 tokens/s on the same machine).  ONNX Runtime runs the whole step as one optimised graph (fused
attention over a KV cache, int8 matrix products with VNNI), one call per token.  Measured
side by side on the demo champion (64 greedy tokens, 2 threads): PyTorch fp32 14 tokens/s, ONNX fp32
~45 with PyTorch's greedy text, ONNX int8 ~95-135 (+1.1% test perplexity; its greedy text matched
PyTorch's on two of three chat prompts tried, docs/serving.md); int4 reaches ~150-200 but changes the
text more (this model's weights were already 4-bit once).

- ``build``: ``python -m onnxruntime_genai.models.builder`` in its own process (it imports the whole
  Hugging Face model and writes ``model.onnx`` + ``model.onnx.data`` + ``genai_config.json`` +
  the tokenizer files), forked from this one (``models.forking``: torch and transformers are imported
  already).  It knows the usual decoder families (Llama, Mistral, Qwen, Phi, Gemma...).
  ``built`` keeps each build under ``$LMFORGE_CACHE/onnx`` (default ``~/.cache/lmforge``), keyed by the
  hash of the model's files, the precision and the builder's version: the builder writes the same bytes
  from the same files, so the quantize stage's ``onnx_int8`` variant, the export stage's int8 model and
  ``lmforge serve --engine onnx`` of one champion are one build (~10 s for SmolLM2-135M; ~2 s for
  the tiniest model, ~7 s in a fresh interpreter, mostly its imports).  Delete the folder to free its space.
- ``Graph``: the built graph in an ONNX Runtime session: one forward step over a batch, with the keys
  and values of the tokens before it.
- ``KVBatch``: rows of different lengths decoded together over the graph, each exactly as alone.
- ``OnnxCausalLM``: the graph behind a ``transformers`` causal LM's interface (``model(...).logits``,
  ``generate``), so lmforge scores, benchmarks, times and serves it like the PyTorch model: the
  export stage's read-back check and the ``onnx_int8`` quantized variant (``models.loading``).
- ``models.batching.OnnxDecoder`` (with the server's other engines): greedy requests by continuous
  batching over a ``KVBatch``.

Why lmforge drives the graph itself rather than through ``onnxruntime_genai``: on a CPU its
``Generator`` pads a batch's prompts on the left, which its attention kernel (``GroupQueryAttention``,
which reads each row's length from the attention mask) does not read as the row alone: 1 of 8 chat
prompts kept its single-stream text.  Its ``Engine`` (continuous batching) needs a PagedAttention
graph, which the builder makes for CUDA only, and on a CPU runs one request per slot, four at a time
(~65-95 tokens/s at 8-32 requests).  Rows padded on the *right* are what the kernel is made for:
every row then gets exactly its single-stream text (8/8, fp32 and int8), and one step for 32 rows
costs ~6× one row's (int8: 9 ms for one, 60 ms for 32).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from models.forking import run_module
from models.train_config import OnnxPrecision

CONFIG = "genai_config.json"


class OnnxBuildError(RuntimeError):
    pass


def build(model_dir: Path, out: Path, precision: OnnxPrecision) -> None:
    """Write the ONNX model of the Hugging Face model in ``model_dir`` to ``out`` (emptied first): a copy of
    its build in the cache (``built``)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(built(model_dir, precision), out)


def built(model_dir: Path, precision: OnnxPrecision) -> Path:
    """The folder of the ONNX model of the Hugging Face model in ``model_dir``, in the cache: built there
    by the model builder the first time."""
    from importlib.metadata import version

    from models.checksums import weights_sha256

    key = hashlib.sha256(f"{weights_sha256(model_dir)} {precision} {version('onnxruntime-genai')}".encode()).hexdigest()[:20]
    cache = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge") / "onnx"
    found = cache / f"{key}-{precision}"
    if (found / CONFIG).is_file():
        return found
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=cache) as tmp:  # another process may build the same model
        out = Path(tmp) / "model"
        args = ["-i", str(model_dir), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "builder-cache")]
        result = run_module("onnxruntime_genai.models.builder", args, {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
        if result.returncode != 0 or not (out / CONFIG).is_file():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
            raise OnnxBuildError(f"ONNX Runtime GenAI's model builder could not build {model_dir} ({precision}):\n{tail}")
        try:
            out.rename(found)  # whole or not at all
        except OSError:  # the same build, finished first by another process
            if not (found / CONFIG).is_file():
                raise
    return found


def _decoder_config(onnx_dir: Path) -> dict:
    return json.loads((Path(onnx_dir) / CONFIG).read_text())["model"]["decoder"]


class Graph:
    """The model builder's decoder graph in an ONNX Runtime session.

    Its inputs: ``input_ids`` [batch, new tokens], ``attention_mask`` [batch, past + new] (each row's
    ones first: the kernel takes a row's length from the mask's sum, its new tokens' positions from
    it too) and per layer ``past_key_values.<i>.key/value`` [batch, kv heads, past, head size]; its
    outputs: ``logits`` and the ``present`` keys and values, the past of the next step."""

    def __init__(self, onnx_dir: Path):
        import onnxruntime as ort

        decoder = _decoder_config(onnx_dir)
        self.session = ort.InferenceSession(str(Path(onnx_dir) / decoder["filename"]), providers=["CPUExecutionProvider"])
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.takes_positions = "position_ids" in inputs  # some families' graphs take them; Llama's read the mask
        self.outputs = ["logits", *(n.replace("past_key_values.", "present.") for n in self.past_names)]
        self.kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])
        self.kv_dtype = np.float16 if any(inputs[n] == "tensor(float16)" for n in self.past_names) else np.float32

    def empty_past(self) -> list[np.ndarray]:
        """No tokens before: the past of one row's first run."""
        return [np.zeros((1, self.kv_shape[0], 0, self.kv_shape[1]), self.kv_dtype) for _ in self.past_names]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [batch, new tokens, vocabulary] and the keys and values of past + new tokens."""
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), **dict(zip(self.past_names, past))}
        if self.takes_positions:  # each row's new tokens follow its own tokens (the mask's ones)
            new = input_ids.shape[1]
            feed["position_ids"] = attention_mask.sum(-1, keepdims=True).astype(np.int64) - new + np.arange(new)
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present


class KVBatch:
    """Rows of different lengths decoded together over a ``Graph``, one token per row and step.

    A row's prompt runs alone (no padding rule to get wrong) and its keys and values join the batch's:
    one array per layer, the rows padded on the *right* to the longest.  At every step a row's mask
    covers its own tokens and its new token goes at its own length, so each row gets exactly its
    single-stream logits whatever runs beside it.  Rows leave with ``keep``; the cache is then cut to
    the longest row left.  Used by ``OnnxDecoder`` (the server) and ``OnnxCausalLM.generate``."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.past: list[np.ndarray] = []
        self.lengths = np.zeros(0, np.int64)  # tokens of each row in the cache

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, prompt_ids: list[int]) -> np.ndarray:
        """Run a prompt alone and add it as the last row; the logits [vocabulary] of its next token."""
        prompt = np.asarray([prompt_ids])
        logits, present = self.graph.run(prompt, np.ones_like(prompt), self.graph.empty_past())
        if len(self):
            width = max(present[0].shape[2], self.past[0].shape[2])
            pad = lambda a: np.pad(a, ((0, 0), (0, 0), (0, width - a.shape[2]), (0, 0)))  # noqa: E731
            self.past = [np.concatenate([pad(old), pad(new)]) for old, new in zip(self.past, present)]
        else:
            self.past = present
        self.lengths = np.append(self.lengths, len(prompt_ids))
        return logits[0, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Run one new token per row; the logits [rows, vocabulary] of each row's next token."""
        width = self.past[0].shape[2] + 1
        mask = np.arange(width)[None, :] < (self.lengths + 1)[:, None]
        logits, self.past = self.graph.run(np.asarray(tokens)[:, None], mask, self.past)
        self.lengths = self.lengths + 1
        return logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices, in order); the cache shrinks to the longest of them."""
        self.lengths = self.lengths[rows]
        longest = int(self.lengths.max()) if len(rows) else 0
        self.past = [np.ascontiguousarray(p[rows, :, :longest]) for p in self.past] if len(rows) else []


class OnnxCausalLM:
    """The ONNX graph behind the interface of a ``transformers`` causal LM, where lmforge uses one.

    ``model(input_ids, attention_mask).logits`` over whole sequences scores it exactly like the
    PyTorch model (``models.evaluation.lm_scores``: the export stage's read-back check; lm-eval for
    the benchmark gate); ``generate`` (``KVBatch``) takes the arguments lmforge passes to
    ``transformers``' (greedy or sampled, per-row stopping criteria, a streamer), with transformers'
    own logits processors, so ``models.generation``, ``models.batching`` and the speed measurements
    run it unchanged.  ``config``: the Hugging Face config of the model it was built from (what
    callers read: context length, pad token); the ``onnx_int8`` quantized variant keeps it beside
    the graph (``models.loading``)."""

    def __init__(self, onnx_dir: Path, config=None):
        import torch

        self.graph = Graph(onnx_dir)
        self.onnx_dir = Path(onnx_dir)
        self.config = config
        self.device = torch.device("cpu")

    def eval(self):
        return self

    def tie_weights(self) -> None:
        """Nothing to tie in a built graph (lm-eval calls it on every model)."""

    def linear_weight_bytes(self) -> int:
        """Bytes of the graph's matrix-product weights (int8 blocks with their scales), the output head
        left out when the model ties it to the embedding: ``models.quantization.linear_weight_bytes``."""
        import onnx

        graph = onnx.load(str(self.onnx_dir / _decoder_config(self.onnx_dir)["filename"]), load_external_data=False).graph
        sizes = {t.name: int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize for t in graph.initializer}
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        return sum(sizes.get(name, 0) for node in graph.node if node.op_type in ("MatMul", "MatMulNBits")
                   and not (tied and "lm_head" in node.name) for name in node.input[1:])

    def __call__(self, input_ids, attention_mask=None, **_ignored):
        """Row by row: a row alone needs no padding rule."""
        import torch

        masks = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = [self.graph.run(ids[None].numpy(), mask[None].numpy(), self.graph.empty_past())[0] for ids, mask in zip(input_ids, masks)]
        return SimpleNamespace(logits=torch.from_numpy(np.concatenate(rows)).float())

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, pad_token_id: int | None = None, eos_token_id=None,
                 stopping_criteria=None, streamer=None, max_length: int | None = None, **_ignored):
        """The prompts (left-padded, as ``transformers`` takes them) followed by their new tokens, a row
        that ended padded with ``pad_token_id``; what ``transformers``' ``generate`` returns.
        ``max_length`` (prompt and new tokens, as lm-eval asks) stands for ``max_new_tokens``."""
        import torch
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper)

        eos = eos_token_id if eos_token_id is not None else getattr(self.config, "eos_token_id", None)
        eos_ids = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        masks = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        processors = LogitsProcessorList()
        if repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if do_sample:
            processors.extend([TemperatureLogitsWarper(temperature or 1.0), *([TopKLogitsWarper(top_k)] if top_k else []),
                               *([TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1.0 else [])])
        if max_length is not None:
            max_new_tokens = max_length - input_ids.shape[1]
        ids = input_ids.cpu()
        if streamer is not None:
            streamer.put(ids)
        batch = KVBatch(self.graph)
        logits = np.stack([batch.add(row[mask.bool()].tolist()) for row, mask in zip(ids, masks.cpu())])
        active = list(range(len(ids)))  # the rows still generating, in the batch's order
        for step in range(max_new_tokens):
            if step < min_new_tokens:  # no end of sequence yet (transformers' MinNewTokensLengthLogitsProcessor, without its per-step isin)
                logits[:, eos_ids] = -np.inf
            scores = processors(ids[active], torch.from_numpy(logits).float())
            chosen = torch.multinomial(scores.softmax(-1), 1)[:, 0] if do_sample else scores.argmax(-1)
            tokens = torch.full((len(ids),), pad, dtype=torch.long)
            tokens[active] = chosen
            ids = torch.cat([ids, tokens[:, None]], 1)
            if streamer is not None:
                streamer.put(tokens)
            done = torch.isin(tokens, torch.tensor(eos_ids, dtype=torch.long))
            if stopping_criteria is not None:
                done |= torch.as_tensor(stopping_criteria(ids, None), dtype=torch.bool).reshape(-1).expand(len(ids))
            staying = [i for i, row in enumerate(active) if not done[row]]
            if not staying:
                break
            if len(staying) < len(active):
                batch.keep(staying)
                active = [active[i] for i in staying]
                chosen = chosen[staying]
            logits = batch.step(chosen.numpy())
        if streamer is not None:
            streamer.end()
        return ids
