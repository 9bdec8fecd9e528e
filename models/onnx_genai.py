"""A causal LM as an ONNX model for fast CPU decoding: ONNX Runtime GenAI's model builder writes it,
ONNX Runtime scores it, ONNX Runtime GenAI generates with it.

Why: one request through PyTorch on a 2-core CPU decodes SmolLM2-135M at ~14 tokens/s; most of each
step is Python and framework overhead around small matrix products, not arithmetic (llama.cpp does
~110 tokens/s on the same machine).  ONNX Runtime runs the whole step as one optimised graph (fused
attention with a KV cache it owns, int8 matrix products with VNNI), driven by a C++ loop.  Measured
side by side on the demo champion (64 greedy tokens, 2 threads): PyTorch fp32 14 tokens/s, ONNX fp32
~45 with PyTorch's greedy text, ONNX int8 ~95-135 (+1.1% test perplexity; its greedy text matched
PyTorch's on two of three chat prompts tried, docs/serving.md); int4 reaches ~150-200 but changes the
text more (this model's weights were already 4-bit once).

- ``build``: ``python -m onnxruntime_genai.models.builder`` in its own process (it imports the whole
  Hugging Face model and writes ``model.onnx`` + ``model.onnx.data`` + ``genai_config.json`` +
  the tokenizer files).  It knows the usual decoder families (Llama, Mistral, Qwen, Phi, Gemma...).
- ``OnnxCausalLM``: the built graph over whole sequences, shaped like a ``transformers`` causal LM
  (``model(input_ids=...).logits``), so ``models.evaluation.lm_scores`` scores it exactly like the
  PyTorch model: the export stage's read-back check.
- ``OnnxDecoder``: a thread that generates queued requests one at a time with
  ``onnxruntime_genai``, streaming each through ``models.batching.Completion`` like the other engines.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from models.batching import Completion
from models.train_config import OnnxPrecision

CONFIG = "genai_config.json"


class OnnxBuildError(RuntimeError):
    pass


def build(model_dir: Path, out: Path, precision: OnnxPrecision) -> None:
    """Write the ONNX model of the Hugging Face model in ``model_dir`` to ``out`` (emptied first)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    cache = out.parent / f".{out.name}-cache"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if result.returncode != 0 or not (out / CONFIG).is_file():
        shutil.rmtree(out, ignore_errors=True)
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        raise OnnxBuildError(f"ONNX Runtime GenAI's model builder could not build {model_dir} ({precision}):\n{tail}")


def _decoder_config(onnx_dir: Path) -> dict:
    return json.loads((Path(onnx_dir) / CONFIG).read_text())["model"]["decoder"]


class OnnxCausalLM:
    """The ONNX graph over whole sequences (an empty KV cache), for scoring: ``model(input_ids,
    attention_mask).logits`` as ``transformers`` returns them."""

    def __init__(self, onnx_dir: Path):
        import onnxruntime as ort
        import torch

        decoder = _decoder_config(onnx_dir)
        self.session = ort.InferenceSession(str(Path(onnx_dir) / decoder["filename"]), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])
        self.kv_dtype = np.float16 if any("float16" in i.type for n, i in self.inputs.items() if n.startswith("past_")) else np.float32
        self.device = torch.device("cpu")

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask=None, **_ignored):
        """Row by row: padded rows would need the graph's own padding rules, one row never does."""
        import torch

        masks = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = []
        for ids, mask in zip(input_ids, masks):
            feed = {"input_ids": ids[None].numpy().astype(np.int64), "attention_mask": mask[None].numpy().astype(np.int64)}
            if "position_ids" in self.inputs:
                feed["position_ids"] = np.arange(ids.shape[0], dtype=np.int64)[None]
            for name in self.inputs:
                if name.startswith("past_key_values."):
                    feed[name] = np.zeros((1, self.kv_shape[0], 0, self.kv_shape[1]), self.kv_dtype)
            rows.append(torch.from_numpy(self.session.run(["logits"], feed)[0]).float())
        return SimpleNamespace(logits=torch.cat(rows))


class OnnxDecoder:
    """The thread that generates greedy requests with ONNX Runtime GenAI, one at a time (one stream is
    what it is fastest at; docs/serving.md#speed has the measurements under load)."""

    def __init__(self, onnx_dir: Path, tokenizer):
        import onnxruntime_genai as og

        config = og.Config(str(onnx_dir))
        config.clear_providers()  # the CPU
        self.model = og.Model(config)
        self.tokenizer = tokenizer
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.queue: queue.Queue[tuple[Completion, Callable[[BaseException | None], None]] | None] = queue.Queue()
        self.requests = self.tokens = 0
        self.thread = threading.Thread(target=self._loop, name="lmforge-onnx", daemon=True)
        self.thread.start()

    def generate(self, row: Completion) -> None:
        """Greedy tokens for ``row`` until it finishes by its own rules (``Completion.take``)."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(row.prompt_ids) + row.max_new_tokens)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(row.prompt_ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            self.tokens += 1
            if row.take(int(generator.get_next_tokens()[0]), self.tokenizer, self.eos_ids):
                return
        row.run_out(self.tokenizer)

    def warm_up(self) -> None:
        """One token before the first request (the first run allocates its buffers); a model ONNX Runtime
        cannot run (e.g. its attention kernel needs heads of a multiple of 16 dimensions) fails here, once."""
        first = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        try:
            self.generate(Completion([first], 1))
        except Exception as exc:
            raise OnnxBuildError(f"ONNX Runtime GenAI cannot run this model: {str(exc).strip()}") from None

    def submit(self, row: Completion, on_finish: Callable[[BaseException | None], None]) -> None:
        self.queue.put((row, on_finish))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            row, on_finish = item
            error = None
            if row.cancelled.is_set():
                row.finish_reason = "cancelled"
            else:
                try:
                    self.generate(row)
                except Exception as exc:  # one bad request must not kill the server: it gets the error
                    error = exc
            self.requests += 1
            on_finish(error)
