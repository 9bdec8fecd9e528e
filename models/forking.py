"""``python -m MODULE ARGS`` in a process of its own that starts with what this process has imported.

Why: ONNX Runtime GenAI's model builder and llama.cpp's GGUF converter run in processes of their own
(they put their own packages first on ``sys.path``; the converter's ``gguf`` must not meet the one lmforge
has installed), and a fresh interpreter spends most of a small model's build importing torch and
transformers again: measured on a 2-layer Llama, the builder took 6.6 s of CPU fresh and 1.8 s forked,
the converter 3.8 s and 0.4 s, for the same bytes.  lmforge's stages, server and tests have imported them
already.

The child is this process forked (Linux; a fresh interpreter elsewhere, where fork after these libraries
is not safe), then made what a fresh process would be for the module:
- torch runs one thread: GNU OpenMP's threads do not survive a fork, and the child's first parallel
  region would wait for them forever;
- its standard streams go to files of its own, its environment and working directory are the ones asked;
- it ends with ``os._exit``: none of this process's exit handlers runs in it (MLflow's would end this
  process's run, for one).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path


def run_module(module: str, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``module`` as ``__main__`` with ``args`` (in ``env``, else this process's environment), wait, and return
    its exit code and output (text)."""
    argv = [sys.executable, "-m", module, *args]
    if sys.platform != "linux":
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _become(module, args, env, cwd, out.fileno(), err.fileno())
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


def _become(module: str, args: list[str], env: dict[str, str] | None, cwd: Path | None, out: int, err: int) -> None:
    """In the forked child: run the module, then exit with its code, whatever happens."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # not the parent's objects or their locks
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else (print(exit.code, file=sys.stderr), 1)[1]
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:  # never past here: the child would go on as a copy of the caller
            os._exit(code)
