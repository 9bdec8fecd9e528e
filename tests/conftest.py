"""Shared fixtures (tiny corpora and params files in a temporary directory; no network) and how the session is
shared out over pytest-xdist's workers."""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from preloaded import READ_WHEN_USED, dash_c, exit_without_teardown, same_imports, send_request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
#: ONNX models `lmforge serve --engine onnx` builds go to a cache of the test session's own (subprocesses inherit it).
os.environ["LMFORGE_CACHE"] = tempfile.mkdtemp(prefix="lmforge-cache-")
atexit.register(shutil.rmtree, os.environ["LMFORGE_CACHE"], ignore_errors=True)

#: Ray turns a loopback address into the machine's network address before it connects, except where
#: its multi-node support is off, as on macOS; off, every Ray node, driver and worker the tests start
#: stays on 127.0.0.1 (subprocesses inherit it).  Ray reads it once, on import: hence here.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
#: No Ray usage reports, as lmforge.cluster does: their background thread in this process logged
#: tracebacks whose formatting (ast.parse, on Python 3.11.7) raced a test's own ast.parse into a SystemError.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
#: Ray Train's watcher of nodes about to be preempted (spot instances) is one more actor process per launch
#: (~4 s of CPU each): the tests' nodes are never preempted.
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
#: The MLflow servers the tests start (`mlflow server`, `mlflow ui`) run no job runner: lmforge submits no MLflow
#: jobs (GenAI evaluation, trace roll-ups), and its eight processes cost ~40 s of CPU at each start (`make ui` too).
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
#: pytest-xdist's workers share the cores: the processes a test starts (lmforge run, a server, torchrun) take their
#: worker's share of them for torch's threads, not every core each (inherited by subprocesses; Ray sets its own).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
REPO = Path(__file__).resolve().parents[1]

# Real English words, so that generated documents pass the quality filters like prose does.
WORDS = (
    "the model reads documents from many sources and turns them into plain text before cleaning "
    "every stage writes its outputs beside a summary that counts what came in and what went out "
    "language data needs careful validation because small mistakes spread into training runs "
    "engineers want lineage from each weight back to the exact file that taught it something "
    "python packages describe themselves with long descriptions written by their maintainers"
).split()


def prose(seed: int, n_words: int = 60) -> str:
    """A deterministic, distinct paragraph of real words (distinct seeds → not near duplicates)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def stop_process_group(proc) -> None:
    """Stop a server started with ``start_new_session=True`` and every process it spawned."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --------------------------------------------------------------------------------------------------
# The commands tests run: forked from a preloaded interpreter where that is the same as a fresh process
# --------------------------------------------------------------------------------------------------

class Forked:
    """A command tests/preloaded.py forked: what the tests use of ``subprocess.Popen`` (``pid``, ``poll``,
    ``wait``, ``returncode``), its exit code read from the watcher's socket."""

    def __init__(self, args: list[str], conn: socket.socket):
        self.args, self.returncode, self._conn, self._buffer = args, None, conn, b""
        self.pid = int(self._line(timeout=60))

    def _line(self, timeout: float | None) -> str:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self._conn.recv(64)
            if not chunk:
                raise ConnectionError(f"the preloaded interpreter's watcher of {self.args[:3]} went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int(self._line(timeout=0))
            except (BlockingIOError, TimeoutError):
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = int(self._line(timeout))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._conn.close()
        return self.returncode


class Preloaded:
    """The session's tests/preloaded.py, started when a test first runs a command it can fork: one for both
    pytest-xdist workers (~12 s of CPU to start), in the folder ``$LMFORGE_TEST_PRELOADED`` that the process handing
    out the tests made (``pytest_configure``), which stops it at the end; without xdist, one of this process's own."""

    def __init__(self):
        self.folder: str | None = None

    def environment(self) -> dict[str, str]:
        """What the preloaded interpreter imported its libraries with: this process's, without the variables a
        test or a project sets (as ``Project.env`` leaves them out)."""
        return {k: v for k, v in os.environ.items() if not k.startswith(READ_WHEN_USED)}

    def can_fork(self, cmd: list[str], env: dict[str, str]) -> bool:
        """``lmforge ...`` or ``python [-P] -c ...`` of this checkout's venv, in an environment that imports the
        libraries as the preloaded interpreter did (``preloaded.same_imports``)."""
        python = cmd[0] in (str(REPO / ".venv/bin/python"), sys.executable)
        if cmd[0] != str(REPO / ".venv/bin/lmforge") and not (python and dash_c(cmd) is not None):
            return False
        return same_imports(env, self.environment())

    def start(self) -> None:
        """The preloaded interpreter, if it is not running (the first worker to need it starts it, the other finds
        it); and ``bin/lmforge`` beside its socket, which runs ``lmforge`` through it (``preloaded.client``) for a
        process that is not a test's (``shim``)."""
        import filelock

        if self.folder is not None and running_preloaded(self.folder):
            return
        shared = os.environ.get("LMFORGE_TEST_PRELOADED")
        self.folder = shared or tempfile.mkdtemp(prefix="lmforge-preloaded-")
        self.socket = os.path.join(self.folder, "socket")
        with filelock.FileLock(os.path.join(self.folder, "lock")):
            if running_preloaded(self.folder):
                return
            if os.path.exists(self.socket):  # of one that died
                os.remove(self.socket)
            environment = self.environment()
            proc = subprocess.Popen([str(REPO / ".venv/bin/python"), str(REPO / "tests/preloaded.py"), self.socket],
                                    env=environment, stdout=subprocess.PIPE, stderr=open(os.path.join(self.folder, "log"), "w"),
                                    start_new_session=True, text=True)
            if not shared:
                atexit.register(stop_preloaded, self.folder)
            assert proc.stdout.readline() == "ready\n", f"tests/preloaded.py did not start: {Path(self.folder, 'log').read_text()[-3000:]}"
            base = Path(self.folder, "environment.json")
            base.write_text(json.dumps(environment))  # what the client compares a command's environment with
            shim = Path(self.folder, "bin", "lmforge")
            shim.parent.mkdir(exist_ok=True)
            # -S: no site-packages to scan (~20 ms); the client needs the standard library only
            shim.write_text(f'#!/bin/sh\nexec "{REPO / ".venv/bin/python"}" -S "{REPO / "tests/preloaded.py"}" --client "{self.socket}" '
                            f'"{base}" "{REPO / ".venv/bin/lmforge"}" "$@"\n')
            shim.chmod(0o755)
            Path(self.folder, "pid").write_text(str(proc.pid))  # last: the other worker waits for it under the lock

    def shim(self) -> str:
        """A folder whose ``lmforge`` runs through the preloaded interpreter: first on ``$PATH``, the ``lmforge``
        commands that another program runs (``dvc repro``: its stages) fork from it as a test's own do."""
        self.start()
        return os.path.join(self.folder, "bin")

    def spawn(self, cmd: list[str], cwd: Path, env: dict[str, str], stdout, stderr) -> Forked:
        self.start()
        with open(os.devnull) as stdin:
            return Forked(cmd, send_request(self.socket, cmd, str(cwd), env, [stdin.fileno(), stdout.fileno(), stderr.fileno()]))


def running_preloaded(folder: str) -> int | None:
    """The pid of the preloaded interpreter recorded in ``folder``, if that process still runs it (not a
    zombie, and not another process that got its pid since)."""
    try:
        pid = int(Path(folder, "pid").read_text())
        stat, cmdline = Path(f"/proc/{pid}/stat").read_text(), Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    return pid if stat.rsplit(")", 1)[1].split()[0] != "Z" and b"tests/preloaded.py" in cmdline else None


def stop_preloaded(folder: str) -> None:
    """Stop the preloaded interpreter of ``folder`` (and its watchers: its process group), then remove the folder."""
    pid = running_preloaded(folder)
    if pid:
        os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


PRELOADED = Preloaded()


def start_command(cmd: list[str], cwd: Path, env: dict[str, str], stdout, stderr=subprocess.STDOUT):
    """A command in a session of its own (``stop_process_group`` stops it and what it started), its output to
    the files ``stdout`` and ``stderr`` (``STDOUT``: with the output): forked by the preloaded interpreter where
    that is the same as a fresh process, else a fresh process."""
    if PRELOADED.can_fork(cmd, env):
        return PRELOADED.spawn(cmd, cwd, env, stdout, stdout if stderr == subprocess.STDOUT else stderr)
    if Path(cmd[0]).name == "dvc":  # the `lmforge` of its stages' commands (dvc.yaml) forks too
        env = {**env, "PATH": f"{PRELOADED.shim()}{os.pathsep}{env['PATH']}"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)


def run_command(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)``, through ``start_command``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = start_command(cmd, cwd, env, out, err)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (servers in tests bind there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: int = 120) -> None:
    """Until ``url`` answers (a server started by a test is up), at most ``seconds``.  Asked five times a
    second: a refused connection costs nothing, and a test waits ~0.1 s past the server's start, not ~0.5 s."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def write_params(tmp_path: Path, raw: Path | None = None, **sections) -> Path:
    """A params file pointing at ``raw`` with artifacts under ``tmp_path``; ``sections`` override."""
    data = {
        "paths": {"raw": str(raw or tmp_path / "raw"), "artifacts": str(tmp_path / "artifacts"), "finetune": str(tmp_path / "finetune")},
        "clean": {"validation": {"min_rows": 3}, "num_proc": 1},
        "ingest": {"num_proc": 1},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small directory of text documents in several formats."""
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    for i in range(12):
        (raw / f"doc{i:02d}.txt").write_text(prose(i) + "\n\n" + prose(100 + i) + "\n")
    (raw / "guide.md").write_text(f"# Guide\n\nSome *emphasis* and a [link](https://example.org).\n\n{prose(50)}\n")
    (raw / "notes.rst").write_text(f"Notes\n=====\n\n**Bold** text. {prose(51)}\n\n.. automodule:: missing\n")
    (raw / "sub" / "page.html").write_text(
        f"<html><head><title>Page</title><script>var x = 1;</script></head><body><p>{prose(52)}</p></body></html>"
    )
    return raw


@pytest.fixture
def params_file(tmp_path: Path, corpus: Path, monkeypatch) -> Path:
    path = write_params(tmp_path, corpus)
    monkeypatch.setenv("LMFORGE_PARAMS", str(path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return path


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models in one thread: on two cores shared with other work, torch's threads spend most of
    their time waiting for each other (a tiny step took 1-1.8 s under load, 15-20 ms in one thread).
    Subprocesses the tests start (lmforge run, torchrun) keep torch's default."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def no_stray_mlflow_store():
    """MLflow's default store (``./mlflow.db``, ``./mlruns`` in the working directory) must never appear:
    every MLflow client lmforge makes names the configured tracking and registry URI."""
    stray = [Path.cwd() / "mlflow.db", Path.cwd() / "mlruns", REPO / "mlflow.db", REPO / "mlruns"]
    before = {p for p in stray if p.exists()}
    yield
    appeared = sorted(str(p) for p in stray if p.exists() and p not in before)
    assert not appeared, f"an MLflow store appeared outside the configured URI: {', '.join(appeared)}"


#: The process's environment mapping as the session started: 🤗 datasets' ``map(num_proc=...)`` rebinds
#: ``os.environ`` to a copy, after which a ``MonkeyPatch`` made earlier undoes its changes on the old one.
ENVIRON = os.environ


def put_back_environment(before: dict[str, str]) -> None:
    """The environment as ``before``, in the session's own mapping, and MLflow's process-wide store with it."""
    os.environ = ENVIRON
    for name in set(os.environ) - set(before):
        del os.environ[name]
    os.environ.update(before)
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before.get("MLFLOW_TRACKING_URI"))
        mlflow.set_registry_uri(before.get("MLFLOW_REGISTRY_URI"))


@pytest.fixture(autouse=True, scope="module")
def environment_put_back_after_the_module():
    """What ``environment_put_back`` does for a test, for a module's fixtures (set up after this one, torn
    down before it)."""
    before = dict(os.environ)
    yield
    put_back_environment(before)


@pytest.fixture(autouse=True)
def environment_put_back():
    """Each test leaves the process as it found it: its environment variables, and MLflow's process-wide
    store, which resolving a ``models:/`` URI points at a project's (``models.generation.use_mlflow_store``;
    MLflow also writes it to ``$MLFLOW_TRACKING_URI``, which ``lmforge.tracking.tracking_uri`` prefers to
    params.yaml's).  A pytest-xdist worker runs tests in another order than one process does, and a leftover
    ``$LMFORGE_PARAMS`` or store made a later test read another test's params or registry.  Session and module
    fixtures set up before this snapshot, so what they set stays."""
    before = dict(os.environ)
    yield
    put_back_environment(before)


# --------------------------------------------------------------------------------------------------
# One tiny pipeline per test session: the CLI, DVC and browser tests assert on it (and on small,
# targeted re-runs) instead of each building the whole graph again.
# --------------------------------------------------------------------------------------------------

#: What the tiny project changes in params.yaml: two tiny candidates, tiny tokenizer, seconds per stage;
#: fp32 training everywhere, so that a test sees the same numbers on every machine (``auto`` picks bf16
#: where the CPU has it).
TINY_PARAMS = {
    "clean": {"validation": {"min_rows": 3}},
    "split": {"train": 0.6, "val": 0.2, "test": 0.2},
    "tokenizer": {"vocab_size": 400, "block_size": 64},
    "pretrain": {
        "train": {"max_steps": 60, "batch_size": 4, "lr": 0.01, "val_every": 30, "checkpoint_every": 30, "warmup_steps": 5, "val_batches": 2},
        "candidates": [{"name": "a", "preset": "tiny", "overrides": {}}, {"name": "b", "preset": "tiny", "overrides": {"position": "alibi"}}],
    },
    "evaluate": {"speed_new_tokens": 4, "prompts": ["The model"], "sampling": {"max_new_tokens": 8}, "bias": {"max_pairs": 18}},
    "finetune": {"min_examples": 20, "classification": {"labels": ["first", "second"]},
                 "train": {"epochs": 1, "max_length": 64, "precision": "32"}, "sft": {"max_prompt_tokens": 40, "max_new_tokens": 8}},
    "distil": {"steps": 10, "batch_size": 4, "warmup_steps": 2, "teacher_precision": "32"},
    "quantize": {"variants": ["onnx_int8", "bf16"]},  # bf16 for a champion ONNX Runtime's builder cannot take (the ALiBi one)
    "benchmarks": {"tasks": ["boolq", "winogrande"], "max_items": 6, "batch_size": 8,
                   "xstest": {"max_prompts": 4, "max_new_tokens": 6}},
    "batch_inference": {"batch_size": 4, "sampling": {"max_new_tokens": 8}},
    "rag": {"chunk_words": 40, "overlap_words": 10, "queries": 20, "continuations": 6, "continuation_words": 10, "eval_examples": 8,
            "sweep": {"temperature": [0.0, 0.9], "top_k": [0], "top_p": [1.0], "examples": 6, "max_new_tokens": 6}},
    "hpsearch": {"candidate": "a", "max_steps": None, "trials": 3, "startup_trials": 1},  # trials of the candidate's own 60 steps
}

#: The tiny benchmark settings for a params file outside the checkout: the pinned files read from it.
TINY_BENCHMARKS = {**TINY_PARAMS["benchmarks"], "dir": str(REPO / "evalsets" / "standard")}


class Project:
    """A copy of this project (code, dvc.yaml, params.yaml) with a tiny corpus, its own Dagster instance and
    MLflow store, in git and DVC: what a user's checkout looks like after `lmforge run`."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / "project"
        self.home = root / "dagster_home"
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home), "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
        for name in ("LMFORGE_PARAMS", "LMFORGE_TIER", "LMFORGE_ROOT", "MLFLOW_TRACKING_URI"):
            self.env.pop(name, None)

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.path / 'mlflow' / 'mlflow.db'}"

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def summary(self, stage: str) -> dict:
        from lmforge.artifacts import read_summary

        return read_summary(self.artifacts / stage)

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, timeout: int = 900):
        """A command in the project directory, as a user types it (`lmforge ...`, `dvc ...`)."""
        proc = run_command(list(cmd), self.path, {**self.env, **(env or {})}, timeout)
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def lmforge(self, *args: str, **kw):
        return self.run(str(REPO / ".venv/bin/lmforge"), *args, **kw)


#: Prompts of the tiny project's batch_inference (its params.yaml's batch_inference.file).
TINY_PROMPTS = 6


def write_prompts(path: Path, n: int = TINY_PROMPTS) -> Path:
    """``n`` prompts of a few real words as JSONL, each with an id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": prose(300 + i, 6)[:-1]}) + "\n" for i in range(n)))
    return path


def make_project(root: Path, sections: dict | None = None) -> Project:
    """A tiny project under ``root``: this checkout's code and params.yaml with ``TINY_PARAMS``, 20 raw documents, task sets."""
    import shutil

    from lmforge.params import deep_merge

    project = Project(root)
    project.path.mkdir(parents=True)
    project.home.mkdir()
    shutil.copy(REPO / ".dagster" / "dagster.yaml", project.home / "dagster.yaml")  # the project's instance settings
    for name in ("assets", "dagster_project", "lmforge", "models", "prompts", "evalsets", "tools", "dvc.yaml", "workspace.yaml"):
        src = REPO / name
        (shutil.copytree(src, project.path / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, project.path / name))
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PARAMS)
    params.pop("tiers")
    (project.path / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, sections or {})))
    raw = project.path / "data" / "raw"
    raw.mkdir(parents=True)
    for i in range(20):
        (raw / f"doc{i}.txt").write_text(prose(i, 80))
    write_task_sets(project.path / "data" / "finetune")
    write_prompts(project.path / "data" / "prompts" / "prompts.jsonl")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=project.path, env=project.env, check=True, capture_output=True)
    shutil.copy(REPO / ".dvcignore", project.path / ".dvcignore")  # DVC hashes no timings.json
    return project


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """The whole pipeline on the tiny project, materialized once per test session by `lmforge run` (which records
    it in dvc.lock), whichever pytest-xdist worker asks first; the others wait for it.  Holds ``live/`` (the
    project ``tiny_project`` gives), ``snapshot/`` (a copy as the run left it, ``tiny_snapshot``) and the run's
    output, ``first_run.txt``."""
    import filelock

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny"  # the workers' common folder
    with filelock.FileLock(f"{shared}.lock"):
        if (shared / "failed.txt").exists():
            pytest.fail(f"the tiny pipeline failed in another worker:\n{(shared / 'failed.txt').read_text()}")
        if not (shared / "first_run.txt").exists():
            project = make_project(shared / "live")
            run = project.lmforge("run", check=False)
            if run.returncode:
                (shared / "failed.txt").write_text(f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
                pytest.fail((shared / "failed.txt").read_text())
            copy_project(project, shared / "snapshot")
            (shared / "first_run.txt").write_text(run.stdout)
    return shared


@pytest.fixture(scope="session")
def tiny_project(tiny_build: Path) -> Project:
    """The tiny pipeline, for tests that read it or run in it what leaves it as it was (dry runs, re-runs that
    compute the same thing, an edit undone before the test ends).  They all run on one worker, one at a time
    (their xdist group): none sees another's edit."""
    project = Project(tiny_build / "live")
    project.first_run = (tiny_build / "first_run.txt").read_text()  # what `lmforge run` printed
    return project


@pytest.fixture(scope="session")
def tiny_snapshot(tiny_build: Path) -> Project:
    """The tiny pipeline as its first run left it, which no test runs anything in: a test that changes the
    pipeline works on a copy of it (`copy_project`), on any worker, while others run in ``tiny_project``."""
    return Project(tiny_build / "snapshot")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (the demo's champion), dequantized from its pinned GGUF to a Hugging Face
    directory once per session (~15-30 s on 2 cores)."""
    from lmforge.fetch import fetch_smollm2
    from lmforge.params import CandidateParams, load_params
    from lmforge.sources import materialize, resolve_source

    root = tmp_path_factory.mktemp("smollm2")
    params = load_params(write_params(root / "params"))
    spec = CandidateParams(name="smollm2", source=str(fetch_smollm2()), use="as_is")
    materialize(resolve_source(params, spec), root / "smollm2")
    return root / "smollm2"


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray cluster of two nodes on 127.0.0.1 (a head and a worker node, one CPU each, no GPU, no
    dashboard), for the whole session: what ``ray start`` on two machines gives, on one.  Yields its
    address for ``cluster.address``; the test process itself is not connected to it."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 200 * 2**20, "include_dashboard": False, "node_ip_address": "127.0.0.1"}
    # no log monitor (the second node has none either): what the workers print is not streamed to drivers, which
    # the tests do not read (progress comes through a queue); it tailed every worker's log, ~20 s of CPU a session
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_log_monitor": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    """This test process as a Ray driver of ``ray_cluster`` for a module's tests.  The stages they call join
    it (``lmforge.cluster.connected`` reuses a connected driver), so their tasks run in the same Ray workers:
    a driver of its own per stage started new workers on both nodes each time, each importing Ray and the
    stage's code again (~2-6 s of CPU a worker).  Joining is tested where a stage runs in its own process
    (``lmforge run`` in tests/lmforge/test_hpsearch.py, tests/models/test_ray_training.py)."""
    import ray

    ray.init(address=ray_cluster)
    yield
    ray.shutdown()


def copy_project(project: Project, root: Path) -> Project:
    """A copy of ``project`` (its files, git and DVC state, artifacts) with a fresh Dagster instance: for
    tests that change files.  Relative paths in params.yaml make the copy write its own artifacts."""
    import shutil

    copy = Project(root)
    shutil.copytree(project.path, copy.path, symlinks=True)
    shutil.copytree(project.home, copy.home, ignore=shutil.ignore_patterns("storage", "history", "schedules"))
    return copy


# --------------------------------------------------------------------------------------------------
# The session over pytest-xdist's workers (`-n 2`, pyproject.toml)
# --------------------------------------------------------------------------------------------------

#: Session fixtures whose tests run on one worker (one group): the tiny pipeline's in-place tests (one at a
#: time, none sees another's edit), and fixtures that cost seconds to tens of seconds to build, each built
#: once that way rather than once per worker.  The first one a test asks for names its group.
GROUPED_FIXTURES = ("tiny_project", "ray_cluster", "smollm2_dir")


def group_of(item) -> str:
    """The group a test runs in: that of the first of ``GROUPED_FIXTURES`` it asks for, else its module's (a
    module's fixtures, such as a server or a corpus, are then built once)."""
    names = getattr(item, "fixturenames", ())
    return next((name for name in GROUPED_FIXTURES if name in names), item.nodeid.split("::")[0])


@pytest.hookimpl(tryfirst=True)  # the first to add a cleanup: it runs after those the other plugins' pytest_configure add
def pytest_configure(config):
    """In the process that hands tests to the workers: a folder where the workers write each test's group
    (they collect the tests; it does not), and one for the preloaded interpreter.  Its workers inherit the variables.

    In a worker: once pytest is done with it (its last cleanup; its results are with the process that handed out the
    tests), exit without tearing down its modules.  After the suite that teardown kept both cores busy ~7 s while the
    session waited for it (pytest-xdist waits up to 10 s for a worker, then kills it)."""
    if hasattr(config, "workerinput"):
        config.add_cleanup(functools.partial(exit_without_teardown, 0))
    elif config.getoption("dist", "no") != "no":
        os.environ["LMFORGE_TEST_GROUPS"] = tempfile.mkdtemp(prefix="lmforge-test-groups-")
        atexit.register(shutil.rmtree, os.environ["LMFORGE_TEST_GROUPS"], ignore_errors=True)
        os.environ["LMFORGE_TEST_PRELOADED"] = tempfile.mkdtemp(prefix="lmforge-preloaded-")
        atexit.register(stop_preloaded, os.environ["LMFORGE_TEST_PRELOADED"])


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's per-module scheduling (a worker takes a unit whole, in the order collected), with
    ``group_of``'s groups as the units.  Its own ``--dist loadgroup`` cannot be used: it renames test ids,
    which pytest 9 no longer lets a plugin do (tests of one group went to both workers)."""
    import glob

    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        @functools.cached_property
        def groups(self) -> dict[str, str]:  # read once every worker has collected (the first unit is handed out)
            return json.loads(Path(sorted(glob.glob(os.path.join(os.environ["LMFORGE_TEST_GROUPS"], "*.json")))[0]).read_text())

        def _split_scope(self, nodeid: str) -> str:
            return self.groups.get(nodeid, nodeid.split("::")[0])

    return ByGroup(config, log)


def pytest_collection_modifyitems(items):
    """The order the workers take the groups in, each test's group for the scheduler, and a longer bound
    for the tiny pipeline.

    - The tiny pipeline's in-place tests first (the first of them builds it), then the Ray cluster's, then the
      groups that copy the pipeline (``tiny_snapshot``: by then it is built, and the other worker need not
      wait for it), then the groups with slow tests, then the rest, each as collected: the longest units
      first, so that the short ones at the end even out the two workers' finish.
    - Within a group, the tests that read the tiny pipeline last: the Ray cluster's group starts on one worker while
      the other builds the pipeline, instead of waiting for it (~1 minute of a core).
    - The first test that asks for the tiny pipeline builds it: bound the tests that may be first by 30 minutes
      (a hang), not by the 10 minutes of pyproject.toml, so that a slow machine is not mistaken for a hang."""
    def rank(item) -> int:
        names = getattr(item, "fixturenames", ())
        return (0 if "tiny_project" in names else 1 if "ray_cluster" in names else 2 if "tiny_snapshot" in names
                else 3 if item.get_closest_marker("slow") else 4)

    groups = {item: group_of(item) for item in items}
    reads_pipeline = {item: "tiny_build" in getattr(item, "fixturenames", ()) for item in items}
    first = {}  # each group's place: that of its earliest test
    for index, item in enumerate(items):
        first[groups[item]] = min(first.get(groups[item], (5, index)), (rank(item), index))
        if reads_pipeline[item]:
            item.add_marker(pytest.mark.timeout(1800))
    # stable: within a group (and whether its tests read the tiny pipeline), in the order collected
    items.sort(key=lambda item: (first[groups[item]], reads_pipeline[item]))
    if os.environ.get("LMFORGE_TEST_GROUPS") and os.environ.get("PYTEST_XDIST_WORKER"):
        path = Path(os.environ["LMFORGE_TEST_GROUPS"]) / f"{os.environ['PYTEST_XDIST_WORKER']}.json"
        path.write_text(json.dumps({item.nodeid: groups[item] for item in items}))


def pytest_collection_finish(session):
    """Python's garbage collector, tuned for a process that holds a large heap for minutes: it took 16-20 s of CPU a
    worker over the suite (5-9 s now), mostly in 26-30 full collections that each walked the 1-2 million objects the
    libraries keep.  What collecting imported (torch, transformers, Lightning, Dagster, MLflow, ...: objects that live as long as
    the process) goes out of its reach (garbage first, so that none is kept), and it collects less often: a young
    collection every 50,000 allocations rather than 700 (a test's cycles still go within a few tests)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


# --------------------------------------------------------------------------------------------------
# Task sets and tiny models that several test modules use
# --------------------------------------------------------------------------------------------------

HALF = len(WORDS) // 2


def sentence(rng: random.Random, words: list[str], n: int = 12) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    """Separable labels: 'first' texts use the first half of the vocabulary, 'second' the other."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "first" if i % 3 else "second"  # 2:1, so the majority baseline is 2/3
        rows.append({"text": sentence(rng, WORDS[:HALF] if label == "first" else WORDS[HALF:]), "label": label, "source": f"doc{i // 2}"})
    return rows


def sft_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"document": sentence(rng, WORDS, 30), "summary": "a python package for language data", "package": f"p{i}"} for i in range(n)]


#: params sections that keep evaluation, fine-tuning and distillation tiny in whole-graph tests (those of the tiny project).
TINY_DOWNSTREAM = {**{section: TINY_PARAMS[section] for section in ("evaluate", "finetune", "distil", "rag")}, "benchmarks": TINY_BENCHMARKS}


def write_task_sets(directory: Path, classification: int = 40, sft: int = 30) -> None:
    """Task sets of the given sizes as ``classification.jsonl`` and ``summarisation.jsonl`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "classification.jsonl").write_text("".join(json.dumps(r) + "\n" for r in classification_rows(classification)))
    (directory / "summarisation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(sft)))


def tiny_champion(tmp_path: Path) -> Path:
    """A tiny causal model with a tokenizer, and the select summary naming it the champion."""
    import torch

    from models.architectures import build_model, from_name
    from models.tokenizer import TokenizerSpec, to_transformers, train_tokenizer
    from models.training import special_ids

    model_dir = tmp_path / "artifacts/pretrain/tiny/hf"
    if not model_dir.exists():
        rng = random.Random(0)
        spec = TokenizerSpec(vocab_size=200, min_frequency=1)
        tok = to_transformers(train_tokenizer(iter(sentence(rng, WORDS, 40) for _ in range(50)), spec), spec, 128)
        torch.manual_seed(0)
        build_model(from_name("tiny", vocab_size=len(tok), max_context=128), special_ids(tok)).save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))
        (tmp_path / "artifacts/select").mkdir(parents=True)
        (tmp_path / "artifacts/select/summary.json").write_text(json.dumps(
            {"champion": "tiny", "champion_dir": str(model_dir), "champion_pretrain_run_id": None, "champion_score": 1.0}))
    return model_dir


MIT_CARD = "---\nlicense: mit\n---\n# tiny-llama\n"


def save_tiny_llama(out: Path, seed: int = 0, heads: int = 4) -> Path:
    """A random 2-layer Llama with a word-level BPE tokenizer of its own (not the project's), as a
    Hugging Face directory with a model card declaring its licence: what a user downloads.  ``heads=2``
    gives heads of 16 dimensions, the least ONNX Runtime's attention kernel takes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.tokenizer import TokenizerSpec, to_transformers, train_tokenizer

    rng = random.Random(seed)
    spec = TokenizerSpec(vocab_size=350, min_frequency=1)
    tok = to_transformers(train_tokenizer(iter(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(80)), spec), spec, 256)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    # a few steps on text of the same words: a pretrained model knows something, and beats a unigram model
    ids = torch.tensor([tok(" ".join(rng.choice(WORDS) for _ in range(40)))["input_ids"][:32] for _ in range(64)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(40):
        batch = ids[(step % 8) * 8 : (step % 8 + 1) * 8]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "README.md").write_text(MIT_CARD)
    return out


class Server:
    """``lmforge serve`` in a process of its own, its feedback store under ``root``."""

    def __init__(self, root: Path, model: Path | str, *args: str, project: Project | None = None, **sections: dict):
        """``project``: serve from that project's directory with its params.yaml (store, registry); else a
        params file of its own under ``root``, with ``sections`` (e.g. ``serve={...}``) in it."""
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if project is None:
            self.store = root / "feedback.db"
            params = write_params(root / "params", feedback={"store": str(self.store), "inbox": str(root / "inbox")},
                                  mlflow={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}, **sections)
            args = ("--params", str(params), *args)
        else:
            self.store = project.path / "feedback" / "feedback.db"
        self.log = root / f"serve-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = start_command([str(REPO / ".venv/bin/lmforge"), "serve", "--model", str(model), "--port", str(self.port), *args],
                              project.path if project else root, {**(project.env if project else os.environ), "LMFORGE_SERVE_LOG_LEVEL": "warning"}, log)
        try:
            wait_for(f"{self.url}/health", seconds=180)
        except AssertionError:
            self.stop()
            raise AssertionError(self.log.read_text()[-3000:]) from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def post(self, path: str, body: str | dict, headers: dict | None = None):
        import httpx2

        content = body if isinstance(body, str) else json.dumps(body)
        return httpx2.post(self.url + path, content=content, headers={"content-type": "application/json", **(headers or {})}, timeout=120)

    def health(self) -> dict:
        import httpx2

        return httpx2.get(self.url + "/health", timeout=30).raise_for_status().json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process_group(self.proc)


#: Runs in the tiny project: evaluate the feedback sensor against the project's Dagster instance and, when it
#: asks for runs, execute their jobs there (feedback_job, preference_job); print what happened as JSON.
DRIVER = textwrap.dedent('''
    import json, sys
    import dagster as dg
    from dagster_project.definitions import defs
    from assets.resources import ParamsResource

    cursor = sys.argv[1] or None
    with dg.DagsterInstance.get() as instance:
        sensor = defs.get_sensor_def("feedback_arrived")
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"lmforge_params": ParamsResource()}))
        out = {"cursor": tick.cursor, "skip": tick.skip_message, "runs": len(tick.run_requests or [])}
        for request in tick.run_requests or []:
            result = defs.get_job_def(request.job_name).execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)
            out["jobs"] = out.get("jobs", []) + [request.job_name]
            out["success"] = result.success
            out["materialized"] = sorted(e.asset_key.to_user_string() for e in result.get_asset_materialization_events())
            out["checks"] = {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
                             for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    print("RESULT " + json.dumps(out))
''')


def tick(project: Project, cursor: str | None) -> dict:
    out = project.run(str(REPO / ".venv/bin/python"), "-c", DRIVER, cursor or "")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------------
# Pretraining on a tiny corpus (test_training, test_ray_training)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tokenizer for every objective and its packed splits (blocks of 64 tokens): what the training tests train on."""
    import datasets
    import numpy as np

    from models.data import pack_split, write_meta
    from models.tokenizer import TokenizerSpec, to_transformers, train_tokenizer

    root = tmp_path_factory.mktemp("packed")
    texts = [prose(i, 120) for i in range(120)]
    spec = TokenizerSpec(vocab_size=400, min_frequency=1, objectives=("causal", "mlm", "seq2seq"), extra_ids=20)
    tok = train_tokenizer(iter(texts), spec)
    to_transformers(tok, spec, 64).save_pretrained(str(root / "tok"))
    eos, pad = tok.token_to_id("<eos>"), tok.token_to_id("<pad>")
    (root / "packed").mkdir()
    splits = {}
    for name, part in (("train", texts[:100]), ("val", texts[100:])):
        ds = datasets.Dataset.from_dict({"text": part})
        splits[name] = pack_split(ds, root / "tok" / "tokenizer.json", eos, pad, 64, np.dtype(np.uint16), root / "packed" / f"{name}.bin")
    write_meta(root / "packed", {"block_size": 64, "dtype": "uint16", "pad_id": pad, "separator_id": eos, "vocab_size": tok.get_vocab_size(), "splits": splits})
    return root / "packed", root / "tok"


def cfg(**overrides):
    """A ``TrainConfig`` of a few steps (validation and a checkpoint every 10), with ``overrides``."""
    from models.train_config import TrainConfig

    values = dict(max_steps=20, batch_size=4, warmup_steps=3, val_every=10, val_batches=2, checkpoint_every=10, lr=5e-3)
    return TrainConfig(**{**values, **overrides})


def tiny_arch():
    """The tiny architecture the training tests train, for blocks of 64 tokens."""
    from models.architectures import from_name

    return from_name("tiny", max_context=64)
