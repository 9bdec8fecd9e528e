"""The tests' preloaded interpreter: a Python process that has imported the heavy libraries lmforge's commands
import (torch, Lightning, transformers, MLflow, Dagster, ...) once, and forks a child for each ``lmforge ...`` or
``python -c ...`` command a test runs, instead of a fresh interpreter that imports them all again.

Why: an ``lmforge`` process spends ~4-10 s of CPU importing those libraries before it does anything
(``import pytorch_lightning`` alone is ~5 s on an idle core: torchmetrics, torch._dynamo, scipy, matplotlib), and
the suite runs ~80 such processes on 2 cores.  A forked child runs the same command as a fresh process would: the same
script or ``-c`` code as ``__main__``, its own working directory, environment, stdin/stdout/stderr (passed over
the socket) and session (so a test can kill its whole process group), the same exit code.  Only lmforge's
own code is imported afresh in each child (not preloaded here): from the checkout (the editable install), from
the working directory for ``python -c``, or from ``$PYTHONPATH`` (a copy of the code), as a fresh process would.
tests/conftest.py decides which commands come here: none whose environment differs in what a library reads when
it is imported (``same_imports``).  The ``lmforge`` commands that ``dvc repro`` runs for its stages come here too,
through ``client`` (tests/conftest.py puts a ``lmforge`` that calls it first on the ``$PATH`` of a test's ``dvc``).

Protocol, over a Unix socket: a request is one JSON line ``{"argv", "cwd", "env"}`` sent with three file
descriptors (stdin, stdout, stderr); the reply is two lines, the child's pid at once and its exit code (as
``subprocess`` gives it: ``-N`` for signal N) when it ends.  A watcher process per request waits for the child,
so that this process only ever accepts and forks.

Usage: ``python tests/preloaded.py SOCKET`` prints ``ready`` once it listens;
``python -S tests/preloaded.py --client SOCKET BASE_ENV.json COMMAND ARGS...`` runs a command through it."""

import atexit
import gc
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import threading
from typing import NoReturn

#: What lmforge's commands import that costs seconds; lmforge's own packages are not here (see above).
PRELOAD = ("torch", "pytorch_lightning", "transformers", "peft", "mlflow", "dagster", "datasets", "great_expectations",
           "sklearn", "fastapi", "uvicorn", "openai")


#: Environment variables that may differ between a command and the preloaded interpreter: the libraries read them
#: when they are used, not when they are imported (DVC_: what ``dvc repro`` sets for a stage's command; RAY_: Ray is
#: not preloaded, each child imports it afresh, and a worker that joined the tests' cluster has RAY_CLIENT_MODE set).
#: Any other difference (PYTHONPATH, a thread count, ...) runs the command in a fresh interpreter.
READ_WHEN_USED = ("DAGSTER_HOME", "PATH", "MLFLOW_TRACKING_URI", "PYTEST_", "LMFORGE_", "DVC_", "RAY_")
#: What a shell sets for the commands it runs (``dvc repro`` runs a stage's command with one), read by none of them.
SHELL_SETS = ("_", "PWD", "OLDPWD", "SHLVL")


def python_path(env: dict[str, str]) -> list[str]:
    """The entries of ``$PYTHONPATH`` in ``env``, which a fresh interpreter puts first on ``sys.path``."""
    return [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]


def same_imports(env: dict[str, str], base: dict[str, str]) -> bool:
    """Whether a command's environment imports the preloaded libraries as ``base`` (the preloaded interpreter's)
    does: it differs only in what is read when used, and in a ``$PYTHONPATH`` (a child puts it first on ``sys.path``)
    that holds none of the preloaded libraries."""
    path = python_path(env)
    if any(os.path.exists(os.path.join(entry, name)) or os.path.exists(os.path.join(entry, f"{name}.py")) for entry in path for name in PRELOAD):
        return False
    return all(name.startswith(READ_WHEN_USED) or name in ("PYTHONPATH", *SHELL_SETS) for name in env.keys() | base.keys() if env.get(name) != base.get(name))


def dash_c(argv: list[str]) -> int | None:
    """Where the code of ``python [-P] -c CODE ARGS`` is in ``argv`` (2 or 3), or None for another command."""
    flags = 1 if argv[1:2] == ["-P"] else 0
    return 2 + flags if argv[1 + flags:2 + flags] == ["-c"] else None


def send_request(path: str, argv: list[str], cwd: str, env: dict[str, str], fds: list[int]) -> socket.socket:
    """Send one request to the preloaded interpreter listening at ``path``; its reply comes on the socket returned."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [(json.dumps({"argv": argv, "cwd": cwd, "env": env}) + "\n").encode()], fds)
    return conn


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request: its JSON line and the three descriptors that came with its first bytes."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("the request ended before its newline")
        data += more
    return json.loads(data), fds


def become(request: dict, fds: list[int]) -> None:
    """In the forked child: turn into the requested command, then exit as the interpreter would after it."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    try:
        # what a fresh interpreter puts first on sys.path: $PYTHONPATH, and before it the working directory
        # for -c (not with -P) or the script's directory
        sys.path[:0] = python_path(request["env"])
        code_at = dash_c(argv)
        if code_at is not None:  # python [-P] -c CODE ARGS
            sys.argv = ["-c", *argv[code_at + 1:]]
            if argv[1] != "-P":
                sys.path.insert(0, "")
            exec(compile(argv[code_at], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:  # a script (an installed console script such as .venv/bin/lmforge): its directory first on sys.path
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else (print(exit.code, file=sys.stderr), 1)[1]
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> NoReturn:
    """Exit as the interpreter does (non-daemon threads joined, atexit handlers: logging, MLflow, multiprocessing,
    weakref finalizers; the standard streams flushed), but without tearing down every module it imported, which after
    torch, Lightning, transformers, ... costs seconds of CPU that nothing needs: ~3 s in a forked child (copy-on-write
    page faults), ~7 s in a pytest-xdist worker at the end of the suite (tests/conftest.py's ``pytest_configure``)."""
    threading._shutdown()  # non-daemon threads end first (concurrent.futures' workers among them)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def watch(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In a watcher process: fork the command, tell its pid, wait for it, tell its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the command waits for its own children
    started, has_session = os.pipe()
    pid = os.fork()
    if pid == 0:
        conn.close()
        os.close(started)
        os.setsid()
        os.close(has_session)  # the pid names a process group now: the test may kill it by that
        become(request, fds)
    os.close(has_session)
    os.read(started, 1)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    except OSError:  # the test went away (it failed or timed out): nothing to tell
        pass
    os._exit(0)


def serve(path: str) -> None:
    del sys.path[0]  # this file's folder (tests/): each child puts its own first entry there
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the preloaded objects: no child's garbage collection walks (and so copies) their pages
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # watchers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request, fds = receive(conn)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            watch(conn, request, fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def client(path: str, base_file: str, argv: list[str]) -> None:
    """Run ``argv`` forked by the preloaded interpreter listening at ``path``, for a process that is not a test
    (``dvc repro`` running a stage's ``lmforge``): pass this process's streams, working directory and environment, pass
    a SIGTERM or SIGINT on to the command's process group, and exit as the command did.  In an environment that
    imports the libraries otherwise than ``base_file`` records (``same_imports``), become the command instead."""
    with open(base_file) as f:
        base = json.load(f)
    env = dict(os.environ)
    if not same_imports(env, base):
        os.execv(argv[0], argv)
    reply = send_request(path, argv, os.getcwd(), env, [0, 1, 2]).makefile()
    pid = int(reply.readline())

    def pass_on(signum, _frame):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, pass_on)
    code = int(reply.readline())
    if code < 0:  # killed by signal -code: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        client(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        serve(sys.argv[1])
