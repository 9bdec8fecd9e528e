"""Where requests are generated: dynamic batches (``Batcher``), and for greedy requests continuous
batching when ``serve.engine`` asks for it (``Engine``); ``stream`` carries one request's text from the
generating thread to the server's event loop.

**Dynamic batches.**  The first waiting request opens a batch that others may join for
``serve.batch_wait_ms`` (up to ``serve.max_batch_size``; requests with other sampling settings wait for
the next batch), and the batch generates together (``models.batching.generate_together``) until its
longest request ends.  The ``Batcher`` only groups and schedules: what a batch is generated with is
its ``generate`` function (``ModelBatches`` for a loaded model), so the grouping can be tested alone.
"""

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from lmforge.params import SamplingParams, ServeParams
from lmforge.serving.model import ServedModel
from lmforge.serving.wire import server_error
from models.batching import Completion, ContinuousBatching, generate_together

#: Generates a batch of rows, all with one set of sampling settings, filling in each row's outcome.
GenerateBatch = Callable[[list[Completion], SamplingParams], None]


@dataclass
class Job:
    """A queued request: its row, its sampling settings, and who to tell when it has finished."""

    row: Completion
    sampling: SamplingParams
    on_finish: Callable[[BaseException | None], None]

    def batch_key(self) -> tuple:
        """Requests with the same key can share a batch (``generate`` takes one set of sampling settings)."""
        s = self.sampling
        return (s.temperature, s.top_k, s.top_p, s.repetition_penalty) if s.temperature > 0 else (0.0,)


class ModelBatches:
    """The dynamic batches' ``generate`` over a loaded model: one ``model.generate`` call per batch,
    seeded by the batch's settings (a seed gives the same text for the same batch composition)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, rows: list[Completion], sampling: SamplingParams) -> None:
        import torch

        from models.generation import generate_kwargs

        torch.manual_seed(sampling.seed)
        generate_together(self.model, self.tokenizer, rows, generate_kwargs(sampling, self.tokenizer))

    def warm_up(self) -> None:
        """One token through the model before the first request: the first ``generate`` call pays for
        lazy imports and allocations (seconds), which a user's first request should not."""
        from models.generation import generate_kwargs

        first = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        generate_together(self.model, self.tokenizer, [Completion([first], 1)], generate_kwargs(SamplingParams(temperature=0.0), self.tokenizer))


class Batcher:
    """The thread that generates queued requests in dynamic batches (module docstring)."""

    def __init__(self, generate: GenerateBatch, max_batch_size: int, wait_seconds: float):
        self.generate = generate
        self.max_batch_size, self.wait = max_batch_size, wait_seconds
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.waiting: deque[Job] = deque()  # taken off the queue, but for a later batch (other sampling settings)
        self.batches = self.requests = 0
        self.thread = threading.Thread(target=self._loop, name="lmforge-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        """Stop after the batches already queued."""
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _next_batch(self) -> list[Job] | None:
        first = self.waiting.popleft() if self.waiting else self.queue.get()
        if first is None:
            return None
        key = first.batch_key()
        batch = [first]
        for job in list(self.waiting):  # earlier arrivals first
            if len(batch) < self.max_batch_size and job.batch_key() == key:
                self.waiting.remove(job)
                batch.append(job)
        deadline = time.monotonic() + self.wait
        while len(batch) < self.max_batch_size:
            try:
                job = self.queue.get(timeout=max(deadline - time.monotonic(), 0)) if self.wait else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # close after this batch
                break
            (batch if job.batch_key() == key else self.waiting).append(job)
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if not job.row.cancelled.is_set()]
            if not batch:
                continue
            error = None
            try:
                self.generate([j.row for j in batch], batch[0].sampling)
            except Exception as exc:  # one bad batch must not kill the server: its requests get the error
                error = exc
            self.batches += 1
            self.requests += len(batch)
            for job in batch:
                job.on_finish(error)


class Engine:
    """Where a request is generated (``lmforge.serve``, **Batching**): in dynamic batches; greedy requests
    by continuous batching when ``serve.engine`` is ``continuous`` (transformers') or ``onnx`` (over the
    served model's ONNX twin in ONNX Runtime, ``ServedModel.onnx_dir``).  A served model that is an ONNX
    graph (the ``onnx_int8`` variant) has no PyTorch model for transformers' batching: the onnx engine
    takes its greedy requests whatever ``serve.engine`` says."""

    def __init__(self, served: ServedModel, settings: ServeParams):
        from models.batching import OnnxDecoder
        from models.onnx_genai import Graph

        model, tokenizer = served.model, served.tokenizer
        self.batches = ModelBatches(model, tokenizer)
        self.dynamic = Batcher(self.batches, settings.max_batch_size, settings.batch_wait_ms / 1000)
        self.continuous = (ContinuousBatching(model, tokenizer, settings.max_batch_size, settings.kv_cache_tokens)
                           if settings.engine == "continuous" and not served.onnx_dir else None)
        # a served ONNX model shares its graph (ONNX Runtime sessions may run from several threads)
        graph = getattr(model, "graph", None) or (Graph(served.onnx_dir) if served.onnx_dir else None)
        self.onnx = OnnxDecoder(graph, tokenizer, settings.max_batch_size) if graph else None

    async def warm_up(self) -> None:
        """A first token through each engine, on the server's event loop (the continuous one delivers there)."""
        await asyncio.to_thread(self.batches.warm_up)
        if self.continuous:
            await self.continuous.warm_up()
        if self.onnx:
            await asyncio.to_thread(self.onnx.warm_up)

    def submit(self, job: Job) -> None:
        greedy = self.continuous or self.onnx
        if greedy and job.sampling.temperature == 0:
            greedy.submit(job.row, job.on_finish)
        else:
            self.dynamic.submit(job)

    def close(self) -> None:
        for engine in (self.dynamic, self.continuous, self.onnx):
            if engine:
                engine.close()

    def stats(self) -> dict[str, Any]:
        """For ``/health``: requests queued for dynamic batches, batches and requests so far; the continuous
        engines' requests in progress, steps, requests and the most they held at once (the ONNX one also
        its queue and tokens)."""
        out: dict[str, Any] = {"queued": self.dynamic.queue.qsize(), "batches": self.dynamic.batches, "requests": self.dynamic.requests}
        if self.continuous:
            c = self.continuous
            out["continuous"] = {"in_progress": c.in_progress(), "steps": c.steps(), "requests": c.requests, "peak_in_progress": c.peak_active}
        if self.onnx:
            o = self.onnx
            out["onnx"] = {"queued": o.queue.qsize(), "in_progress": o.in_progress(), "steps": o.steps, "requests": o.requests,
                           "tokens": o.tokens, "peak_in_progress": o.peak_running}
        return out


async def stream(submit: Callable[[Job], None], prompt_ids: list[int], sampling: SamplingParams,
                 stop: tuple[str, ...]) -> AsyncIterator[str | Completion]:
    """Queue a request with ``submit`` (``Engine.submit``); yield its text pieces as the generating thread
    produces them, then the finished ``Completion``.  Closed early (the client went away), its row is
    cancelled and stops at the next token; a failed generation raises a 500."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    failure: list[BaseException] = []

    def on_finish(error: BaseException | None) -> None:  # called from the generating thread
        if error is not None:
            failure.append(error)
        loop.call_soon_threadsafe(pieces.put_nowait, None)

    row = Completion(prompt_ids, sampling.max_new_tokens, stop, on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
    submit(Job(row, sampling, on_finish))
    try:
        while (piece := await pieces.get()) is not None:
            yield piece
    finally:
        row.cancelled.set()  # no effect once finished
    if failure:
        raise server_error(failure[0], "generation failed: ")
    yield row
