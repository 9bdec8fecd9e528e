"""``models.forking.run_module``: a module run as ``python -m`` would run it, in a forked child that keeps
nothing of this process's but what it imported (its exit handlers stay here; torch's threads work)."""

import atexit
from pathlib import Path

import pytest
import torch

from models.forking import run_module

MODULE = '''import os, sys
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("FORKING_TEST"), "main", __name__)
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
'''


@pytest.fixture
def module(tmp_path: Path, monkeypatch) -> str:
    (tmp_path / "forking_probe.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "forking_probe"


def test_a_module_runs_as_main_with_its_arguments_environment_and_directory(module: str, tmp_path: Path):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = run_module(module, ["3", "x"], {"FORKING_TEST": "yes"}, cwd=workdir)
    assert result.returncode == 3
    assert result.stdout == f"argv ['3', 'x'] cwd {workdir} env yes main __main__\n"
    assert result.stderr == "to stderr\n"
    assert run_module(module, ["0"], {}).returncode == 0


def test_an_exception_is_exit_status_one_with_its_traceback(tmp_path: Path, monkeypatch):
    (tmp_path / "forking_raises.py").write_text("raise ValueError('the module failed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_module("forking_raises", [], {})
    assert result.returncode == 1 and "ValueError: the module failed" in result.stderr


def test_this_process_exit_handlers_do_not_run_in_the_child(module: str, tmp_path: Path):
    """A forked child that exited the normal way would run them: MLflow's ends this process's active run."""
    ran = tmp_path / "ran"

    def handler():
        ran.write_text("the child ran this process's exit handler")

    atexit.register(handler)
    try:
        assert run_module(module, ["0"], {}).returncode == 0
        assert not ran.exists()
    finally:
        atexit.unregister(handler)


@pytest.mark.timeout(120)
def test_torch_works_in_the_child_after_this_process_used_its_threads(tmp_path: Path, monkeypatch):
    """GNU OpenMP's threads do not survive a fork: the child's first parallel region would wait for them
    forever, unless the child runs torch in one thread."""
    (tmp_path / "forking_torch.py").write_text("import torch\nx = torch.randn(512, 512)\nprint(float((x @ x).abs().sum() > 0))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(512, 512)
        for _ in range(3):
            x @ x  # a parallel region here first
        result = run_module("forking_torch", [], {})
    finally:
        torch.set_num_threads(threads)
    assert result.returncode == 0 and result.stdout == "1.0\n", result.stderr
