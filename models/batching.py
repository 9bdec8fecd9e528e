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

``ContinuousBatching`` and ``OnnxDecoder`` schedule every step anew instead (requests join and leave
the running batch), over transformers' paged cache and over an ONNX graph (``models.onnx_genai``).
"""

from __future__ import annotations

import queue
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

    def take(self, token: int, tokenizer, eos_ids: set[int]) -> bool:
        """Add one generated token: stream the new text, and finish on the end-of-sequence token, a stop
        string, ``max_new_tokens`` or the client's cancellation.  Returns whether the row is finished."""
        if self.finish_reason is not None:
            return True
        if self.cancelled.is_set():
            self.finish_reason = "cancelled"
        elif token in eos_ids:
            self.finish_reason = "stop"
        else:
            self.token_ids.append(int(token))
            text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
            cut = _first_stop(text, self.stop)
            if cut is not None:
                self._emit(text[:cut])
                self.finish_reason = "stop"
            else:
                if not text.endswith("\ufffd"):  # half a character: wait for the rest
                    self._emit(text)
                if len(self.token_ids) >= self.max_new_tokens:
                    self._emit(text.rstrip("\ufffd"))
                    self.finish_reason = "length"
        return self.finish_reason is not None

    def run_out(self, tokenizer) -> None:
        """The engine stopped generating before the row finished by its own rules: its text so far, ``length``."""
        if self.finish_reason is None:
            self._emit(tokenizer.decode(self.token_ids, skip_special_tokens=True))
            self.finish_reason = "length"


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

        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            row.take(token, self.tok, self.eos)
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
        r.run_out(tokenizer)


@dataclass
class _Active:
    row: Completion
    on_finish: Callable[[BaseException | None], None]
    seen: int = 0  # generated tokens already handed to the row


class ContinuousBatching:
    """Greedy requests generated by transformers' continuous batching, each streamed and stopped on its own.

    ``generate_together`` runs a fixed group until its longest request ends, and a request arriving
    meanwhile waits for the next group.  transformers' ``ContinuousBatchingManager`` (what
    ``transformers serve --continuous-batching`` runs) schedules every step anew: a request joins the
    running batch as soon as there is room and leaves it the step it finishes, its keys and values in
    a paged cache of ``kv_cache_tokens`` tokens (pages of 256) allocated once.

    The manager generates on its own thread; what a request's tokens mean stays here: the manager hands
    each step's tokens to the asyncio event loop the request was submitted from (one wake-up per step
    for all requests, as ``transformers serve`` does), where they go through the same ``Completion.take``
    as in ``generate_together`` (streaming, stop strings, limits).  A request finished by a stop
    string, or whose client went away, is cancelled in the manager, which frees its pages.  So
    ``submit`` must be called from a running event loop (the server's); ``warm_up`` runs one of its own.

    Greedy only: one manager has one ``do_sample``, and its per-request sampling settings (temperature,
    top-k, top-p) cost about a third of the throughput (85 against 118 tokens/s at 32 clients on 2
    cores) and take no per-request seed; the server sends sampled requests to dynamic batches.
    """

    PAGE_SIZE = 256
    #: Prompt tokens a step may process: a long prompt is read in chunks of this many, between decode steps.
    MAX_BATCH_TOKENS = 512

    def __init__(self, model, tokenizer, max_batch_size: int, kv_cache_tokens: int):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.tok = tokenizer
        eos = tokenizer.eos_token_id
        self.eos: set[int] = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        config = GenerationConfig(do_sample=False, eos_token_id=sorted(self.eos) or None,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        batching = ContinuousBatchingConfig(
            page_size=self.PAGE_SIZE, num_blocks=max(1, -(-kv_cache_tokens // self.PAGE_SIZE)), max_batch_tokens=self.MAX_BATCH_TOKENS,
            max_requests_per_batch=max_batch_size, auto_switch_to_flash=False)
        self.manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=batching)
        self.active: dict[str, _Active] = {}
        self.requests = self.peak_active = 0
        self.manager.start()

    def submit(self, row: Completion, on_finish: Callable[[BaseException | None], None]) -> None:
        """Queue ``row`` (from the running event loop); ``on_finish(error)`` is called on that loop when it ends."""
        import uuid

        import queue

        try:  # results of requests finished here early, which no handler took (``_forget``)
            while True:
                self.manager.output_router.output_queue.get_nowait()
        except queue.Empty:
            pass
        request_id = uuid.uuid4().hex
        self.active[request_id] = _Active(row, on_finish)
        self.requests += 1
        self.peak_active = max(self.peak_active, len(self.active))
        self.manager.register_result_handler(request_id, self._deliver)  # before the request: its first step is not missed
        # one token more than the row's limit: the row finishes by its own count, and an end-of-sequence token there is seen
        if self.manager.add_request(row.prompt_ids, request_id=request_id, max_new_tokens=row.max_new_tokens + 1, streaming=True) is None:
            self._finish(request_id, RuntimeError("the continuous batching manager is not accepting requests (stopped or full)"))

    async def warm_up(self) -> None:
        """One token through the manager before the first request (lazy imports, the cache's first use),
        on the event loop that will submit requests: the manager delivers every step's results to one loop."""
        import asyncio

        first = self.tok.bos_token_id if self.tok.bos_token_id is not None else next(iter(self.eos), 0)
        done = asyncio.Event()
        self.submit(Completion([first], 1), lambda _error: done.set())
        await asyncio.wait_for(done.wait(), timeout=300)

    def in_progress(self) -> int:
        return len(self.active)

    def steps(self) -> int:
        return int(self.manager.current_batch)

    def close(self) -> None:
        self.manager.stop(block=True, timeout=60)
        for request_id in list(self.active):
            self._finish(request_id, RuntimeError("the server is shutting down"))

    def _deliver(self, result) -> None:
        active = self.active.get(result.request_id)
        if active is None:  # finished here already (stop string, cancelled): the manager's last words
            return
        if result.error:
            self._finish(result.request_id, RuntimeError(result.error))
            return
        row = active.row
        for token in result.generated_tokens[active.seen:]:
            active.seen += 1
            if row.take(token, self.tok, self.eos):
                break
        if row.finish_reason is None and row.cancelled.is_set():
            row.finish_reason = "cancelled"
        if row.finish_reason is not None or result.is_finished():
            if not result.is_finished():
                self.manager.cancel_request(result.request_id)
            row.run_out(self.tok)
            self._finish(result.request_id, None)

    def _finish(self, request_id: str, error: BaseException | None) -> None:
        active = self.active.pop(request_id, None)
        if active is not None:
            self._forget(request_id)
            active.on_finish(error)

    def _forget(self, request_id: str) -> None:
        """Drop the request's result handler.  The manager drops it itself only on a finished result, which
        a request cancelled here (stop string, client gone) never gets; a result of its last step that
        arrives after this lands in the manager's output queue instead, which ``submit`` empties."""
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)


class OnnxDecoder:
    """Greedy requests generated by continuous batching over an ONNX graph (``models.onnx_genai.KVBatch``),
    on a thread of its own.

    Every step runs one new token of each running request through the graph together.  A request
    that arrives is run through its prompt alone and joins the batch at the next step, up to
    ``max_batch_size`` at once; one that finishes (its own rules, ``Completion.take``, a stop string,
    a client gone) leaves it at once.  Each request gets its single-stream greedy text whatever runs
    beside it (tested).  Cost: ONNX Runtime's graph without a shared KV buffer copies the cache into
    each step's output (~46 KB a token for SmolLM2-135M), which at chat lengths is small beside the
    matrix products."""

    def __init__(self, graph, tokenizer, max_batch_size: int):
        import numpy as np

        from models.onnx_genai import KVBatch

        self.graph = graph
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.queue: queue.Queue[tuple[Completion, Callable[[BaseException | None], None]] | None] = queue.Queue()
        self.batch = KVBatch(self.graph)
        self.running: list[_Active] = []  # the batch's rows, in its order
        self.next_tokens = np.zeros(0, np.int64)
        self.requests = self.tokens = self.steps = self.peak_running = 0
        self.thread = threading.Thread(target=self._loop, name="lmforge-onnx", daemon=True)
        self.thread.start()

    def warm_up(self) -> None:
        """One prompt token through the graph before the first request (the first run allocates its
        buffers); a model ONNX Runtime cannot run (e.g. its attention kernel needs heads of a multiple
        of 16 dimensions) fails here, once."""
        import numpy as np

        from models.onnx_genai import OnnxBuildError

        first = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        try:
            self.graph.run(np.array([[first]]), np.ones((1, 1)), self.graph.empty_past())
        except Exception as exc:
            raise OnnxBuildError(f"ONNX Runtime cannot run this model: {str(exc).strip()}") from None

    def submit(self, row: Completion, on_finish: Callable[[BaseException | None], None]) -> None:
        self.queue.put((row, on_finish))

    def in_progress(self) -> int:
        return len(self.running)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _finish(self, job: _Active, error: BaseException | None) -> None:
        if error is None:
            job.row.run_out(self.tokenizer)  # no-op for a row that finished by its own rules
        self.requests += 1
        job.on_finish(error)

    def _admit(self, row: Completion, on_finish: Callable[[BaseException | None], None]) -> None:
        """Run a new request's prompt and add it to the batch with its first token."""
        import numpy as np

        job = _Active(row, on_finish)
        if row.cancelled.is_set():
            row.finish_reason = "cancelled"
            return self._finish(job, None)
        try:
            token = int(self.batch.add(row.prompt_ids).argmax())
        except Exception as exc:  # one bad request must not kill the server: it gets the error
            return self._finish(job, exc)
        self.tokens += 1
        if row.take(token, self.tokenizer, self.eos_ids):
            self.batch.keep(list(range(len(self.running))))  # the row just added leaves at once
            return self._finish(job, None)
        self.running.append(job)
        self.next_tokens = np.append(self.next_tokens, token)
        self.peak_running = max(self.peak_running, len(self.running))

    def _step(self) -> None:
        """One token for every running request; those that finish leave the batch."""
        import numpy as np

        from models.onnx_genai import KVBatch

        try:
            self.next_tokens = self.batch.step(self.next_tokens).argmax(-1)
        except Exception as exc:  # the batch's requests get the error; the decoder goes on with the next ones
            for job in self.running:
                self._finish(job, exc)
            self.running, self.batch, self.next_tokens = [], KVBatch(self.graph), np.zeros(0, np.int64)
            return
        self.steps += 1
        self.tokens += len(self.running)
        keep = []
        for i, job in enumerate(self.running):
            if job.row.take(int(self.next_tokens[i]), self.tokenizer, self.eos_ids):
                self._finish(job, None)
            else:
                keep.append(i)
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            self.next_tokens = self.next_tokens[keep]
            self.batch.keep(keep)

    def _loop(self) -> None:
        while True:
            while len(self.running) < self.max_batch_size:  # admit what waits (block only when idle)
                try:
                    item = self.queue.get(block=not self.running)
                except queue.Empty:
                    break
                if item is None:
                    for job in self.running:
                        job.row.finish_reason = job.row.finish_reason or "cancelled"
                        self._finish(job, None)
                    return
                self._admit(*item)
            if self.running:
                self._step()
