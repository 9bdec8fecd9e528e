"""Pretraining on CPU: the loss falls, runs repeat exactly, a killed run resumes exactly, NaN stops."""

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cfg, start_command, tiny_arch

from models.architectures import from_name
from models.lightning_module import StreamSampler, rank_share
from models.training import pretrain, weights_finite


ARCH = tiny_arch()


def take(sampler: StreamSampler, k: int) -> list[int]:
    stream = iter(sampler)
    return [next(stream) for _ in range(k)]


def test_each_rank_streams_only_its_contiguous_share_once_per_epoch_and_resumes_exactly():
    n, world = 103, 4
    shares = [rank_share(n, rank, world) for rank in range(world)]
    assert [b for share in shares for b in share] == list(range(n))  # a partition of the blocks, in file order
    for rank, share in enumerate(shares):
        stream = take(StreamSampler(n, seed=7, rank=rank, world=world), 3 * len(share))
        assert set(stream) == set(share)  # nothing outside the rank's slice of the file
        for epoch in range(3):  # each block of the share exactly once per epoch, in a new order
            assert sorted(stream[epoch * len(share) : (epoch + 1) * len(share)]) == list(share)
        assert stream[: len(share)] != stream[len(share) : 2 * len(share)]
        # resumed after k samples per rank (k × world consumed over all ranks): the same stream from there
        for k in (0, 5, len(share), len(share) + 9):
            assert take(StreamSampler(n, seed=7, start=k * world, rank=rank, world=world), 20) == stream[k : k + 20]
    assert take(StreamSampler(n, seed=8, rank=0, world=world), 10) != take(StreamSampler(n, seed=7, rank=0, world=world), 10)
    # one rank: the whole split in a fresh permutation every epoch
    alone = take(StreamSampler(n, seed=7), 2 * n)
    assert sorted(alone[:n]) == sorted(alone[n:]) == list(range(n))
    # another number of ranks goes on from the same share of the epoch: 2 ranks × 30 consumed of 103 blocks
    two = [take(StreamSampler(n, seed=7, start=60, rank=rank, world=2), 1) for rank in range(2)]
    assert [StreamSampler(n, seed=7, start=60, rank=rank, world=2).position for rank in range(2)] == [30, 30]
    assert all(block in rank_share(n, rank, 2) for rank, [block] in enumerate(two))
    with pytest.raises(ValueError, match="3 blocks, too few to give each of 4 workers one"):
        StreamSampler(3, seed=0, rank=0, world=4)


def test_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path: Path, corpus_dirs):
    packed, tok = corpus_dirs
    summary = pretrain(ARCH, cfg(max_steps=30), packed, tok, tmp_path, progress=False)
    first, last = summary["train_losses"][0][1], summary["final_val_loss"]
    assert last < first - 0.5, (first, last)
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 4 * 64 and summary["tokens_per_second"] > 0
    # the same validation batches, scored token by token: perplexity = exp(mean loss)
    assert abs(np.log(summary["val_perplexity"]) - summary["final_val_loss"]) < 1e-3
    assert 0 < summary["val_token_accuracy"] <= summary["val_top5_accuracy"] <= 1 and summary["val_bits_per_byte"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<eos>"
    assert weights_finite(tmp_path / "hf") and sum(p.numel() for p in model.parameters()) == summary["parameters"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=20.ckpt", "step=30.ckpt"]


def test_the_same_seed_gives_identical_losses(tmp_path: Path, corpus_dirs):
    packed, tok = corpus_dirs
    a = pretrain(ARCH, cfg(max_steps=8), packed, tok, tmp_path / "a", progress=False)
    b = pretrain(ARCH, cfg(max_steps=8), packed, tok, tmp_path / "b", progress=False)
    assert a["train_losses"] == b["train_losses"] and a["final_val_loss"] == b["final_val_loss"]


def test_a_nan_loss_stops_the_run_with_a_clear_message(tmp_path: Path, corpus_dirs):
    packed, tok = corpus_dirs
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf) at step \d+: lower pretrain.lr"):
        pretrain(ARCH, cfg(lr=1e6, grad_clip=0.0, warmup_steps=1, max_steps=50), packed, tok, tmp_path, progress=False)


@pytest.mark.parametrize("arch, auto", [("encoder", "AutoModelForMaskedLM"), ("encoder-decoder", "AutoModelForSeq2SeqLM")])
def test_every_objective_trains(tmp_path: Path, corpus_dirs, arch: str, auto: str):
    import transformers

    packed, tok = corpus_dirs
    summary = pretrain(from_name("tiny", arch=arch, max_context=64), cfg(max_steps=6, val_every=3), packed, tok, tmp_path, progress=False)
    assert np.isfinite(summary["final_val_loss"]) and summary["objective"] in ("mlm", "seq2seq")
    getattr(transformers, auto).from_pretrained(tmp_path / "hf")


#: The victim of the resume test: a run in a process of its own that stops at its first validation,
#: says so, and waits there to be killed.  It can never write a later checkpoint or finish, however
#: fast or slow the machine, so the kill always lands between the same two checkpoints.
VICTIM = """
import json, os, sys, time
from pathlib import Path
from models.architectures import ArchConfig
from models.train_config import TrainConfig
from models.training import pretrain

def wait_to_be_killed(_progress_line):
    print("validated", flush=True)
    time.sleep(900)  # ends only if the test went away without killing this process
    os._exit(1)

packed, tok, out = map(Path, sys.argv[1:4])
arch, train = ArchConfig(**json.loads(sys.argv[4])), TrainConfig(**json.loads(sys.argv[5]))
pretrain(arch, train, packed, tok, out, progress=False, report=wait_to_be_killed)
"""


def wait_for_line(log: Path, line: str, proc, seconds: float = 300) -> None:
    """Until ``proc`` has written ``line`` to ``log``: a process that exits first, or a hang, fails the test."""
    deadline = time.monotonic() + seconds
    while line not in log.read_text().splitlines():
        assert proc.poll() is None, f"the victim exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no '{line}' after {seconds} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path: Path, corpus_dirs):
    from dataclasses import asdict

    packed, tok = corpus_dirs
    run = cfg(max_steps=12, checkpoint_every=4, val_every=6)  # checkpoint at 4, the victim waits at 6
    log = tmp_path / "victim.log"
    with open(log, "w") as out:
        args = [str(packed), str(tok), str(tmp_path / "killed"), json.dumps(asdict(ARCH)), json.dumps(asdict(run))]
        victim = start_command([sys.executable, "-c", VICTIM, *args], REPO, {**os.environ, "OMP_NUM_THREADS": "1"}, out)  # one thread, as here
    try:
        reference = pretrain(ARCH, run, packed, tok, tmp_path / "whole", progress=False)  # while the victim starts
        wait_for_line(log, "validated", victim)
        os.killpg(victim.pid, signal.SIGKILL)  # a real kill: no handler, no cleanup
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    checkpoints = tmp_path / "killed/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=4.ckpt"] and not (tmp_path / "killed/hf").exists()
    (checkpoints / "step=8.ckpt.tmp").write_bytes(b"half a checkpoint")  # what a kill during a save leaves: ignored
    resumed = pretrain(ARCH, run, packed, tok, tmp_path / "killed", progress=False)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 12
    assert abs(resumed["final_train_loss"] - reference["final_train_loss"]) < 1e-4
    assert abs(resumed["final_val_loss"] - reference["final_val_loss"]) < 1e-4


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_trains_checkpoints_resumes_and_exports(tmp_path: Path, corpus_dirs):
    """FSDP2 (fully_shard through Lightning's ModelParallelStrategy) with gloo: the GPU code path."""
    from transformers import AutoModelForCausalLM

    from models.train_config import Scale
    from models.training import launch

    packed, tok = corpus_dirs
    scale = Scale(strategy="fsdp2", devices=2, accelerator="cpu")
    run = cfg(max_steps=8, checkpoint_every=4, val_every=4)
    whole = launch(ARCH, run, packed, tok, tmp_path / "whole", scale)
    assert whole["train_losses"][-1][1] < whole["train_losses"][0][1]
    assert whole["tokens_seen"] == 8 * 4 * 2 * 64  # two processes, each its own batch
    shards = sorted(p.name for p in (tmp_path / "whole/checkpoints/step=4.ckpt").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # one shard per process
    # resume from the sharded step-4 checkpoint in a fresh directory: same end as the whole run
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "whole/checkpoints/step=4.ckpt", tmp_path / "resumed/checkpoints/step=4.ckpt")
    resumed = launch(ARCH, run, packed, tok, tmp_path / "resumed", scale)
    assert resumed["resumed_from_step"] == 4
    assert abs(resumed["final_val_loss"] - whole["final_val_loss"]) < 1e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "whole/hf")  # gathered from the shards
    assert sum(p.numel() for p in model.parameters()) == whole["parameters"] and weights_finite(tmp_path / "whole/hf")


def test_wall_clock_budget_and_early_stopping_end_a_run_before_max_steps(tmp_path: Path, corpus_dirs):
    packed, tok = corpus_dirs
    # however many steps fit in the budget (at least one: the clock is read after each step), and past
    # warm-up from the first step on: the run stops itself at the floor of its schedule
    timed = pretrain(ARCH, cfg(max_steps=100_000, max_minutes=0.01, warmup_steps=1), packed, tok, tmp_path / "timed", progress=False)
    assert 0 < timed["steps"] < 100_000 and (tmp_path / "timed/hf/model.safetensors").exists()
    assert timed["stopped_by_budget"] and timed["final_lr"] == pytest.approx(5e-3 * 0.1)
    # lr 0 never improves the val loss: patience 1 stops at the second validation
    stopped = pretrain(ARCH, cfg(max_steps=1000, lr=0.0, val_every=5, early_stopping_patience=1), packed, tok, tmp_path / "early", progress=False)
    assert stopped["steps"] == 10


def test_bf16_mixed_precision_trains_on_cpu(tmp_path: Path, corpus_dirs):
    packed, tok = corpus_dirs
    summary = pretrain(ARCH, cfg(max_steps=6, val_every=3, precision="bf16-mixed"), packed, tok, tmp_path, progress=False)
    assert np.isfinite(summary["final_val_loss"]) and weights_finite(tmp_path / "hf")


@pytest.mark.slow
def test_torch_compile_trains_and_exports_plain_weights(tmp_path: Path, corpus_dirs):
    import torch._inductor.config
    from safetensors.torch import load_file

    packed, tok = corpus_dirs
    arch = ARCH.replace(n_layer=1)  # what is compiled, twice (train, eval), is C++ built by a compiler: keep it small
    eager = pretrain(arch, cfg(max_steps=4, val_every=2), packed, tok, tmp_path / "eager", progress=False)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):  # scalar C++ kernels: about half the build time
        compiled = pretrain(arch, cfg(max_steps=4, val_every=2, compile=True), packed, tok, tmp_path / "compiled", progress=False)
    assert abs(compiled["final_val_loss"] - eager["final_val_loss"]) < 1e-3
    assert not any(k.startswith("_orig_mod") for k in load_file(tmp_path / "compiled/hf/model.safetensors"))
