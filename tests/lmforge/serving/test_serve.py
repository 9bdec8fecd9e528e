"""``lmforge serve``: the OpenAI API answered for real (the official ``openai`` client, and raw HTTP for
the mistakes a client can make), continuous and dynamic batching of concurrent requests, the API key,
the durable request and feedback log."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, Server, save_tiny_llama

#: A chat template of the simplest kind, for the tiny test model (instruct models bring their own).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_chat_model(out: Path, heads: int = 4) -> Path:
    """The tiny Llama of test_pretrained, with a chat template."""
    from transformers import AutoTokenizer

    path = save_tiny_llama(out, heads=heads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("server"), chat_model, "--engine", "continuous", "--max-batch-size", "8", "--batch-wait-ms", "200")
    yield server
    server.stop()


def test_the_openai_client_gets_completions_and_chats_plain_and_streamed(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny-chat"]

    plain = client.completions.create(model="tiny-chat", prompt="the model reads", max_tokens=6, temperature=0)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    assert plain.usage.completion_tokens == 6 and plain.choices[0].finish_reason == "length" and plain.choices[0].text
    pieces = list(client.completions.create(model="tiny-chat", prompt="the model reads", max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text and len(pieces) > 2
    assert pieces[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what does the model read"}]
    chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens == 5
    # the chat template put the turns before the answer: the prompt is longer than the user's words
    assert chat.usage.prompt_tokens > len("what does the model read".split())

    # sampled, with a seed: the same answer twice; a stop string ends the text before it
    sampled = [client.completions.create(model="tiny-chat", prompt="language data", max_tokens=8, temperature=1.0, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    stop_at = plain.choices[0].text.split()[1]
    stopped = client.completions.create(model="tiny-chat", prompt="the model reads", max_tokens=6, temperature=0, stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop" and stop_at not in stopped.choices[0].text


@pytest.mark.parametrize("engine", ["continuous", "dynamic", pytest.param("onnx", marks=pytest.mark.slow)])  # onnx: two servers and a build, ~30 s
def test_concurrent_requests_are_generated_together_with_the_answers_they_get_alone(server, chat_model, tmp_path, engine):
    """Greedy requests sent together get the text each gets alone, each stopped at its own max_tokens: by
    continuous batching, where they overlap (transformers', or the onnx engine's over the ONNX graph, whose fp32
    model gives PyTorch's greedy text), and in dynamic batches (the default engine), which they share."""
    if engine == "dynamic":
        server = Server(tmp_path, chat_model, "--engine", "dynamic", "--max-batch-size", "8", "--batch-wait-ms", "200")
    elif engine == "onnx":  # ONNX Runtime's attention takes heads of 16 dimensions or more: the same tiny model with 2 heads
        chat_model = tiny_chat_model(tmp_path / "tiny-chat", heads=2)
        reference = Server(tmp_path / "torch", chat_model, "--engine", "dynamic")  # PyTorch
        server = Server(tmp_path / "onnx", chat_model, "--engine", "onnx", serve={"onnx_precision": "fp32"})
    try:
        client = server.client()
        prompts = ["the model reads", "language data needs", "engineers want lineage from each", "python packages", "every stage",
                   "small mistakes spread", "the exact file", "careful validation because"]
        lengths = [3, 7, 5, 9, 4, 6, 8, 2]
        alone = [client.completions.create(model="tiny-chat", prompt=p, max_tokens=n, temperature=0) for p, n in zip(prompts, lengths)]
        before = server.health()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda pn: client.completions.create(model="tiny-chat", prompt=pn[0], max_tokens=pn[1], temperature=0),
                                     zip(prompts, lengths)))
        after = server.health()
        assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]
        assert [r.usage.completion_tokens for r in together] == lengths  # each stopped at its own max_tokens
        if engine == "dynamic":
            assert "continuous" not in after and after["requests"] - before["requests"] == 8
            assert after["batches"] - before["batches"] < 8  # some requests shared a batch (the 200 ms window lets them join)
        elif engine == "onnx":
            assert after["onnx"]["requests"] - before["onnx"]["requests"] == 8 and after["requests"] == before["requests"]
            assert after["onnx"]["peak_in_progress"] >= 2  # they were generated together
            torch_answers = [reference.client().completions.create(model="tiny-chat", prompt=p, max_tokens=n, temperature=0).choices[0].text
                             for p, n in zip(prompts, lengths)]
            assert [r.choices[0].text for r in alone] == torch_answers
            # the tiny graph writes its whole context (256) in less time than a closed connection may take to
            # reach a busy 2-core server: here only the place is checked, the next test checks the step
            assert_cancelled_stream_frees_its_place(server, "onnx", stops_early=False)
        else:
            assert after["continuous"]["requests"] - before["continuous"]["requests"] == 8 and after["requests"] == before["requests"]
            assert after["continuous"]["peak_in_progress"] >= 2  # they were generated together
    finally:
        if engine != "continuous":
            server.stop()
        if engine == "onnx":
            reference.stop()


def assert_cancelled_stream_frees_its_place(server, engine: str, max_tokens: int = 120, stops_early: bool = True) -> None:
    """A client that closes its stream after a few tokens frees its place in the ``engine``'s batch, and the
    server answers the next one.  With ``stops_early``, the request also stops well before its max_tokens:
    the server notices a closed stream some tens of steps later, so only an engine slower than that (PyTorch's
    steps) can show it over HTTP without a race."""
    client = server.client()
    steps = lambda: server.health()[engine]["steps"]  # noqa: E731
    start = steps()
    full = client.completions.create(model="tiny-chat", prompt="the model reads", max_tokens=max_tokens, temperature=0)
    full_steps = steps() - start
    assert full.usage.completion_tokens == max_tokens and full_steps >= max_tokens - 20
    start = steps()
    stream = client.completions.create(model="tiny-chat", prompt="the model reads", max_tokens=max_tokens, temperature=0, stream=True)
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while server.health()[engine]["in_progress"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()[engine]["in_progress"] == 0
    if stops_early:
        assert steps() - start < full_steps / 2, (steps() - start, full_steps)
    assert client.completions.create(model="tiny-chat", prompt="after", max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_a_request_cancelled_mid_stream_frees_its_place_at_once(server):
    """Continuous batching (the onnx engine: in the test above).  240 tokens, near the tiny model's 256
    positions: alone the server stops the row ~5 steps after the close, but under load this test process can
    be off the CPU while the server runs on, and 120 steps (~0.2 s) once all ran before it closed."""
    assert_cancelled_stream_frees_its_place(server, "continuous", max_tokens=240)


def test_the_onnx_engine_ends_a_cancelled_request_at_its_next_step(tmp_path):
    """Between a closed stream, which cancels its row (test_serving_units), and the server freeing its place
    (above): the ONNX decoder ends a cancelled row at the step after, while the row beside it runs on to its
    own max_tokens.  In-process, so no race with the network: the row is cancelled from its own text callback."""
    import queue

    from transformers import AutoTokenizer

    from models.batching import Completion, OnnxDecoder
    from models.onnx_genai import Graph, build

    source = tiny_chat_model(tmp_path / "tiny-chat", heads=2)
    build(source, tmp_path / "onnx", "fp32")
    tokenizer = AutoTokenizer.from_pretrained(source)
    prompt = tokenizer("the model reads")["input_ids"]
    generated_when_cancelled: list[int] = []

    def cancel_from_the_second_token(_piece: str) -> None:  # what a closed stream does, from the generating thread
        if len(gone.token_ids) >= 2 and not gone.cancelled.is_set():
            generated_when_cancelled.append(len(gone.token_ids))
            gone.cancelled.set()

    gone = Completion(prompt, max_new_tokens=200, on_text=cancel_from_the_second_token)
    stays = Completion(prompt, max_new_tokens=20)
    decoder = OnnxDecoder(Graph(tmp_path / "onnx"), tokenizer, max_batch_size=4)
    finished: queue.Queue = queue.Queue()
    try:
        decoder.submit(stays, finished.put)
        decoder.submit(gone, finished.put)
        assert [finished.get(timeout=60), finished.get(timeout=60)] == [None, None]
        assert decoder.in_progress() == 0
    finally:
        decoder.close()
    assert gone.finish_reason == "cancelled" and len(gone.token_ids) == generated_when_cancelled[0] < 10
    assert stays.finish_reason == "length" and len(stays.token_ids) == 20
    assert decoder.peak_running == 2  # the cancelled row left a batch it shared


def test_an_onnx_model_is_served_by_the_onnx_engine(tmp_path):
    """The ``onnx_int8`` quantized variant is an ONNX graph with no PyTorch model: whatever ``serve.engine``
    says, its greedy requests go to the onnx engine, its sampled ones to dynamic batches of the same
    graph (with a seed: the same text again)."""
    from models.quantization import quantize

    variant = tmp_path / "onnx_int8"
    quantize(tiny_chat_model(tmp_path / "tiny-chat", heads=2), "onnx_int8", variant)
    server = Server(tmp_path / "serve", variant, "--engine", "continuous")
    try:
        client = server.client()
        chat = client.chat.completions.create(model="onnx_int8", messages=[{"role": "user", "content": "the model"}], max_tokens=6, temperature=0)
        assert chat.choices[0].message.content and chat.usage.completion_tokens <= 6
        sampled = [client.completions.create(model="onnx_int8", prompt="the model reads", max_tokens=8, temperature=0.9, seed=11).choices[0].text
                   for _ in range(2)]
        assert sampled[0] and sampled[0] == sampled[1]
        health = server.health()
        assert health["onnx"]["requests"] == 1 and "continuous" not in health  # the chat; no transformers engine
        assert health["requests"] == 2  # the sampled ones
    finally:
        server.stop()


@pytest.mark.parametrize("path, body, status, says", [
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "does not exist here"),
    ("/v1/completions", {"model": "tiny-chat"}, 400, "prompt: Field required"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be between 1 and 512"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens must be between 1 and 512"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "the " * 300, "max_tokens": 4}, 400, "maximum context length is 256 tokens"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "n": 2}, 400, "only n=1"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/feedback", {"request_id": "chatcmpl-none", "rating": 5}, 404, "no request with id"),
    ("/v1/feedback", {"request_id": "x", "rating": 9}, 400, "rating"),
])
def test_bad_requests_get_a_4xx_with_a_clear_message_and_the_server_stays_up(server, path, body, status, says):
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    assert server.client().completions.create(model="tiny-chat", prompt="still", max_tokens=1).choices[0].text is not None


def test_a_huge_body_is_refused_before_it_is_read_and_holds_up_no_one(server):
    """A 20 MB chat body: 413 at once (its Content-Length is over serve.max_request_bytes), while /health
    and a small completion are answered as usual; a long prompt under the limit is tokenized off the
    event loop and refused with a 400."""
    import threading

    import httpx2

    huge = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "word " * 4_000_000}]})
    refused: dict = {}

    def send() -> None:
        try:
            refused["response"] = httpx2.post(server.url + "/v1/chat/completions", content=huge,
                                              headers={"content-type": "application/json"}, timeout=120)
        except httpx2.HTTPError as exc:  # the server may close the connection after its 413, while the client still sends
            refused["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    started = time.perf_counter()
    assert server.health()["status"] == "ok"
    answer = server.client().completions.create(model="tiny-chat", prompt="still", max_tokens=2)
    answered = time.perf_counter() - started
    sender.join(timeout=120)
    assert answer.choices[0].text is not None and answered < 5, answered
    if "response" in refused:
        assert refused["response"].status_code == 413, refused["response"].text
        error = refused["response"].json()["error"]
        assert "serve.max_request_bytes" in error["message"] and error["code"] == "request_too_large"
    else:
        assert "error" in refused
    long_prompt = server.post("/v1/completions", {"model": "tiny-chat", "prompt": "the " * 200_000, "max_tokens": 4})
    assert long_prompt.status_code == 400 and "maximum context length" in long_prompt.json()["error"]["message"]


def test_one_client_cannot_queue_more_than_its_share(chat_model, tmp_path):
    """serve.max_requests_per_client: 2 requests wait in a 3-second batch window; a third from the same
    address gets a 429 at once, and the two are answered."""
    server = Server(tmp_path, chat_model, "--batch-wait-ms", "3000", serve={"max_requests_per_client": 2})
    try:
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(server.post, "/v1/completions", {"model": "tiny-chat", "prompt": f"wait {i}", "max_tokens": 2})
                       for i in range(2)]
            time.sleep(1.0)
            third = server.post("/v1/completions", {"model": "tiny-chat", "prompt": "one more", "max_tokens": 2})
            assert third.status_code == 429, third.text
            error = third.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and "serve.max_requests_per_client" in error["message"]
            assert [f.result().status_code for f in waiting] == [200, 200]
        assert server.post("/v1/completions", {"model": "tiny-chat", "prompt": "after", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


def test_every_answer_and_feedback_is_on_disk_before_the_reply_and_survives_a_killed_server(chat_model, tmp_path):
    server = Server(tmp_path, chat_model)
    try:
        answer = server.client().chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "the model"}],
                                                         max_tokens=4, temperature=0)
        stored = server.post("/v1/feedback", {"request_id": answer.id, "rating": 2, "correction": "a better answer", "comment": "terse"})
        assert stored.status_code == 200 and stored.json()["stored"]
    finally:
        os.killpg(server.proc.pid, signal.SIGKILL)  # no shutdown: what was acknowledged must already be on disk
        server.proc.wait()
    with sqlite3.connect(server.store) as db:
        request = db.execute("SELECT endpoint, model, prompt, completion, completion_tokens FROM requests WHERE id = ?", (answer.id,)).fetchone()
        feedback = db.execute("SELECT request_id, rating, correction, comment FROM feedback").fetchall()
    assert request == ("chat.completions", "tiny-chat", json.dumps([{"role": "user", "content": "the model"}]),
                       answer.choices[0].message.content, 4)
    assert feedback == [(answer.id, 2, "a better answer", "terse")]


def test_an_api_key_is_required_when_set_and_whenever_the_server_leaves_the_loopback(chat_model, tmp_path):
    refused = subprocess.run([str(REPO / ".venv/bin/lmforge"), "serve", "--model", str(chat_model), "--host", "0.0.0.0"],
                             capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}, timeout=120)
    assert refused.returncode == 1 and "give an API key" in refused.stderr
    server = Server(tmp_path, chat_model, "--api-key", "s3cret")
    try:
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            server.client("wrong").models.list()
        assert server.post("/v1/completions", {"model": "tiny-chat", "prompt": "x"}).status_code == 401
        assert [m.id for m in server.client("s3cret").models.list()] == ["tiny-chat"]
        assert server.health()["status"] == "ok"  # health checks need no key
    finally:
        server.stop()


@pytest.mark.slow
def test_the_demo_champion_answers_the_openai_client(smollm2_dir: Path, tmp_path: Path):
    """SmolLM2-135M-Instruct (the demo's champion) through its own chat template: a real answer, plain and streamed."""
    server = Server(tmp_path, smollm2_dir, "--served-name", "lmforge@champion")
    try:
        client = server.client()
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model="lmforge@champion", messages=question, max_tokens=12, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="lmforge@champion", messages=question, max_tokens=12, temperature=0, stream=True))
        assert streamed == answer.choices[0].message.content
    finally:
        server.stop()
