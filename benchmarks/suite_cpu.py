"""Where the test suite's CPU goes: a command (the whole suite by default) run while every process's CPU time
is sampled, then summed by kind of process (pytest's workers, `lmforge run`, Ray's actors, servers...).

Why: on two cores the suite keeps both ~90% busy, so its time is bounded by the CPU it spends, and most of
that is spent in processes the tests start, which pytest's ``--durations`` cannot see (they run beside other
tests, twice as slow when the other worker is busy).  This found the MLflow job runner's eight processes,
started with every MLflow server and used by no test (~80 s of CPU a run).

Linux only (it reads ``/proc``).  It counts the CPU every process on the machine spends while the command runs:
run it on an otherwise idle machine.  A process is sampled every ``--every`` seconds, so one that lives less
than that is missed, and one's CPU is counted at its last sample.

    .venv/bin/python benchmarks/suite_cpu.py [--every 0.5] [--json cpu.json] [-- COMMAND ...]   # default: python -m pytest
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: (kind, pattern of the command line): the first that matches names a process's kind.
KINDS = [
    ("pytest and its workers (the tests themselves)", r"exec\(eval\(sys\.stdin|-m pytest"),
    ("lmforge and python -c commands, forked by tests/preloaded.py", r"tests/preloaded\.py"),
    ("Ray actors and tasks", r"ray/_private/workers/"),
    ("Ray daemons", r"raylet|gcs_server|dashboard|log_monitor|monitor\.py|runtime_env|ray/autoscaler"),
    ("lmforge run", r"lmforge run"),
    ("lmforge serve", r"lmforge serve"),
    ("lmforge, other commands", r"bin/lmforge|dagster_project\.cli"),
    ("Python a test drives (sensor ticks, python -c)", r"python3? -c"),
    ("ONNX model builder", r"onnxruntime_genai\.models\.builder"),
    ("GGUF converter", r"gguf_convert|convert_hf_to_gguf"),
    ("torchrun and its processes", r"torchrun|torch\.distributed|models\.training"),
    ("DVC", r"dvc"),
    ("Dagster UI, daemon, code servers", r"dagster"),
    ("MLflow servers", r"mlflow|gunicorn|uvicorn|huey"),
    ("Chromium", r"chrom"),
]


def kind(command: str) -> str:
    return next((name for name, pattern in KINDS if re.search(pattern, command)), "other")


def sweep(seen: dict[str, dict]) -> None:
    """Each live process's CPU seconds (user + system) and command line, keyed by pid and start time."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()  # after the command name, which may hold spaces
            key = f"{pid}-{fields[19]}"
            cpu = (int(fields[11]) + int(fields[12])) / tick
            if key not in seen or not seen[key]["command"]:  # a process's command line is empty while it starts
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                seen[key] = {"pid": int(pid), "command": command[:300]}
            seen[key]["cpu"] = cpu
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            pass


def sample(seen: dict[str, dict], stop: threading.Event, every: float) -> None:
    while not stop.is_set():
        sweep(seen)
        stop.wait(every)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="also write every process sampled (pid, command, CPU seconds) here")
    parser.add_argument("command", nargs="*", default=[sys.executable, "-m", "pytest"])
    args = parser.parse_args()

    seen: dict[str, dict] = {}
    sweep(seen)
    before = {key: p["cpu"] for key, p in seen.items()}  # what the processes already running had spent
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(seen, stop, args.every), daemon=True)
    sampler.start()
    started = time.monotonic()
    code = subprocess.call(args.command, cwd=REPO)
    wall = time.monotonic() - started
    stop.set()
    sampler.join()

    own = os.getpid()
    processes = [{**p, "cpu": p["cpu"] - before.get(key, 0.0)} for key, p in seen.items() if p["pid"] != own]
    totals, counts = collections.Counter(), collections.Counter()
    for p in processes:
        name = kind(p["command"])
        totals[name] += p["cpu"]
        counts[name] += 1
    cpu = sum(totals.values())
    print(f"\n{' '.join(args.command)}: exit code {code}, {wall:.0f} s wall, {cpu:.0f} s of CPU "
          f"({cpu / wall:.2f} cores busy on average, of {os.cpu_count()})")
    for name, seconds in totals.most_common():
        print(f"{seconds:8.1f} s  {100 * seconds / cpu:5.1f}%  {counts[name]:5d} processes  {name}")
    if args.json:
        args.json.write_text(json.dumps(sorted(processes, key=lambda p: -p["cpu"]), indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
