"""The parts of ``lmforge serve`` one by one, without an HTTP server or a model (``lmforge/serving/``):
request validation, the OpenAI wire format, the batcher, the feedback recorder, the access checks and
the version swap.  ``test_serve`` answers real requests end to end."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest
from openai.types import Completion as CompletionObject
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError
from starlette.requests import Request

from lmforge.feedback_store import FeedbackStore
from lmforge.params import SamplingParams, ServeParams
from lmforge.serving import wire
from lmforge.serving.access import ApiKey, ClientLimit, is_loopback
from lmforge.serving.engine import Batcher, Job, stream
from lmforge.serving.live import Deployment, Live
from lmforge.serving.model import ServedModel
from lmforge.serving.recording import Recorder
from lmforge.serving.requests import (ChatRequest, CompletionRequest, FeedbackRequest, chat_prompt_ids, check_model, invalid_body,
                                      prompt_ids, sampling_of)
from lmforge.serving.wire import Reply, RequestError
from models.batching import Completion

SETTINGS = ServeParams(max_tokens=16, max_tokens_limit=64)
DEFAULTS = SamplingParams(temperature=0.7, top_p=0.9, seed=5)


class WordTokenizer:
    """A tokenizer of whitespace-separated words (a word's id is its position in ``vocabulary``), with a
    chat template that refuses a conversation not ending with the user: what the validation reads."""

    def __init__(self) -> None:
        self.vocabulary: list[str] = []
        self.special_added: list[bool] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.special_added.append(add_special_tokens)
        for word in text.split():
            if word not in self.vocabulary:
                self.vocabulary.append(word)
        return {"input_ids": [self.vocabulary.index(word) for word in text.split()]}

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        if messages[-1]["role"] != "user":
            raise ValueError("the conversation must end with the user")
        return " ".join(f"{m['role']}: {m['content']}" for m in messages) + " assistant:"

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def served(context: int = 10) -> ServedModel:
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))
    return ServedModel(name="tiny", ref="/models/tiny", version="3", model=model, tokenizer=WordTokenizer())


def refused(call, *args) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call(*args)
    return caught.value


# --------------------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------------------


def test_sampling_takes_the_request_over_the_defaults_within_the_limits():
    sampling, stop = sampling_of(CompletionRequest(model="tiny", prompt="x", temperature=0, stop="END"), SETTINGS, DEFAULTS)
    assert (sampling.temperature, sampling.top_p, sampling.seed, sampling.max_new_tokens) == (0, 0.9, 5, 16)  # serve.max_tokens
    assert stop == ("END",)
    sampling, stop = sampling_of(ChatRequest(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                             max_completion_tokens=7, seed=9, stop=["a", "b"]), SETTINGS, DEFAULTS)
    assert (sampling.temperature, sampling.max_new_tokens, sampling.seed, stop) == (0.7, 7, 9, ("a", "b"))


@pytest.mark.parametrize("fields, param, says", [
    ({"n": 2}, "n", "only n=1"),
    ({"logprobs": True}, "logprobs", "logprobs are not supported"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be between 1 and 64, not 0"),
    ({"max_tokens": 65}, "max_tokens", "max_tokens must be between 1 and 64, not 65"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop sequences"),
])
def test_sampling_refuses_what_a_local_model_cannot_honour(fields, param, says):
    error = refused(sampling_of, CompletionRequest(model="tiny", prompt="x", **fields), SETTINGS, DEFAULTS)
    assert (error.status, error.param) == (400, param) and says in error.message


def test_a_completion_has_one_prompt_and_no_echo():
    assert CompletionRequest(model="tiny", prompt=["only one"]).prompt_text() == "only one"
    assert refused(CompletionRequest(model="tiny", prompt=["one", "two"]).prompt_text).message.startswith("send one prompt per request")
    assert refused(CompletionRequest(model="tiny", prompt="x", echo=True).prompt_text).param == "echo"


def test_a_chat_is_the_text_of_its_messages():
    req = ChatRequest(model="tiny", messages=[{"role": "developer", "content": "be brief"},
                                              {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}])
    assert req.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    image = ChatRequest(model="tiny", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert refused(image.conversation).message == "only text content parts are supported"


def test_pydantic_errors_become_one_message_naming_the_field():
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate({"model": "tiny", "messages": []})
    error = invalid_body(caught.value.errors())
    assert error.param == "messages" and error.message.startswith("messages: ") and error.status == 400
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]})
    assert invalid_body(caught.value.errors()).param == "messages.0.role"
    not_json = invalid_body([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}])
    assert not_json.message == "the body is not valid JSON: Expecting value" and not_json.param is None
    assert invalid_body([{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}]).message == "prompt: Field required"


def test_a_request_names_the_model_served():
    model = served()
    check_model("tiny", model)
    check_model("/models/tiny", model)
    error = refused(check_model, "other", model)
    assert (error.status, error.code, error.kind) == (404, "model_not_found", "not_found_error") and "serves 'tiny'" in error.message


def test_a_prompt_must_fit_the_context_with_its_max_tokens():
    model = served(context=10)
    assert prompt_ids(model, "a b c", 7) == [0, 1, 2]
    error = refused(prompt_ids, model, "a b c d", 7)
    assert error.code == "context_length_exceeded" and error.param == "prompt"
    assert "maximum context length is 10 tokens; the prompt has 4 tokens and max_tokens asks for 7" in error.message
    assert refused(prompt_ids, model, "   ", 1).message == "the prompt is empty"


def test_a_chat_goes_through_the_template_without_added_special_tokens():
    model = served(context=20)
    ids = chat_prompt_ids(model, [{"role": "user", "content": "hi there"}], 4)
    assert len(ids) == 4 and model.tokenizer.special_added == [False]  # "user: hi there assistant:"
    error = refused(chat_prompt_ids, model, [{"role": "assistant", "content": "hi"}], 4)
    assert error.param == "messages" and "chat template refused the messages: the conversation must end with the user" in error.message


def test_feedback_is_a_rating_of_one_answer():
    assert FeedbackRequest(request_id="cmpl-1", rating=5).correction is None
    for bad in ({"request_id": "x", "rating": 9}, {"request_id": "", "rating": 3}, {"request_id": "x", "rating": 3, "correction": ""},
                {"request_id": "x", "rating": 3, "stars": 5}):
        with pytest.raises(ValidationError):
            FeedbackRequest.model_validate(bad)


# --------------------------------------------------------------------------------------------------
# The OpenAI wire format
# --------------------------------------------------------------------------------------------------


def finished_row(text: str = "hello", tokens: int = 2, finish: str = "length") -> Completion:
    return Completion([1, 2, 3], tokens, text=text, token_ids=list(range(tokens)), finish_reason=finish)


async def pieces_then(row: Completion, *pieces: str):
    for piece in pieces:
        yield piece
    yield row


def collect(events) -> list[str]:
    async def run() -> list[str]:
        return [event async for event in events]

    return asyncio.run(run())


def data(event: str) -> dict | str:
    assert event.startswith("data: ") and event.endswith("\n\n"), event
    payload = event[len("data: ") : -2]
    return payload if payload == "[DONE]" else json.loads(payload)


def test_a_reply_id_is_the_kind_and_24_hex_digits():
    reply = Reply.new("chatcmpl", "tiny")
    prefix, digits = reply.id.split("-")
    assert prefix == "chatcmpl" and len(digits) == 24 and int(digits, 16) >= 0 and reply.model == "tiny"
    assert Reply.new("cmpl", "tiny").id != Reply.new("cmpl", "tiny").id


def test_a_chat_completion_is_what_the_openai_client_parses():
    body = wire.chat_completion(Reply("chatcmpl-1", 100, "tiny"), finished_row(), prompt_tokens=3)
    parsed = ChatCompletion.model_validate(body)
    assert (parsed.id, parsed.object, parsed.created, parsed.model) == ("chatcmpl-1", "chat.completion", 100, "tiny")
    assert parsed.choices[0].message.role == "assistant" and parsed.choices[0].message.content == "hello"
    assert parsed.choices[0].finish_reason == "length"
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (3, 2, 5)


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_chat_opens_with_the_role_and_ends_with_the_finish_reason(include_usage):
    reply = Reply("chatcmpl-1", 100, "tiny")
    events = [data(e) for e in collect(wire.chat_events(reply, pieces_then(finished_row(), "hel", "lo"), 3, include_usage))]
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    assert all(c.id == "chatcmpl-1" and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["hel", "lo"]
    assert chunks[3].choices[0].finish_reason == "length" and chunks[3].choices[0].delta.content is None
    if include_usage:
        assert len(chunks) == 5 and chunks[4].choices == [] and chunks[4].usage.total_tokens == 5
    else:
        assert len(chunks) == 4 and all("usage" not in e for e in events)


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_completion_is_a_text_completion_per_piece(include_usage):
    reply = Reply("cmpl-1", 100, "tiny")
    events = [data(e) for e in collect(wire.completion_events(reply, pieces_then(finished_row(), "hel", "lo"), 3, include_usage))]
    assert [e["choices"][0]["text"] for e in events] == ["hel", "lo", ""]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "length"]
    assert ("usage" in events[-1]) == include_usage and all("usage" not in e for e in events[:-1])
    last = CompletionObject.model_validate(events[-1])
    assert last.object == "text_completion"
    assert (last.usage.total_tokens == 5) if include_usage else last.usage is None


def test_a_whole_completion_carries_its_usage():
    body = wire.text_completion(Reply("cmpl-1", 100, "tiny"), "hello", "stop", wire.usage(3, finished_row())).model_dump(exclude_unset=True)
    assert body["choices"] == [{"index": 0, "text": "hello", "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_errors_have_openais_body():
    error = RequestError("no such thing", "model", status=404, code="model_not_found", kind="not_found_error")
    assert error.body() == {"error": {"message": "no such thing", "type": "not_found_error", "param": "model", "code": "model_not_found"}}
    assert wire.http_error(404, "Not Found").body()["error"]["type"] == "not_found_error"
    assert (wire.http_error(405, "Method Not Allowed").status, wire.http_error(405, "x").kind) == (405, "invalid_request_error")
    failed = wire.server_error(ValueError("boom"), "generation failed: ")
    assert (failed.status, failed.kind, failed.message) == (500, "server_error", "generation failed: ValueError: boom")


def test_a_stream_reports_an_error_as_an_event_ends_with_done_and_is_closed_once():
    def failing(error: Exception):
        async def events():
            yield "data: first\n\n"
            raise error

        return events()

    for error, expected in [(RequestError("generation failed: X", status=500, kind="server_error"), "generation failed: X"),
                            (KeyError("k"), "KeyError: 'k'")]:
        closed = []
        events = collect(wire.streamed(failing(error), lambda: closed.append(True)))
        assert events[0] == "data: first\n\n" and events[-1] == wire.DONE and closed == [True]
        assert data(events[1])["error"]["message"] == expected and data(events[1])["error"]["type"] == "server_error"


def test_the_model_list_and_the_feedback_receipt():
    listed = wire.model_list("tiny", 100)
    assert listed["object"] == "list" and [Model.model_validate(m) for m in listed["data"]] == [
        Model(id="tiny", created=100, object="model", owned_by="lmforge")]
    assert wire.feedback_stored(7, "cmpl-1") == {"object": "feedback", "id": 7, "request_id": "cmpl-1", "stored": True}


# --------------------------------------------------------------------------------------------------
# The batcher
# --------------------------------------------------------------------------------------------------


class Letters:
    """The batcher's input: a generate function that writes each row's prompt ids back as letters, one
    token a step, and notes each batch it was given."""

    def __init__(self, fail: bool = False):
        self.batches: list[list[list[int]]] = []
        self.fail = fail

    def __call__(self, rows: list[Completion], sampling: SamplingParams) -> None:
        self.batches.append([row.prompt_ids for row in rows])
        if self.fail:
            raise RuntimeError("out of memory")
        tokenizer = WordTokenizer()
        for step in range(max(row.max_new_tokens for row in rows)):
            for row in rows:
                row.take(row.prompt_ids[step % len(row.prompt_ids)], tokenizer, eos_ids=set())


def job(ids: list[int], temperature: float, finished: list) -> Job:
    return Job(Completion(ids, 2), SamplingParams(temperature=temperature, max_new_tokens=2), finished.append)


def test_concurrent_requests_share_a_batch_by_their_sampling_settings():
    """Sent within the window, the greedy requests go together, up to the batch size, and the sampled
    one waits for a batch of its own."""
    generate, finished = Letters(), []
    batcher = Batcher(generate, max_batch_size=3, wait_seconds=0.5)
    try:
        for ids, temperature in [([0], 0.0), ([1], 0.8), ([2], 0.0), ([3], 0.0), ([4], 0.0)]:
            batcher.submit(job(ids, temperature, finished))
        deadline = time.monotonic() + 30
        while len(finished) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        batcher.close()
    assert generate.batches == [[[0], [2], [3]], [[1]], [[4]]]
    assert finished == [None] * 5 and (batcher.batches, batcher.requests) == (3, 5)


def test_cancelled_requests_are_not_generated_and_a_failed_batch_fails_only_its_requests():
    generate, finished = Letters(fail=True), []
    batcher = Batcher(generate, max_batch_size=8, wait_seconds=0.2)
    gone = job([9], 0.0, finished)
    gone.row.cancelled.set()
    batcher.submit(gone)
    batcher.submit(job([1], 0.0, finished))
    batcher.close()
    assert generate.batches == [[[1]]]
    assert len(finished) == 1 and isinstance(finished[0], RuntimeError) and not batcher.thread.is_alive()


def test_a_stream_yields_the_pieces_then_the_finished_row():
    batcher = Batcher(Letters(), max_batch_size=4, wait_seconds=0)

    async def run() -> list:
        return [item async for item in stream(batcher.submit, [0, 1, 2], SamplingParams(temperature=0.0, max_new_tokens=3), ())]

    try:
        items = asyncio.run(run())
    finally:
        batcher.close()
    assert items[:-1] == ["a", "b", "c"]
    assert (items[-1].text, items[-1].finish_reason, items[-1].token_ids) == ("abc", "length", [0, 1, 2])


def test_a_failed_generation_is_a_500_and_a_closed_stream_cancels_its_row():
    batcher = Batcher(Letters(fail=True), max_batch_size=4, wait_seconds=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3)

    async def failing() -> None:
        async for _item in stream(batcher.submit, [0], greedy, ()):
            pass

    try:
        with pytest.raises(RequestError) as caught:
            asyncio.run(failing())
    finally:
        batcher.close()
    assert caught.value.status == 500 and caught.value.message == "generation failed: RuntimeError: out of memory"

    submitted: list[Job] = []

    async def leave_early() -> None:
        pieces = stream(submitted.append, [0], greedy, ())
        waiting = asyncio.ensure_future(pieces.__anext__())
        await asyncio.sleep(0.05)  # queued, nothing generated: the client goes away
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(leave_early())
    assert len(submitted) == 1 and submitted[0].row.cancelled.is_set()


# --------------------------------------------------------------------------------------------------
# Feedback recording
# --------------------------------------------------------------------------------------------------


def test_the_recorder_writes_each_answer_and_its_feedback(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    recorder = Recorder(store, "tiny")
    messages = [{"role": "user", "content": "hi"}]
    asyncio.run(recorder.answer("chatcmpl-1", "chat.completions", "3", messages, 4, finished_row("hello", 2, "stop")))
    request = store.request("chatcmpl-1")
    assert {k: request[k] for k in ("endpoint", "model", "model_version", "prompt", "completion", "finish_reason",
                                   "prompt_tokens", "completion_tokens")} == {
        "endpoint": "chat.completions", "model": "tiny", "model_version": "3", "prompt": json.dumps(messages), "completion": "hello",
        "finish_reason": "stop", "prompt_tokens": 4, "completion_tokens": 2}
    feedback_id = asyncio.run(recorder.feedback(FeedbackRequest(request_id="chatcmpl-1", rating=2, correction="better", comment="terse")))
    [stored] = store.feedback_with_requests()
    assert (stored["feedback_id"], stored["request_id"], stored["rating"], stored["correction"], stored["comment"]) == (
        feedback_id, "chatcmpl-1", 2, "better", "terse")


def test_the_recorder_refuses_feedback_on_an_answer_not_served_here(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    with pytest.raises(RequestError) as caught:
        asyncio.run(Recorder(store, "tiny").feedback(FeedbackRequest(request_id="cmpl-none", rating=5)))
    assert (caught.value.status, caught.value.param, caught.value.kind) == (404, "request_id", "not_found_error")
    assert caught.value.message == "no request with id 'cmpl-none' was served here"
    assert store.counts() == {"requests": 0, "feedback": 0}


# --------------------------------------------------------------------------------------------------
# Access: the API key, one client's share
# --------------------------------------------------------------------------------------------------


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.5.0.1", "::1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.2", "example.org", "::"))


def test_the_api_key_is_a_bearer_token():
    def request(authorization: str | None) -> Request:
        headers = [(b"authorization", authorization.encode())] if authorization is not None else []
        return Request({"type": "http", "headers": headers})

    ApiKey(None)(request(None))
    ApiKey("s3cret")(request("Bearer s3cret"))
    ApiKey("s3cret")(request("bearer s3cret "))
    for wrong in (None, "Bearer wrong", "Basic s3cret", "s3cret"):
        error = refused(ApiKey("s3cret"), request(wrong))
        assert (error.status, error.code) == (401, "invalid_api_key")


def test_one_client_has_at_most_its_share_in_progress():
    limit = ClientLimit(2)
    first, second = limit.admit("10.0.0.1"), limit.admit("10.0.0.1")
    error = refused(limit.admit, "10.0.0.1")
    assert (error.status, error.code, error.kind) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert "serve.max_requests_per_client: 2" in error.message
    limit.admit("10.0.0.2")  # another client is not held up
    first()
    first()  # a release counts once
    assert limit.in_progress == {"10.0.0.1": 1, "10.0.0.2": 1}
    limit.admit("10.0.0.1")
    second()
    assert limit.in_progress == {"10.0.0.1": 1, "10.0.0.2": 1}


# --------------------------------------------------------------------------------------------------
# The live version
# --------------------------------------------------------------------------------------------------


class Closable:
    """An engine as the deployment sees it: something to close once its last request has finished."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def test_a_swapped_out_version_answers_its_requests_and_closes_after_the_last():
    async def run() -> tuple[Closable, Closable]:
        deployment = Deployment(ServeParams())
        old_engine, new_engine = Closable(), Closable()
        deployment.live = Live(SimpleNamespace(version="1", ref="models:/m@champion"), old_engine)
        held, release = deployment.hold()
        _, release_other = deployment.hold()
        deployment.swap(Live(SimpleNamespace(version="2", ref="models:/m@champion"), new_engine))
        assert held.served.version == "1" and deployment.live.served.version == "2" and held.retired
        for finish in (release, release):  # one request finishes (a release counts once): the other still runs on it
            finish()
            await asyncio.sleep(0.05)
            assert not old_engine.closed.is_set() and held.users == 1
        release_other()
        await asyncio.to_thread(old_engine.closed.wait, 5)
        assert held.users == 0 and deployment.hold()[0].users == 1
        return old_engine, new_engine

    old_engine, new_engine = asyncio.run(run())
    assert old_engine.closed.is_set() and not new_engine.closed.is_set()
