"""Text generation: load a model (a directory or an MLflow URI), then sample from it in batches with a
KV cache, optionally streaming tokens as they come.

Decoder-only models are padded on the left, so every prompt in a batch ends at the same position and
the new tokens line up; ``transformers``' ``generate`` keeps the keys and values of past positions
(the KV cache), so each new token costs one position of attention instead of the whole sequence.
Sampling settings come from ``lmforge.params.SamplingParams`` (``params.yaml`` → ``evaluate.sampling``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from models.loading import load_dir

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


class ModelNotFound(ValueError):
    """The model reference names no loadable model (the message says what was tried)."""


def resolve(ref: str | Path, tracking_uri: str | None = None) -> Path:
    """A local model directory for ``ref``: a directory holding ``config.json``, or an MLflow URI
    (``runs:/<id>[/path]``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``) whose
    artifacts are downloaded.  A ``runs:/<id>`` of a pretraining run (which logs a reference to its
    weights, not the weights) resolves to the directory in its ``model_dir`` tag.  ``tracking_uri``:
    the MLflow store (tracking and registry) to ask; None: MLflow's default (``$MLFLOW_TRACKING_URI``)."""
    text = str(ref)
    if text.startswith(MLFLOW_SCHEMES):
        import mlflow

        try:
            if text.startswith("runs:/") and text.rstrip("/").count("/") == 1:
                run = mlflow.MlflowClient(tracking_uri).get_run(text[len("runs:/") :].strip("/"))
                if "model_dir" in run.data.tags:
                    return resolve(run.data.tags["model_dir"])
            use_mlflow_store(tracking_uri)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        except Exception as exc:  # MLflow raises several types for unknown runs, names and aliases
            raise ModelNotFound(f"{text}: {str(exc).splitlines()[0]}") from None
        found = sorted(p.parent for p in local.rglob("config.json"))
        if not found:
            raise ModelNotFound(f"{text}: no Hugging Face model (config.json) among its artifacts")
        return found[0]
    path = Path(text).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{text}: not a model directory (no config.json) and not an MLflow URI ({', '.join(MLFLOW_SCHEMES)}...)")
    return path


def use_mlflow_store(uri: str | None) -> None:
    """Make ``uri`` MLflow's tracking and registry store for this process (``models:/`` URIs are
    resolved through the process-wide registry URI, whatever ``download_artifacts`` is passed)."""
    import mlflow

    if uri is not None:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)


def load(ref: str | Path, device: str | None = None, tracking_uri: str | None = None) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer, objective) for a model reference (see ``resolve``; the
    directory is read by ``models.loading.load_dir``)."""
    return load_dir(resolve(ref, tracking_uri), device)


def context_limit(config) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no hard limit, e.g. ALiBi)."""
    if getattr(config, "model_type", "") in ("gpt2", "bert"):
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return None


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (``tokenizer.chat_template``): instruct models do,
    and expect their input as a conversation; lmforge's own pretrained tokenizers do not."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, message: str | list[dict[str, str]]) -> str:
    """``message`` as the user's turn of the tokenizer's chat template (or a whole conversation, a list
    of ``{"role", "content"}``), followed by the opening of the assistant's turn
    (``add_generation_prompt=True``): where the model's answer starts.  The text holds the template's
    special tokens, so encode it with ``add_special_tokens=False``."""
    conversation = [{"role": "user", "content": message}] if isinstance(message, str) else message
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def generate_kwargs(sampling, tokenizer, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Arguments of ``model.generate`` for the sampling settings; temperature 0 means greedy."""
    sample = sampling.temperature > 0
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens or sampling.max_new_tokens,
        do_sample=sample,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        repetition_penalty=sampling.repetition_penalty,
    )
    if sample:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
    else:  # the model's generation_config may hold sampling defaults: greedy ignores them
        kwargs.update(temperature=None, top_k=None, top_p=None)
    return kwargs


class _Streamer:
    """Receives new token ids from ``generate`` (batch of one) and hands decoded text to ``on_text``.

    Decoding the whole completion each time and emitting the new suffix keeps multi-byte characters
    and word-initial spaces right (a token alone may decode to half a character)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tok, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_skipped = False

    def put(self, value) -> None:
        if not self.prompt_skipped:  # generate first passes the prompt
            self.prompt_skipped = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclasses.dataclass
class Generated:
    """One prompt's completion with its token counts: ``prompt_tokens`` the model read (after the chat
    template and any truncation), ``completion_tokens`` it generated (up to and with its end-of-sequence
    token; padding after it not counted)."""

    text: str
    prompt_tokens: int
    completion_tokens: int


def _generated_counts(new, eos_token_id: int | None) -> list[int]:
    """Tokens each row of ``new`` (the generated part of ``generate``'s output) really generated: a row
    that ended is padded until the longest one ends."""
    counts = []
    for row in new.tolist():
        counts.append(row.index(eos_token_id) + 1 if eos_token_id is not None and eos_token_id in row else len(row))
    return counts


def complete(
    model,
    tokenizer,
    prompts: list[str] | list[list[dict[str, str]]],
    sampling,
    chat: bool = False,
    offset: int = 0,
    streamer=None,
) -> list[Generated]:
    """One batch: ``prompts`` through one call of ``model.generate`` (left-padded, KV cache), seeded with
    ``sampling.seed + offset`` (``offset``: the index of the batch's first prompt, so that each batch of
    a longer list gets a seed of its own and a batch re-run alone samples the same text).  ``chat``: each
    prompt is a user message, or a conversation, sent through the tokenizer's chat template."""
    import torch

    if chat and not has_chat_template(tokenizer):
        raise ValueError("chat: the tokenizer has no chat template (tokenizer.chat_template)")
    decoder_only = not model.config.is_encoder_decoder
    limit = context_limit(model.config)
    tokenizer.padding_side = "left" if decoder_only else "right"
    kwargs = generate_kwargs(sampling, tokenizer)
    if limit is not None and decoder_only:  # learned positions: prompt + new tokens must fit
        tokenizer.truncation_side = "left"  # keep the end of the prompt, where generation continues
    encoded = tokenizer(
        [chat_prompt(tokenizer, p) for p in prompts] if chat else prompts, return_tensors="pt", padding=True,
        add_special_tokens=not chat,  # a chat template writes the special tokens it wants itself
        truncation=limit is not None, max_length=(limit - kwargs["max_new_tokens"]) if limit else None,
    ).to(model.device)
    encoded.pop("token_type_ids", None)
    torch.manual_seed(sampling.seed + offset)  # reproducible, and distinct for each batch
    with torch.no_grad():
        out = model.generate(**encoded, **kwargs, streamer=streamer)
    new = out[:, encoded["input_ids"].shape[1] :] if decoder_only else out
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    counts = _generated_counts(new if decoder_only else out[:, 1:], kwargs["eos_token_id"])  # an encoder-decoder's output starts with the decoder's start token
    prompt_tokens = encoded["attention_mask"].sum(dim=1).tolist()
    return [Generated(t, int(p), n) for t, p, n in zip(texts, prompt_tokens, counts)]


def generate(
    model,
    tokenizer,
    prompts: list[str],
    sampling,
    batch_size: int = 8,
    on_text: Callable[[int, str], None] | None = None,
    chat: bool = False,
) -> list[str]:
    """Completions of ``prompts`` (text after the prompt, special tokens removed).

    ``on_text(i, piece)`` streams prompt ``i``'s text as it is generated; streaming runs one prompt at
    a time (``transformers`` streams batches of one), otherwise prompts go in batches of ``batch_size``
    (each one call of ``complete``).  ``chat``: each prompt is a user message, sent through the
    tokenizer's chat template (``chat_prompt``), and the completion is the assistant's answer.
    """
    if chat and not has_chat_template(tokenizer):
        raise ValueError("chat: the tokenizer has no chat template (tokenizer.chat_template)")
    size = 1 if on_text else batch_size
    outputs: list[str] = []
    for batch in _batches(prompts, size):
        streamer = _Streamer(tokenizer, lambda piece, i=len(outputs): on_text(i, piece)) if on_text else None
        outputs.extend(g.text for g in complete(model, tokenizer, batch, sampling, chat=chat, offset=len(outputs), streamer=streamer))
    return outputs


@contextlib.contextmanager
def peak_memory(device) -> Iterator[dict[str, float]]:
    """Peak memory while the block runs, in MB: CUDA's allocator peak on a GPU, else the process's
    resident set size sampled every 5 ms (what the operating system had to give the process)."""
    import threading

    import psutil
    import torch

    result: dict[str, float] = {}
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result["peak_mb"] = (peak[0] - base) / 2**20
