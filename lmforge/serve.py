"""``lmforge serve``: a model behind the OpenAI HTTP API, with requests batched on the server.

Applications, SDKs and tools speak the OpenAI API, so that is what a model in use should answer:
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat template;
``"stream": true`` as server-sent events), ``GET /health``, and ``POST /v1/feedback`` (lmforge's own:
ratings and corrections of answers, the start of the feedback loop).  Responses are the ``openai``
package's own pydantic types, so what the official client parses is what is sent.

**Batching.**  ``serve.engine: dynamic`` (the default): the first waiting request opens a batch that
others may join for ``serve.batch_wait_ms`` (up to ``serve.max_batch_size``; requests with other
sampling settings wait for the next batch), and the batch generates together (``models.batching``)
until its longest request ends (``Batcher``).  ``serve.engine: continuous``: greedy requests join and
leave the running batch at every step, through transformers' continuous batching
(``models.batching.ContinuousBatching``, a paged KV cache of ``serve.kv_cache_tokens``);
``serve.engine: onnx``: the same over the model's ONNX twin in ONNX Runtime (``models.onnx_genai``),
the fastest here by far.  Sampled requests still go to dynamic batches.  Each request is streamed and stopped on its own either way.
Which is faster depends on the load (docs/serving.md#speed).

**Why not a serving library.**  LitServe's OpenAI spec (0.2.19) serves chat completions only, assigns
the response ``id`` in the HTTP process, where the model's code cannot record it (the feedback loop
needs id → prompt → answer), and reports errors of a streamed request as a 200 followed by an error
chunk.  FastAPI and uvicorn (already in the lock for MLflow and Dagster) carry the protocol here; the
``openai`` types carry its shapes.

**Errors** are 4xx with OpenAI's ``{"error": {"message", "type", "param", "code"}}`` body, checked before
a request is queued: malformed JSON or fields (400), an unknown model (404), a prompt that does not
fit the context with its ``max_tokens`` (400), ``max_tokens`` out of range (400), a missing or wrong
API key (401), a body over ``serve.max_request_bytes`` (413, refused before it is read), more than
``serve.max_requests_per_client`` requests in progress from one address (429).  Tokenizing runs off the
event loop, so a long prompt does not hold up ``/health`` or other clients.  A failure while generating
fails that batch's requests with a 500 and leaves the server up.

**Every answer is recorded** in the feedback store (``lmforge.feedback_store``) before it is sent.
"""

import asyncio
import dataclasses
import ipaddress
import json
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from lmforge.feedback_store import FeedbackStore, UnknownRequest
from lmforge.params import LmforgeError, SamplingParams, ServeParams
from models.batching import Completion, ContinuousBatching, generate_together
from models.train_config import OnnxPrecision

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------
# Requests (the subset of the OpenAI API that a local model can honour; other fields are refused or ignored)
# --------------------------------------------------------------------------------------------------


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # user, metadata, ... carry nothing a local model acts on

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise RequestError("only text content parts are supported", "messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, description="the `id` of the completion being rated")
    rating: int = Field(ge=1, le=5, description="1 (bad) to 5 (good)")
    correction: str | None = Field(None, min_length=1, description="the answer the model should have given")
    comment: str | None = None


class RequestError(Exception):
    """A client mistake: answered with ``status`` and OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------------
# The model thread
# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    row: Completion
    sampling: SamplingParams
    on_finish: Callable[[BaseException | None], None]

    def batch_key(self) -> tuple:
        """Requests with the same key can share a batch (``generate`` takes one set of sampling settings)."""
        s = self.sampling
        return (s.temperature, s.top_k, s.top_p, s.repetition_penalty) if s.temperature > 0 else (0.0,)


class Batcher:
    """The thread that generates queued requests in dynamic batches (module docstring)."""

    def __init__(self, model, tokenizer, max_batch_size: int, wait_seconds: float):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.wait = max_batch_size, wait_seconds
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.waiting: deque[_Job] = deque()  # taken off the queue, but for a later batch (other sampling settings)
        self.batches = self.requests = 0
        self.thread = threading.Thread(target=self._loop, name="lmforge-batcher", daemon=True)
        self.thread.start()

    def warm_up(self) -> None:
        """One token through the model before the first request: the first ``generate`` call pays for
        lazy imports and allocations (seconds), which a user's first request should not."""
        from models.generation import generate_kwargs

        first = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        generate_together(self.model, self.tokenizer, [Completion([first], 1)], generate_kwargs(SamplingParams(temperature=0.0), self.tokenizer))

    def submit(self, job: _Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _next_batch(self) -> list[_Job] | None:
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
        import torch

        from models.generation import generate_kwargs

        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if not job.row.cancelled.is_set()]
            if not batch:
                continue
            sampling = batch[0].sampling
            error = None
            try:
                torch.manual_seed(sampling.seed)
                generate_together(self.model, self.tokenizer, [j.row for j in batch], generate_kwargs(sampling, self.tokenizer))
            except Exception as exc:  # one bad batch must not kill the server: its requests get the error
                error = exc
            self.batches += 1
            self.requests += len(batch)
            for job in batch:
                job.on_finish(error)


class Engine:
    """Where a request is generated (module docstring, **Batching**): in dynamic batches; greedy requests
    by continuous batching when ``serve.engine`` is ``continuous`` (transformers') or ``onnx`` (over the
    served model's ONNX twin in ONNX Runtime, ``ServedModel.onnx_dir``).  A served model that is an ONNX
    graph (the ``onnx_int8`` variant) has no PyTorch model for transformers' batching: the onnx engine
    takes its greedy requests whatever ``serve.engine`` says."""

    def __init__(self, served: "ServedModel", settings: ServeParams):
        from models.batching import OnnxDecoder
        from models.onnx_genai import Graph

        model, tokenizer = served.model, served.tokenizer
        self.dynamic = Batcher(model, tokenizer, settings.max_batch_size, settings.batch_wait_ms / 1000)
        self.continuous = (ContinuousBatching(model, tokenizer, settings.max_batch_size, settings.kv_cache_tokens)
                           if settings.engine == "continuous" and not served.onnx_dir else None)
        # a served ONNX model shares its graph (ONNX Runtime sessions may run from several threads)
        graph = getattr(model, "graph", None) or (Graph(served.onnx_dir) if served.onnx_dir else None)
        self.onnx = OnnxDecoder(graph, tokenizer, settings.max_batch_size) if graph else None

    async def warm_up(self) -> None:
        """A first token through each engine, on the server's event loop (the continuous one delivers there)."""
        await asyncio.to_thread(self.dynamic.warm_up)
        if self.continuous:
            await self.continuous.warm_up()
        if self.onnx:
            await asyncio.to_thread(self.onnx.warm_up)

    def submit(self, job: _Job) -> None:
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


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """What ``create_app`` serves: a loaded model and how clients name it."""

    name: str  # the `model` clients send (and /v1/models lists)
    ref: str  # the reference it was loaded from (a directory or an MLflow URI)
    version: str | None  # the registry version behind an alias, for the request log
    model: Any
    tokenizer: Any
    onnx_dir: Path | None = None  # the ONNX model the onnx engine decodes with (``onnx_model``, or the served model itself)

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt + completion) the model's positions allow; None: no declared limit."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        if limit is None and getattr(self.tokenizer, "model_max_length", 0) < 1_000_000:
            limit = self.tokenizer.model_max_length
        return limit


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with a 413 and OpenAI's error body,
    from its Content-Length before a byte of it is read, or (a chunked body) as soon as it passes the
    limit.  Starlette's own limiter (FastAPI's ``max_body_size``) answers in plain text, which OpenAI
    clients cannot parse."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    @staticmethod
    def error(limit: int) -> RequestError:
        return RequestError(f"the request body is larger than this server accepts ({limit:,} bytes, serve.max_request_bytes)",
                            status=413, code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        from fastapi.responses import JSONResponse
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse(self.error(self.limit).body(), 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413)  # FastAPI passes an HTTPException from the body on to the app's handler
            return message

        await self.app(scope, limited, send)


@dataclass
class _Live:
    """The model answering new requests and the thread generating for it; swapped whole when the alias moves."""

    served: ServedModel
    engine: Engine
    users: int = 0  # requests admitted on it and not finished
    retired: bool = False  # swapped out: its engine closes when its last request has finished


@dataclass
class AliasFollower:
    """Where a server of ``models:/NAME@ALIAS`` looks for the alias's version, and loads a new one."""

    ref: str
    tracking_uri: str | None
    name: str | None = None
    onnx: OnnxPrecision | None = None

    def version(self) -> str:
        from lmforge.registry import pin_version

        return pin_version(self.ref, self.tracking_uri)[1].rsplit("/", 1)[-1]

    def load(self) -> ServedModel:
        return load_served(self.ref, self.tracking_uri, self.name, self.onnx)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def create_app(served: ServedModel, store: FeedbackStore, settings: ServeParams, api_key: str | None = None,
               sampling_defaults: SamplingParams | None = None, follow: AliasFollower | None = None):
    """The FastAPI application serving ``served`` with ``settings`` (``params.yaml`` ``serve:``, batch size,
    window and token limits); its ``Engine`` starts with it and stops with it.  With ``follow``,
    the registry is polled every ``serve.follow_seconds`` and a moved alias's version is loaded beside
    the old one and swapped in: requests already queued finish on the old model, new ones go to the
    new one, and every answer records the version that produced it."""
    import logging
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from openai.types import Completion as CompletionObject
    from openai.types import CompletionChoice, CompletionUsage, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice
    from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
    from openai.types.chat.chat_completion_chunk import ChoiceDelta
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from models.generation import chat_prompt, has_chat_template

    defaults = sampling_defaults or SamplingParams()
    started = int(time.time())
    state: dict[str, _Live] = {}
    log = logging.getLogger("lmforge.serve")

    async def start(model: ServedModel) -> _Live:
        engine = await asyncio.to_thread(Engine, model, settings)
        await engine.warm_up()
        return _Live(model, engine)

    async def follow_alias() -> None:
        """Poll the alias; load a new version beside the old one, then swap.  A failed poll or load
        leaves the old version serving, and is tried again at the next poll."""
        while True:
            await asyncio.sleep(settings.follow_seconds)
            try:
                if await asyncio.to_thread(follow.version) == state["live"].served.version:
                    continue
                new = await start(await asyncio.to_thread(follow.load))
            except Exception as exc:  # the registry unreachable, a broken version: keep serving what works
                log.warning("serve: could not follow %s: %s: %s", served.ref, type(exc).__name__, exc)
                continue
            old, state["live"] = state["live"], new
            log.warning("serve: %s moved from version %s to version %s: new requests go to it", served.ref, old.served.version,
                        new.served.version)
            old.retired = True
            if not old.users:
                retire(old)

    def retire(live: _Live) -> None:
        """Close a swapped-out version's engine (in a worker thread: it joins the model threads)."""
        asyncio.get_running_loop().run_in_executor(None, live.engine.close)

    @asynccontextmanager
    async def lifespan(_app):
        state["live"] = await start(served)
        follower = asyncio.create_task(follow_alias()) if follow is not None and settings.follow_seconds > 0 else None
        yield
        if follower is not None:
            follower.cancel()
        await asyncio.to_thread(state["live"].engine.close)

    app = FastAPI(title="lmforge serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    inflight: dict[str, int] = {}  # requests per client address, queued or generating (the event loop's only)

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(RequestError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}").body(), 400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(RequestError(f"{where}: {first.get('msg')}" if where else str(first.get("msg")), where or None).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            return JSONResponse(BodyLimit.error(settings.max_request_bytes).body(), 413)
        return JSONResponse(RequestError(str(exc.detail), status=exc.status_code, kind="not_found_error" if exc.status_code == 404 else
                                         "invalid_request_error").body(), exc.status_code)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError("a valid API key is required: send 'Authorization: Bearer <key>'", status=401, code="invalid_api_key")

    def check_model(name: str) -> None:
        if name not in (served.name, served.ref):
            raise RequestError(f"the model '{name}' does not exist here; this server serves '{served.name}' (GET /v1/models)",
                               "model", status=404, code="model_not_found", kind="not_found_error")

    def sampling_of(req: _Sampling, max_tokens: int | None) -> tuple[SamplingParams, int, tuple[str, ...]]:
        if req.n != 1:
            raise RequestError("only n=1 is supported", "n")
        if req.logprobs not in (None, False, 0):
            raise RequestError("logprobs are not supported", "logprobs")
        if req.presence_penalty or req.frequency_penalty:
            raise RequestError("presence_penalty and frequency_penalty are not supported (use temperature/top_p)",
                               "presence_penalty" if req.presence_penalty else "frequency_penalty")
        wanted = settings.max_tokens if max_tokens is None else max_tokens
        if not 1 <= wanted <= settings.max_tokens_limit:
            raise RequestError(f"max_tokens must be between 1 and {settings.max_tokens_limit}, not {wanted}", "max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4:
            raise RequestError("at most 4 stop sequences", "stop")
        sampling = dataclasses.replace(
            defaults, max_new_tokens=wanted, temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p, seed=defaults.seed if req.seed is None else req.seed)
        return sampling, wanted, stop

    def encode(model: ServedModel, text: str, chat: bool, max_new: int) -> list[int]:
        ids = model.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        limit = model.context_length
        if limit is not None and len(ids) + max_new > limit:
            raise RequestError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} tokens and "
                               f"max_tokens asks for {max_new} more: shorten the prompt or lower max_tokens", "messages" if chat else "prompt",
                               code="context_length_exceeded")
        if not ids:
            raise RequestError("the prompt is empty", "messages" if chat else "prompt")
        return ids

    def admit(request: Request) -> tuple[_Live, Callable[[], None]]:
        """Count a request against its client's ``serve.max_requests_per_client`` (429 beyond it: one
        client cannot fill the queue that every other client waits in), and on the version live now,
        which answers it to the end even if the alias moves meanwhile.  Returns that version and the
        release, which may be called more than once."""
        client = request.client.host if request.client else "unknown"
        if inflight.get(client, 0) >= settings.max_requests_per_client:
            raise RequestError(f"too many requests in progress from {client} (serve.max_requests_per_client: "
                               f"{settings.max_requests_per_client}); retry when one has finished", status=429,
                               code="rate_limit_exceeded", kind="rate_limit_error")
        inflight[client] = inflight.get(client, 0) + 1
        live = state["live"]
        live.users += 1
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                inflight[client] -= 1
                if not inflight[client]:
                    del inflight[client]
                live.users -= 1
                if live.retired and not live.users:
                    retire(live)

        return live, release

    async def prepared(request: Request, prepare: Callable[[ServedModel], list[int]]) -> tuple[_Live, list[int], Callable[[], None]]:
        """The request's admission (``admit``) and its prompt's token ids, tokenized off the event loop
        (a long prompt takes seconds, during which /health and every other client must be answered)."""
        live, release = admit(request)
        try:
            return live, await asyncio.to_thread(prepare, live.served), release
        except BaseException:
            release()
            raise

    async def run(live: _Live, endpoint: str, prompt_ids: list[int], sampling: SamplingParams, max_new: int, stop: tuple[str, ...],
                  logged_prompt: Any, request_id: str, release: Callable[[], None]) -> AsyncIterator[str | Completion]:
        """Queue the request; yield its text pieces as they come, then the finished ``Completion``
        (after it is recorded in the store).  Its admission is released when it ends, however it ends."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        finished: dict[str, BaseException | None] = {}

        def on_finish(error: BaseException | None) -> None:
            finished["error"] = error
            loop.call_soon_threadsafe(pieces.put_nowait, None)

        row = Completion(prompt_ids, max_new, stop, on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        live.engine.submit(_Job(row, sampling, on_finish))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
        finally:
            row.cancelled.set()  # the client went away: its row stops at the next token (no effect once finished)
            release()
        if finished.get("error") is not None:
            raise RequestError(f"generation failed: {type(finished['error']).__name__}: {finished['error']}", status=500, kind="server_error")
        await asyncio.to_thread(store.log_request, request_id, endpoint, served.name, live.served.version, logged_prompt, row.text,
                                row.finish_reason, len(prompt_ids), len(row.token_ids))
        yield row

    def usage(prompt_ids: list[int], row: Completion) -> CompletionUsage:
        return CompletionUsage(prompt_tokens=len(prompt_ids), completion_tokens=len(row.token_ids),
                               total_tokens=len(prompt_ids) + len(row.token_ids))

    def sse(obj: BaseModel) -> str:
        return f"data: {obj.model_dump_json(exclude_unset=True)}\n\n"

    async def streamed(chunks: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
        """Server-sent events; an error after the first byte can only be reported in the stream.  The
        admission is released here too: a client gone before its generation started leaves no slot taken."""
        try:
            async for chunk in chunks:
                yield chunk
        except RequestError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception as exc:  # a bug here must end the stream with a message, not a cut connection
            yield f"data: {json.dumps(RequestError(f'{type(exc).__name__}: {exc}', status=500, kind='server_error').body())}\n\n"
        finally:
            release()
        yield "data: [DONE]\n\n"

    @app.get("/health")
    async def health() -> dict[str, Any]:
        live = state["live"]  # set before the first request is served (lifespan)
        return {"status": "ok", "model": served.name, "version": live.served.version, **live.engine.stats()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [Model(id=served.name, created=started, object="model", owned_by="lmforge").model_dump()]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        if not has_chat_template(state["live"].served.tokenizer):
            raise RequestError(f"'{served.name}' has no chat template (it is not an instruct model): use /v1/completions", "messages")
        sampling, max_new, stop = sampling_of(req, req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]

        def prepare(model: ServedModel) -> list[int]:
            try:
                text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # e.g. a template that refuses a system turn, or roles out of order
                raise RequestError(f"the model's chat template refused the messages: {exc}", "messages") from None
            return encode(model, text, True, max_new)

        live, ids, release = await prepared(request, prepare)
        rid, created = _new_id("chatcmpl"), int(time.time())
        generation = run(live, "chat.completions", ids, sampling, max_new, stop, messages, rid, release)
        if not req.stream:
            row = [item async for item in generation][-1]
            return ChatCompletion(id=rid, object="chat.completion", created=created, model=served.name, usage=usage(ids, row),
                                  choices=[Choice(index=0, finish_reason=row.finish_reason,
                                                  message=ChatCompletionMessage(role="assistant", content=row.text))]).model_dump(exclude_unset=True)

        def chunk(delta: ChoiceDelta, finish: str | None = None, **extra) -> str:
            return sse(ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=served.name,
                                           choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)], **extra))

        async def events() -> AsyncIterator[str]:
            yield chunk(ChoiceDelta(role="assistant", content=""))
            async for item in generation:
                if isinstance(item, str):
                    yield chunk(ChoiceDelta(content=item))
                else:
                    yield chunk(ChoiceDelta(), item.finish_reason)
                    if (req.stream_options or {}).get("include_usage"):
                        yield sse(ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=served.name,
                                                      choices=[], usage=usage(ids, item)))

        return StreamingResponse(streamed(events(), release), media_type="text/event-stream")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise RequestError("send one prompt per request (the server batches concurrent requests itself)", "prompt")
            req.prompt = req.prompt[0]
        if req.echo:
            raise RequestError("echo is not supported", "echo")
        sampling, max_new, stop = sampling_of(req, req.max_tokens)
        live, ids, release = await prepared(request, lambda model: encode(model, req.prompt, False, max_new))
        rid, created = _new_id("cmpl"), int(time.time())
        generation = run(live, "completions", ids, sampling, max_new, stop, req.prompt, rid, release)

        def completion(text: str, finish: str | None, **extra) -> CompletionObject:
            # a streamed piece has no finish_reason yet, which the type's Literal does not allow: built unvalidated
            choice = (CompletionChoice if finish else CompletionChoice.model_construct)(index=0, text=text, finish_reason=finish, logprobs=None)
            return CompletionObject(id=rid, object="text_completion", created=created, model=served.name, choices=[choice], **extra)

        if not req.stream:
            row = [item async for item in generation][-1]
            return completion(row.text, row.finish_reason, usage=usage(ids, row)).model_dump(exclude_unset=True)

        async def events() -> AsyncIterator[str]:
            async for item in generation:
                if isinstance(item, str):
                    yield sse(completion(item, None))
                else:
                    extra = {"usage": usage(ids, item)} if (req.stream_options or {}).get("include_usage") else {}
                    yield sse(completion("", item.finish_reason, **extra))

        return StreamingResponse(streamed(events(), release), media_type="text/event-stream")

    @app.post("/v1/feedback", dependencies=[Depends(authorized)])
    async def feedback(req: FeedbackRequest) -> dict[str, Any]:
        try:
            feedback_id = await asyncio.to_thread(store.add_feedback, req.request_id, req.rating, req.correction, req.comment)
        except UnknownRequest:
            raise RequestError(f"no request with id '{req.request_id}' was served here", "request_id", status=404,
                               kind="not_found_error") from None
        return {"object": "feedback", "id": feedback_id, "request_id": req.request_id, "stored": True}

    return app


def load_served(ref: str, tracking_uri: str | None, name: str | None = None, onnx: OnnxPrecision | None = None) -> ServedModel:
    """Load the model ``ref`` (a directory or an MLflow URI) for serving; a clear error if there is none.
    An alias is pinned to its version first: the version recorded with every answer is the one loaded.
    ``onnx``: also find or build its ONNX model of that precision (``onnx_model``), for the onnx engine.
    A model that is an ONNX graph already (the ``onnx_int8`` quantized variant) is served by the onnx
    engine whatever ``serve.engine`` says: its greedy requests by continuous batching, its sampled
    ones in dynamic batches of the same graph (``OnnxCausalLM.generate``)."""
    from lmforge.registry import model_directory
    from models.loading import load_dir

    try:
        directory, version = model_directory(ref, tracking_uri)
    except LmforgeError as exc:
        raise LmforgeError(f"serve: {exc}") from None
    model, tokenizer, objective = load_dir(directory)
    if objective != "causal":
        raise LmforgeError(f"serve: {ref} is a {objective} model; the completion API serves causal language models")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    registered = ref.startswith("models:/")
    return ServedModel(name=name or (ref[len("models:/") :] if registered else ref.rstrip("/").rsplit("/", 1)[-1]), ref=ref,
                       version=version.rsplit("/", 1)[-1] if registered else None, model=model, tokenizer=tokenizer,
                       onnx_dir=getattr(model, "onnx_dir", None) or (onnx_model(version, directory, onnx, tracking_uri) if onnx else None))


def onnx_model(pinned: str, directory: Path, precision: OnnxPrecision, tracking_uri: str | None) -> Path:
    """The ONNX model the onnx engine decodes with.  For a registry version, the one the export stage
    built, checked and tagged on it (``onnx_<precision>_uri``); otherwise (or without that tag) built
    here once from ``directory`` and cached by the weights' hash under ``$LMFORGE_CACHE`` (default
    ``~/.cache/lmforge``): ~10 s for SmolLM2-135M."""
    import os

    from lmforge.artifacts import weights_sha256
    from models.onnx_genai import CONFIG, OnnxBuildError, build

    if pinned.startswith("models:/") and "@" not in pinned:
        import mlflow

        from models.generation import use_mlflow_store

        name, version = pinned[len("models:/") :].rsplit("/", 1)
        tags = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version(name, version).tags
        if uri := tags.get(f"onnx_{precision}_uri"):
            use_mlflow_store(tracking_uri)
            found = sorted(p.parent for p in Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)).rglob(CONFIG))
            if found:
                return found[0]
    cache = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge") / "onnx" / f"{weights_sha256(directory)[:16]}-{precision}"
    if not (cache / CONFIG).is_file():
        try:
            build(directory, cache, precision)
        except OnnxBuildError as exc:
            raise LmforgeError(f"serve --engine onnx: {exc}\n(serve it with --engine dynamic or continuous)") from None
    return cache
