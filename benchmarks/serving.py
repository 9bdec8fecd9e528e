"""Serving side by side, in one run: ``lmforge serve`` (``lmforge-dynamic``: its default dynamic batches;
``lmforge``: ``--engine continuous``; ``lmforge-onnx``: ``--engine onnx``, continuous batching over the
model's int8 ONNX twin in ONNX Runtime), ``transformers serve --continuous-batching`` and llama.cpp on the same model,
the same prompts, greedy, one engine after the other.

The model is the champion's Hugging Face directory (``--model-dir``; default: the one ``select`` chose);
llama.cpp serves the GGUF it came from (``--gguf``; the demo's SmolLM2-135M-Instruct.Q4_1: the HF
directory is its dequantized copy, so llama.cpp computes with the 4-bit weights, the others with
fp32).  Every engine gets the same ``/v1/completions`` requests (``--max-tokens`` new tokens, greedy,
streamed) through the official ``openai`` client, each client sending one request after another.
Generated tokens are counted with the model's own tokenizer on the text each engine returned.

Printed per engine and client count: requests/s, generated tokens/s (all clients together), time to
first token p50, latency p50/p95, and the single stream's decode rate (tokens after the first ÷ the
time after the first); per engine the server's peak resident memory.  Then the ratios the serving
issue asks for, for each lmforge engine: its single-stream decode ÷ llama.cpp's (goal ≥ 1.0) and its
tokens/s ÷ ``transformers serve``'s at 8 and 32 clients (goal ≥ 1.0); and, as before, its tokens/s ÷
the same model generating the prompts one after the other in process (batch 1, no HTTP).

    .venv/bin/python benchmarks/serving.py [--engines lmforge-dynamic lmforge lmforge-onnx transformers llama.cpp] [--clients 1 8 32] [--max-tokens 64]

llama.cpp: ``llama-cpp-python`` has no wheel on the package index; asking for the ``llama.cpp`` engine
builds it once from its sdist (gcc and cmake, ~12 minutes on 2 cores, offline) into
``benchmarks/.llama-cpp-venv`` (ignored by git).  ``make demo`` never does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_VENV = REPO / "benchmarks" / ".llama-cpp-venv"

#: Prompts of several lengths (a batch is padded to its longest prompt).
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


#: ``lmforge serve --engine`` of each lmforge engine name here.
ENGINES = {"lmforge-dynamic": "dynamic", "lmforge": "continuous", "lmforge-onnx": "onnx"}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def llama_cpp_python() -> Path:
    """The Python of a venv with ``llama-cpp-python[server]``, built from its sdist on first use."""
    python = LLAMA_CPP_VENV / "bin" / "python"
    if not python.exists():
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} from its sdist into {LLAMA_CPP_VENV} (~12 minutes on 2 cores) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LLAMA_CPP_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"], check=True,
                       env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
    return python


def server_command(engine: str, model_dir: Path, gguf: Path, port: int, max_clients: int) -> list[str]:
    if engine.startswith("lmforge"):  # lmforge: continuous batching for greedy requests; lmforge-dynamic: dynamic batches (the default)
        return [str(REPO / ".venv/bin/lmforge"), "serve", "--model", str(model_dir), "--port", str(port), "--served-name", "bench",
                "--max-batch-size", str(max_clients), "--engine", ENGINES[engine]]
    if engine == "transformers":
        return [str(REPO / ".venv/bin/transformers"), "serve", str(model_dir), "--continuous-batching", "--device", "cpu",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if engine == "llama.cpp":
        return [str(llama_cpp_python()), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                "--n_threads", str(os.cpu_count() or 2), "--n_ctx", "2048",
                "--interrupt_requests", "False"]  # its default lets a new request cut off the one being generated
    raise ValueError(engine)


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit(f"the server did not start: {' '.join(map(str, proc.args))}")
            time.sleep(1)


def load_clients(url: str, model: str, clients: int, requests_each: int, max_tokens: int, count_tokens) -> dict:
    """Each of ``clients`` threads streams ``requests_each`` completions one after another."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)

    def one(prompt: str) -> dict:
        started = time.perf_counter()
        first = None
        text = ""
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True):
            piece = chunk.choices[0].text if chunk.choices else ""
            if piece and first is None:
                first = time.perf_counter()
            text += piece or ""
        ended = time.perf_counter()
        tokens = count_tokens(text)
        return {"latency": ended - started, "ttft": (first or ended) - started, "tokens": tokens,
                "decode": (tokens - 1) / (ended - first) if first and tokens > 1 and ended > first else float("nan")}

    def work(c: int) -> list[dict]:
        return [one(PROMPTS[(c + r) % len(PROMPTS)]) for r in range(requests_each)]

    one(PROMPTS[0])  # warm-up: the first request pays for lazy allocations on every engine
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for rows in pool.map(work, range(clients)) for row in rows]
    seconds = time.perf_counter() - started
    return {"clients": clients, "requests": len(rows), "seconds": seconds, "tokens": sum(r["tokens"] for r in rows),
            "ttft_p50": statistics.median(r["ttft"] for r in rows), "p50": statistics.median(r["latency"] for r in rows),
            "p95": percentile([r["latency"] for r in rows], 0.95), "decode": statistics.median(r["decode"] for r in rows)}


def one_by_one(model_dir: Path, prompts: list[str], max_tokens: int, count_tokens) -> float:
    """Tokens/s of the prompts generated one after the other in process (batch 1, KV cache, no HTTP)."""
    from lmforge.params import SamplingParams
    from models.generation import generate, load

    model, tokenizer, _ = load(model_dir)
    greedy = dataclasses.replace(SamplingParams(), temperature=0.0, max_new_tokens=max_tokens)
    generate(model, tokenizer, prompts[:1], greedy, batch_size=1)  # warm-up, as a server does at start
    started = time.perf_counter()
    texts = generate(model, tokenizer, prompts, greedy, batch_size=1)
    return sum(count_tokens(t) for t in texts) / (time.perf_counter() - started)


def champion_dir() -> Path:
    from lmforge.artifacts import read_summary
    from lmforge.params import load_params

    params = load_params()
    return params.path(read_summary(params.stage_dir("select"))["champion_dir"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="a causal model's Hugging Face directory (default: the champion)")
    parser.add_argument("--gguf", type=Path, default=REPO / "pretrained" / "SmolLM2-135M-Instruct.Q4_1.gguf", help="what llama.cpp serves")
    parser.add_argument("--engines", nargs="+", default=["lmforge-dynamic", "lmforge", "lmforge-onnx", "transformers", "llama.cpp"],
                        choices=[*ENGINES, "transformers", "llama.cpp"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--total-requests", type=int, default=32, help="requests per client count (a single client sends 6)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    model_dir = args.model_dir or champion_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    print(f"model {model_dir} (llama.cpp: {args.gguf.name}); {torch.get_num_threads()} threads; {args.max_tokens} new tokens per "
          "request, greedy, streamed; engines one after the other", flush=True)
    alone = one_by_one(model_dir, PROMPTS[:6], args.max_tokens, count_tokens)
    print(f"one-by-one in process (batch 1, no HTTP): {alone:.1f} tokens/s\n", flush=True)

    results: dict[str, dict[int, dict]] = {}
    memory: dict[str, float] = {}
    print("| engine | clients | requests/s | tokens/s | time to first token p50 (s) | latency p50 (s) | p95 (s) | decode tokens/s (p50 of streams) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for engine in args.engines:
        cmd = server_command(engine, model_dir, args.gguf, args.port, max(args.clients))
        proc = subprocess.Popen(cmd, env={**os.environ, "LMFORGE_SERVE_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_until_up(url, proc)
            name = "bench" if engine.startswith("lmforge") else str(model_dir) if engine == "transformers" else str(args.gguf)
            results[engine] = {}
            for clients in args.clients:
                each = 6 if clients == 1 else max(1, args.total_requests // clients)
                row = load_clients(url, name, clients, each, args.max_tokens, count_tokens)
                results[engine][clients] = row
                print(f"| {engine} | {clients} | {row['requests'] / row['seconds']:.2f} | {row['tokens'] / row['seconds']:.1f} | "
                      f"{row['ttft_p50']:.2f} | {row['p50']:.2f} | {row['p95']:.2f} | {row['decode']:.1f} |", flush=True)
            memory[engine] = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("\npeak resident memory: " + ", ".join(f"{e} {m:,.0f} MiB" for e, m in memory.items()))

    def rate(engine: str, clients: int) -> float | None:
        row = results.get(engine, {}).get(clients)
        return row["tokens"] / row["seconds"] if row else None

    for ours in [e for e in results if e.startswith("lmforge")]:
        if 1 in results[ours] and 1 in results.get("llama.cpp", {}):
            print(f"single-stream decode, {ours} ÷ llama.cpp: {results[ours][1]['decode'] / results['llama.cpp'][1]['decode']:.2f}× (goal ≥ 1.0)")
        for clients in (8, 32):
            if rate(ours, clients) and rate("transformers", clients):
                print(f"tokens/s at {clients} clients, {ours} ÷ transformers serve --continuous-batching: "
                      f"{rate(ours, clients) / rate('transformers', clients):.2f}× (goal ≥ 1.0)")
        for clients in args.clients:
            if rate(ours, clients):
                print(f"tokens/s at {clients} client(s), {ours} ÷ one-by-one in process: {rate(ours, clients) / alone:.2f}×")
    print(json.dumps({"one_by_one": alone, "results": results, "peak_rss_mib": memory}))


if __name__ == "__main__":
    main()
