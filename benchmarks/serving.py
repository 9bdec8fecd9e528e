"""Serving throughput: ``lmforge serve`` under 1, 8 and 32 concurrent clients vs one-by-one generation,
side by side in one run.

One-by-one is the same model generating the same prompts one after the other in this process
(``models.generation.generate`` at batch 1, KV cache on, no HTTP): what a server without batching
could do at best.  Then ``lmforge serve`` is started on the same model and each client count sends the
same kind of requests (``/v1/completions``, greedy, ``--max-tokens`` each) through the official
``openai`` client, every client one request after another.  Printed per row: requests/s, generated
tokens/s, p50/p95 latency, the server's mean batch size, and the ratio of tokens/s to one-by-one
(goal: ≥ 3× at 8 clients on 2 CPU cores for the demo champion) and to the server's first row (1 client).

    .venv/bin/python benchmarks/serving.py [--model models:/lmforge@champion] [--clients 1 8 32] [--max-tokens 16]

Needs the demo's registry (``make demo``) or ``--model DIR`` (any causal model directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Prompts of several lengths (the server pads a batch to its longest prompt).
PROMPTS = [
    "The Python package manager installs",
    "To read a JSON file in Python, you",
    "A language model is trained by",
    "The test suite of a library checks that",
    "When a web server receives a request, it",
    "Unicode normalisation matters because",
    "The difference between a list and a tuple is",
    "A virtual environment keeps the dependencies of",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def one_by_one(ref: str, tracking_uri: str, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) for the prompts generated one after the other, in process."""
    from lmforge.params import SamplingParams
    from models.generation import generate, load

    model, tokenizer, _ = load(ref, tracking_uri=tracking_uri)
    greedy = dataclasses.replace(SamplingParams(), temperature=0.0, max_new_tokens=max_tokens)
    generate(model, tokenizer, prompts[:1], greedy, batch_size=1)  # warm-up, as the server does at start
    started = time.perf_counter()
    texts = generate(model, tokenizer, prompts, greedy, batch_size=1)
    seconds = time.perf_counter() - started
    return seconds, sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def against_server(url: str, name: str, clients: int, requests_each: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    health = lambda: __import__("json").loads(urllib.request.urlopen(f"{url}/health").read())  # noqa: E731
    before = health()

    def work(c: int) -> list[tuple[float, int]]:
        out = []
        for r in range(requests_each):
            started = time.perf_counter()
            answer = client.completions.create(model=name, prompt=PROMPTS[(c + r) % len(PROMPTS)], max_tokens=max_tokens, temperature=0)
            out.append((time.perf_counter() - started, answer.usage.completion_tokens))
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for items in pool.map(work, range(clients)) for item in items]
    seconds = time.perf_counter() - started
    after = health()
    latencies = [s for s, _ in results]
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": len(results), "seconds": seconds, "tokens": sum(n for _, n in results),
            "p50": statistics.median(latencies), "p95": percentile(latencies, 0.95),
            "mean_batch": (after["requests"] - before["requests"]) / batches if batches else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models:/lmforge@champion", help="model directory or MLflow URI")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=0, help="requests per client (0: enough for 32 requests in all, at least 1)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="the server's batch window (default: params.yaml serve.batch_wait_ms)")
    args = parser.parse_args()

    from lmforge.params import load_params
    from lmforge.tracking import tracking_uri

    params = load_params()
    uri = tracking_uri(params)
    import torch

    wait = params.serve.batch_wait_ms if args.batch_wait_ms is None else args.batch_wait_ms
    print(f"model {args.model}; {torch.get_num_threads()} torch threads; {args.max_tokens} new tokens per request, greedy; "
          f"batch window {wait:g} ms")
    n_alone = max(8, 32 // max(args.clients))
    seconds, tokens = one_by_one(args.model, uri, (PROMPTS * 8)[:n_alone], args.max_tokens)
    alone = tokens / seconds
    print(f"one-by-one (in process, batch 1): {n_alone} requests, {tokens} tokens in {seconds:.1f} s: "
          f"{n_alone / seconds:.2f} requests/s, {alone:.1f} tokens/s")

    env = {**os.environ, "LMFORGE_SERVE_LOG_LEVEL": "warning"}
    server = subprocess.Popen([str(REPO / ".venv/bin/lmforge"), "serve", "--model", args.model, "--port", str(args.port),
                               "--served-name", "bench", "--max-batch-size", str(max(args.clients)),
                               *(["--batch-wait-ms", str(args.batch_wait_ms)] if args.batch_wait_ms is not None else [])],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("the server did not start")
                time.sleep(1)
        print(f"\n| clients | requests | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | mean batch | × one-by-one | × 1 client |")
        print("|---|---|---|---|---|---|---|---|---|")
        first = None
        for clients in args.clients:
            each = args.requests or max(1, 32 // clients)
            row = against_server(url, "bench", clients, each, args.max_tokens)
            rate = row["tokens"] / row["seconds"]
            first = first or rate
            print(f"| {clients} | {row['requests']} | {row['requests'] / row['seconds']:.2f} | {rate:.1f} | {row['p50']:.2f} | "
                  f"{row['p95']:.2f} | {row['mean_batch']:.1f} | {rate / alone:.2f} | {rate / first:.2f} |", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
