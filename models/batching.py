"""Generating for several independent requests in one batch, each streamed and stopped on its own.

A server gets requests one by one, each with its own prompt, length limit and stop strings.  Running
them one at a time leaves most of a CPU's (or GPU's) arithmetic idle: at batch 1 each step reads every
weight to produce one token.  ``generate_together`` runs a group of requests through one
``model.generate`` call (left-padded, one KV cache) and still treats each as if it were alone:

- every step, a stopping criterion looks at each row's newest token, decodes the row's text so far,
  hands the new piece to that request's ``on_text`` (streaming), and finishes the row when it produced
  its end-of-sequence token, one of its stop strings, its own ``max_new_tokens``, or was cancelled
  (the client went away).  ``generate`` pads finished rows and stops when every row is finished;
- decoding the whole completion each step and emitting the new suffix keeps multi-byte characters and
  word-initial spaces right (one token alone may decode to half a character).

Rows share one set of sampling settings (``generate`` takes one); the server groups requests by them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Completion:
    """One request's generation: its input and, once finished, its outcome."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # called with each new piece of text, from the generating thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string), "length" or "cancelled"

    def _emit(self, text: str) -> None:
        if len(text) > len(self.text):
            piece, self.text = text[len(self.text) :], text
            if self.on_text:
                self.on_text(piece)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in ``text`` (None: none there)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


class _PerRowStop:
    """A ``transformers`` stopping criterion that finishes each row on its own terms and streams it."""

    def __init__(self, tokenizer, rows: list[Completion], eos_ids: set[int]):
        self.tok, self.rows, self.eos = tokenizer, rows, eos_ids

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest):
            if row.finish_reason is not None:
                continue
            if row.cancelled.is_set():
                row.finish_reason = "cancelled"
                continue
            if token in self.eos:
                row.finish_reason = "stop"
                continue
            row.token_ids.append(int(token))
            text = self.tok.decode(row.token_ids, skip_special_tokens=True)
            cut = _first_stop(text, row.stop)
            if cut is not None:
                row._emit(text[:cut])
                row.finish_reason = "stop"
                continue
            if not text.endswith("\ufffd"):  # half a character: wait for the rest
                row._emit(text)
            if len(row.token_ids) >= row.max_new_tokens:
                row._emit(text.rstrip("\ufffd"))
                row.finish_reason = "length"
        return torch.tensor([row.finish_reason is not None for row in self.rows], device=input_ids.device)


def generate_together(model, tokenizer, rows: list[Completion], generate_kwargs: dict[str, Any]) -> None:
    """Generate every row's completion in one batch (see the module docstring); fills in each row's
    ``text``, ``token_ids`` and ``finish_reason``.  ``generate_kwargs``: the sampling arguments of
    ``model.generate`` (``models.generation.generate_kwargs``); ``max_new_tokens`` is each row's own."""
    import torch
    from transformers import StoppingCriteriaList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding: every row's next token is at the same position
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    eos = generate_kwargs.get("eos_token_id", tokenizer.eos_token_id)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    kwargs = {**generate_kwargs, "max_new_tokens": max(r.max_new_tokens for r in rows), "pad_token_id": pad}
    criterion = _PerRowStop(tokenizer, rows, eos_ids)
    with torch.no_grad():
        model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       stopping_criteria=StoppingCriteriaList([criterion]), **kwargs)
    for r in rows:  # generate ran out of steps (only when a row's limit equals the longest)
        if r.finish_reason is None:
            r._emit(tokenizer.decode(r.token_ids, skip_special_tokens=True))
            r.finish_reason = "length"
