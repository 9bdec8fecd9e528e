"""The routes of ``lmforge serve``, each joining the parts in the same order (litgpt's ``LitAPI``
decode → predict → encode): validate the body (``requests``), admit the request (``access``, ``live``),
generate (``engine``), record the answer (``recording``) and send it in OpenAI's shape (``wire``)."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.feedback_store import FeedbackStore
from lmforge.params import SamplingParams, ServeParams
from lmforge.serving import wire
from lmforge.serving.access import ApiKey, BodyLimit, ClientLimit
from lmforge.serving.engine import stream
from lmforge.serving.live import Deployment, Live
from lmforge.serving.model import AliasFollower, ServedModel
from lmforge.serving.recording import Recorder
from lmforge.serving.requests import (ChatRequest, CompletionRequest, FeedbackRequest, chat_prompt_ids, check_model,
                                      check_template, invalid_body, prompt_ids, sampling_of)
from lmforge.serving.wire import Reply, RequestError
from models.batching import Completion


class Service:
    """One served model's request handling, a method per route; ``create_app`` wires them to paths."""

    def __init__(self, served: ServedModel, store: FeedbackStore, settings: ServeParams, sampling_defaults: SamplingParams,
                 follow: AliasFollower | None = None):
        self.served, self.settings, self.defaults = served, settings, sampling_defaults
        self.started = int(time.time())
        self.recorder = Recorder(store, served.name)
        self.clients = ClientLimit(settings.max_requests_per_client)
        self.deployment = Deployment(settings, follow)

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        """The engine starts (and is warmed up) before the first request, and stops with the server."""
        await self.deployment.open(self.served)
        yield
        await self.deployment.close()

    async def health(self) -> dict[str, Any]:
        live = self.deployment.live
        return {"status": "ok", "model": self.served.name, "version": live.served.version, **live.engine.stats()}

    async def models(self) -> dict[str, Any]:
        return wire.model_list(self.served.name, self.started)

    async def chat_completions(self, req: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        check_model(req.model, self.served)
        check_template(self.deployment.live.served)
        sampling, stop = sampling_of(req, self.settings, self.defaults)
        messages = req.conversation()
        live, ids, release = await self._admit(request, lambda model: chat_prompt_ids(model, messages, sampling.max_new_tokens))
        reply = Reply.new("chatcmpl", self.served.name)
        generation = self._answer(live, "chat.completions", ids, sampling, stop, messages, reply.id, release)
        if not req.stream:
            return wire.chat_completion(reply, await _finished(generation), len(ids))
        return _event_stream(wire.chat_events(reply, generation, len(ids), req.include_usage()), release)

    async def completions(self, req: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        check_model(req.model, self.served)
        prompt = req.prompt_text()
        sampling, stop = sampling_of(req, self.settings, self.defaults)
        live, ids, release = await self._admit(request, lambda model: prompt_ids(model, prompt, sampling.max_new_tokens))
        reply = Reply.new("cmpl", self.served.name)
        generation = self._answer(live, "completions", ids, sampling, stop, prompt, reply.id, release)
        if not req.stream:
            row = await _finished(generation)
            whole = wire.text_completion(reply, row.text, row.finish_reason, wire.usage(len(ids), row))
            return whole.model_dump(exclude_unset=True)
        return _event_stream(wire.completion_events(reply, generation, len(ids), req.include_usage()), release)

    async def feedback(self, req: FeedbackRequest) -> dict[str, Any]:
        return wire.feedback_stored(await self.recorder.feedback(req), req.request_id)

    async def _admit(self, request: Request,
                     prepare: Callable[[ServedModel], list[int]]) -> tuple[Live, list[int], Callable[[], None]]:
        """Count the request against its client's share (``ClientLimit``), hold the version live now, and
        tokenize its prompt with that version's tokenizer, off the event loop (a long prompt takes
        seconds, during which /health and every other client must be answered).  Returns the version,
        the prompt's token ids and the release, which may be called more than once."""
        release_client = self.clients.admit(request.client.host if request.client else "unknown")
        live, release_version = self.deployment.hold()

        def release() -> None:
            release_client()
            release_version()

        try:
            return live, await asyncio.to_thread(prepare, live.served), release
        except BaseException:
            release()
            raise

    async def _answer(self, live: Live, endpoint: str, ids: list[int], sampling: SamplingParams, stop: tuple[str, ...],
                      logged_prompt: str | list[dict[str, str]], request_id: str,
                      release: Callable[[], None]) -> AsyncIterator[str | Completion]:
        """The request's text pieces as they come, then the finished ``Completion``, recorded in the
        feedback store before it is yielded.  The admission is released when generation ends, however it ends."""
        try:
            async with aclosing(stream(live.engine.submit, ids, sampling, stop)) as pieces:
                async for item in pieces:
                    if isinstance(item, str):
                        yield item
                    else:
                        row = item
        finally:
            release()
        await self.recorder.answer(request_id, endpoint, live.served.version, logged_prompt, len(ids), row)
        yield row


async def _finished(generation: AsyncIterator[str | Completion]) -> Completion:
    """A non-streamed request: the pieces are not sent, only the finished answer."""
    return [item async for item in generation][-1]


def _event_stream(events: AsyncIterator[str], release: Callable[[], None]) -> StreamingResponse:
    return StreamingResponse(wire.streamed(events, release), media_type="text/event-stream")


def _error_handlers(app: FastAPI, max_request_bytes: int) -> None:
    """Every error a client can get, in OpenAI's body: ours, FastAPI's validation and Starlette's HTTP errors."""

    def respond(error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return respond(exc)

    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(invalid_body(exc.errors()))

    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return respond(BodyLimit.error(max_request_bytes))
        return respond(wire.http_error(exc.status_code, str(exc.detail)))

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def create_app(served: ServedModel, store: FeedbackStore, settings: ServeParams, api_key: str | None = None,
               sampling_defaults: SamplingParams | None = None, follow: AliasFollower | None = None) -> FastAPI:
    """The FastAPI application serving ``served`` with ``settings`` (``params.yaml`` ``serve:``, batch size,
    window and token limits); its ``Engine`` starts with it and stops with it.  With ``follow``,
    the registry is polled every ``serve.follow_seconds`` and a moved alias's version is loaded beside
    the old one and swapped in (``lmforge.serving.live``)."""
    service = Service(served, store, settings, sampling_defaults or SamplingParams(), follow)
    app = FastAPI(title="lmforge serve", lifespan=service.lifespan)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    _error_handlers(app, settings.max_request_bytes)
    keyed = [Depends(ApiKey(api_key))]  # every /v1/ route; health checks need no key
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/v1/models", service.models, methods=["GET"], dependencies=keyed)
    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"], dependencies=keyed, response_model=None)
    app.add_api_route("/v1/completions", service.completions, methods=["POST"], dependencies=keyed, response_model=None)
    app.add_api_route("/v1/feedback", service.feedback, methods=["POST"], dependencies=keyed)
    return app
