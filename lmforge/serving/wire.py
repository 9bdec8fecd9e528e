"""The OpenAI wire format: the JSON bodies, server-sent events and error bodies a client receives.

Responses are built from the ``openai`` package's own pydantic types, so what the official client parses
is what is sent.  Nothing here knows about models or HTTP routes: a finished ``Completion`` (or a stream of
its text pieces) goes in, OpenAI's shapes come out.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from openai.types import Completion as CompletionObject
from openai.types import CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel

from models.batching import Completion

#: The last event of every stream, as OpenAI sends it.
DONE = "data: [DONE]\n\n"


class RequestError(Exception):
    """A request that cannot be answered: sent with ``status`` and OpenAI's error body, so that clients
    raise their usual exceptions (``BadRequestError``, ``NotFoundError``, ...)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def http_error(status: int, detail: str) -> RequestError:
    """An HTTP error raised by the framework (an unknown route, a wrong method) in OpenAI's shape."""
    return RequestError(detail, status=status, kind="not_found_error" if status == 404 else "invalid_request_error")


def server_error(exc: BaseException, prefix: str = "") -> RequestError:
    """A failure of the server's own (500): its type and message, for the client to report."""
    return RequestError(f"{prefix}{type(exc).__name__}: {exc}", status=500, kind="server_error")


def sse(obj: BaseModel) -> str:
    """One server-sent event carrying ``obj`` (the fields it was built with, as OpenAI sends them)."""
    return f"data: {obj.model_dump_json(exclude_unset=True)}\n\n"


def error_event(error: RequestError) -> str:
    """An error after a stream's first byte: the status is sent already, so it can only be an event."""
    return f"data: {json.dumps(error.body())}\n\n"


def usage(prompt_tokens: int, row: Completion) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=len(row.token_ids),
                           total_tokens=prompt_tokens + len(row.token_ids))


def model_list(name: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model served."""
    return {"object": "list", "data": [Model(id=name, created=created, object="model", owned_by="lmforge").model_dump()]}


def feedback_stored(feedback_id: int, request_id: str) -> dict[str, Any]:
    """``POST /v1/feedback`` (lmforge's own): the stored feedback's id."""
    return {"object": "feedback", "id": feedback_id, "request_id": request_id, "stored": True}


@dataclass(frozen=True)
class Reply:
    """What every object of one response shares.  The ``id`` is also the request's key in the feedback
    store: a user rates an answer by the id the client received."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> "Reply":
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model)


def chat_completion(reply: Reply, row: Completion, prompt_tokens: int) -> dict[str, Any]:
    """A non-streamed ``chat.completion``."""
    message = ChatCompletionMessage(role="assistant", content=row.text)
    choice = Choice(index=0, finish_reason=row.finish_reason, message=message)
    return ChatCompletion(id=reply.id, object="chat.completion", created=reply.created, model=reply.model,
                          usage=usage(prompt_tokens, row), choices=[choice]).model_dump(exclude_unset=True)


def chat_chunk(reply: Reply, delta: ChoiceDelta, finish: str | None = None) -> str:
    """One ``chat.completion.chunk`` event: a piece of the answer, or (``finish``) its end."""
    return sse(ChatCompletionChunk(id=reply.id, object="chat.completion.chunk", created=reply.created, model=reply.model,
                                   choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)]))


async def chat_events(reply: Reply, generation: AsyncIterator[str | Completion], prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
    """A streamed chat answer: the assistant's role first, a chunk per text piece, the finish reason, and
    (``stream_options.include_usage``) a last chunk with no choices and the token counts."""
    yield chat_chunk(reply, ChoiceDelta(role="assistant", content=""))
    async for item in generation:
        if isinstance(item, str):
            yield chat_chunk(reply, ChoiceDelta(content=item))
        else:
            yield chat_chunk(reply, ChoiceDelta(), item.finish_reason)
            if include_usage:
                yield sse(ChatCompletionChunk(id=reply.id, object="chat.completion.chunk", created=reply.created, model=reply.model,
                                              choices=[], usage=usage(prompt_tokens, item)))


def text_completion(reply: Reply, text: str, finish: str | None,
                    completion_usage: CompletionUsage | None = None) -> CompletionObject:
    """A ``text_completion``: the whole answer, or a streamed piece of it (``finish`` None)."""
    # a streamed piece has no finish_reason yet, which the type's Literal does not allow: built unvalidated
    build = CompletionChoice if finish else CompletionChoice.model_construct
    choice = build(index=0, text=text, finish_reason=finish, logprobs=None)
    extra = {"usage": completion_usage} if completion_usage is not None else {}
    return CompletionObject(id=reply.id, object="text_completion", created=reply.created, model=reply.model, choices=[choice],
                            **extra)


async def completion_events(reply: Reply, generation: AsyncIterator[str | Completion], prompt_tokens: int,
                            include_usage: bool) -> AsyncIterator[str]:
    """A streamed text completion: an object per text piece, then one with no text and the finish reason
    (and the token counts, ``stream_options.include_usage``)."""
    async for item in generation:
        if isinstance(item, str):
            yield sse(text_completion(reply, item, None))
        else:
            yield sse(text_completion(reply, "", item.finish_reason, usage(prompt_tokens, item) if include_usage else None))


async def streamed(events: AsyncIterator[str], on_close: Callable[[], None]) -> AsyncIterator[str]:
    """``events`` as a response body: an error after the first byte becomes an error event, and the
    stream always ends with ``[DONE]``.  ``on_close`` runs when the stream ends however it ends (a client
    gone before its generation started included)."""
    try:
        async for event in events:
            yield event
    except RequestError as exc:
        yield error_event(exc)
    except Exception as exc:  # a bug here must end the stream with a message, not a cut connection
        yield error_event(server_error(exc))
    finally:
        on_close()
    yield DONE
