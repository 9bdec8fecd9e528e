"""Pretraining on a Ray cluster of two nodes (tests/conftest.py's ``ray_cluster``, CPU, gloo): Ray Train
runs the same Lightning code, a killed worker is restarted and the run ends where an uninterrupted one
(torchrun's) does, a checkpoint of two processes resumes on one, and ``lmforge run`` does it all from Dagster with
MLflow behind a tracking server."""

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cfg, copy_project, free_port, tiny_arch, wait_for

from models.data import PackedBlocks
from models.ray_training import RaySettings, launch_on_ray, short_of
from models.train_config import Scale
from models.training import launch, pretrain

#: The test kills a worker as soon as the first checkpoint (step 20) is on disk: the 60 steps after it (seconds)
#: are the margin for the kill to land before the end; DDP's all-reduce then holds rank 0 until the group restarts.
ARCH = tiny_arch()
RUN = dict(max_steps=80, checkpoint_every=20, val_every=40)
SCALE = Scale(strategy="ddp", engine="ray", accelerator="cpu")


def train(out: Path, corpus, lines: list | None = None) -> dict:
    """The test's run on two Ray Train workers, one per node."""
    packed, tok = corpus
    settings = RaySettings(workers=2, storage_path=str(out.parent / "ray"), name=f"{out.name}-{time.time_ns()}")
    out.mkdir(parents=True, exist_ok=True)
    return launch_on_ray(ARCH, cfg(**RUN), packed, tok, out, SCALE, settings,
                         report=(lines.append if lines is not None else None))


def placements(lines: list[str]) -> list[tuple[int, str, int]]:
    """(rank, node id, pid) of each worker start that the workers reported, in order."""
    return [(rank, node, pid) for rank, node, _, pid in worker_starts(lines)]


def worker_starts(lines: list[str]) -> list[tuple[int, str, range, int]]:
    """(rank, node id, train blocks it reads, pid) of each worker start, from lines such as
    ``worker 1/2: node 3f2a… (10.0.0.2), train blocks 50-99, pid 4242``."""
    found = []
    for line in lines:
        if line.startswith("worker "):
            rank = int(line.split()[1].split("/")[0])
            first, last = (int(b) for b in line.split("train blocks ")[1].split(",")[0].split("-"))
            found.append((rank, line.split("node ")[1].split()[0], range(first, last + 1), int(line.rsplit("pid ", 1)[1])))
    return found


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_where_an_uninterrupted_one_does(tmp_path: Path, corpus_dirs, ray_driver):
    """The uninterrupted run is the same DDP run on two processes of this machine (torchrun, the local engine):
    where a run's processes start is not part of it, so Ray Train's two workers end where torchrun's two do."""
    packed, tok = corpus_dirs
    whole = launch(ARCH, cfg(**RUN), packed, tok, tmp_path / "whole", Scale(strategy="ddp", devices=2, accelerator="cpu"))
    assert whole["steps"] == RUN["max_steps"] and whole["resumed_from_step"] is None
    assert whole["tokens_seen"] == RUN["max_steps"] * 4 * 2 * 64  # two processes, each its own batch of 4 blocks of 64

    lines: list[str] = []
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(train(tmp_path / "killed", corpus_dirs, lines=lines)))
    thread.start()
    first = tmp_path / "killed/checkpoints/step=20.ckpt"
    deadline = time.time() + 300
    while not first.exists() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    workers = placements(lines)
    assert sorted(rank for rank, _, _ in workers) == [0, 1], lines
    assert len({node for _, node, _ in workers}) == 2, f"both workers on one Ray node: {lines}"  # really two nodes
    # each node reads its own half of the train blocks, one contiguous slice of the packed file
    shares = [share for _, _, share, _ in sorted(worker_starts(lines))]
    assert shares[0].start == 0 and shares[0].stop == shares[1].start and shares[1].stop == len(PackedBlocks(packed, "train"))
    victim = next(pid for rank, _, pid in workers if rank == 1)
    subprocess.run(["kill", "-KILL", str(victim)], check=True)  # a real kill: no handler, no cleanup
    thread.join(timeout=600)
    assert outcome, "the run did not finish"
    assert len(placements(lines)) == 4, f"the worker group did not start again:\n{lines}"  # 2 workers, twice
    assert outcome["workers"] == 2 and outcome["steps"] == RUN["max_steps"]
    assert outcome["resumed_from_step"] is not None and outcome["resumed_from_step"] < RUN["max_steps"]
    assert any(line.startswith("step 40/80") for line in lines)  # rank 0's progress reached the driver
    assert abs(outcome["final_train_loss"] - whole["final_train_loss"]) < 1e-4
    assert abs(outcome["final_val_loss"] - whole["final_val_loss"]) < 1e-4

    # the same run continued by one process, on this machine (the local engine), from the uninterrupted run's
    # step-60 checkpoint: where and on how many processes a run trains is not part of it (see the fingerprint
    # test below).  The stream goes on from the 60 × 4 × 2 samples two workers consumed, 4 samples a step from there
    resumed = tmp_path / "one_process"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "whole/checkpoints/step=60.ckpt", resumed / "checkpoints")
    alone = pretrain(ARCH, cfg(**RUN), *corpus_dirs, resumed, Scale(accelerator="cpu"), progress=False)
    assert alone["resumed_from_step"] == 60 and alone["steps"] == RUN["max_steps"]
    assert consumed(tmp_path / "whole/checkpoints/step=60.ckpt") == 60 * 4 * 2
    assert consumed(resumed / "checkpoints/step=80.ckpt") == 60 * 4 * 2 + 20 * 4
    assert abs(alone["final_val_loss"] - whole["final_val_loss"]) < 0.05  # the same model, 20 smaller steps apart


def test_more_workers_than_train_blocks_is_one_clear_error_before_any_worker_starts(tmp_path: Path, corpus_dirs):
    packed, tok = corpus_dirs
    blocks = len(PackedBlocks(packed, "train"))
    with pytest.raises(ValueError, match=f"has {blocks} blocks, too few to give each of {blocks + 1} workers one"):
        launch_on_ray(ARCH, cfg(**RUN), packed, tok, tmp_path, SCALE, RaySettings(workers=blocks + 1))


def test_a_worker_group_the_cluster_cannot_hold_is_reported(ray_driver):
    """Ray Train would wait for nodes without a word: the driver says what is missing first."""
    assert short_of(RaySettings(workers=2)) == ""  # two nodes of one CPU each
    assert short_of(RaySettings(workers=3)) == "3 CPU (the cluster has 2)"
    assert short_of(RaySettings(workers=1, use_gpu=True)) == "1 GPU (the cluster has 0)"


@pytest.mark.slow  # it reads the session's tiny pipeline: the whole graph, run once
def test_where_a_run_trains_is_not_part_of_its_fingerprint(tiny_snapshot):
    """A run resumed on another engine or number of processes is the same run; another checkpoint
    format (sharded FSDP state) is not."""
    import dataclasses

    from lmforge.candidates import get
    from lmforge.params import load_params
    from lmforge.pretrain import fingerprint

    params = load_params(tiny_snapshot.path / "params.yaml")
    params.paths.artifacts = str(tiny_snapshot.artifacts)
    candidate = get(params, "a", "pretrain")
    here = fingerprint(candidate, params)
    assert here == tiny_snapshot.summary("pretrain/a")["fingerprint"]
    elsewhere = dataclasses.replace(params, pretrain=dataclasses.replace(
        params.pretrain, scale=dataclasses.replace(params.pretrain.scale, engine="ray", strategy="ddp", devices=8, num_nodes=4)))
    elsewhere.cluster.workers = 16
    assert fingerprint(candidate, elsewhere) == here
    elsewhere.pretrain.scale.strategy = "fsdp2"
    assert fingerprint(candidate, elsewhere) != here


def consumed(checkpoint: Path) -> int:
    """The position in the training stream that a checkpoint records (samples over all ranks)."""
    import torch

    return torch.load(checkpoint, weights_only=False)["PackedDataModule"]["consumed"]


@pytest.mark.slow
def test_lmforge_run_pretrains_on_ray_from_dagster_and_logs_to_an_mlflow_server(tiny_snapshot, ray_cluster, tmp_path: Path):
    """The shared services of a cluster: an MLflow tracking server (SQLite behind it here; a database
    server on a real cluster) and an artifact store that every node reaches (a shared path here)."""
    import dagster as dg
    from mlflow import MlflowClient

    project = copy_project(tiny_snapshot, tmp_path / "copy")
    params = project.params()
    params["pretrain"]["scale"].update(engine="ray", strategy="ddp")
    params["cluster"].update(address=ray_cluster, workers=2, storage=str(tmp_path / "shared" / "ray"))
    (project.path / "params.yaml").write_text(yaml.safe_dump(params))
    port = free_port()
    server = subprocess.Popen(
        [str(REPO / ".venv/bin/mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", (tmp_path / "shared" / "mlflow").as_uri()],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health")
        uri = f"http://127.0.0.1:{port}"
        project.lmforge("run", "--select", "pretrain", "--partition", "a", env={"MLFLOW_TRACKING_URI": uri})
        summary = project.summary("pretrain/a")
        assert summary["workers"] == 2 and summary["steps"] == params["pretrain"]["train"]["max_steps"]
        assert summary["final_val_loss"] < summary["unigram_baseline"]

        with dg.DagsterInstance.from_config(str(project.home)) as instance:
            events = instance.fetch_materializations(dg.AssetKey("pretrain"), limit=1).records
            assert events and events[0].partition_key == "a"
            assert events[0].asset_materialization.metadata["mlflow_run_id"].value == summary["mlflow_run_id"]
            logs = [e.user_message for e in instance.all_logs(events[0].run_id)]
        assert sum(m.startswith("worker ") and "node " in m for m in logs) == 2, "the workers' placement is not in the run's log"
        assert any(m.startswith("step 60/60") for m in logs), "rank 0's progress is not in the run's log"

        client = MlflowClient(uri)
        mlrun = client.get_run(summary["mlflow_run_id"])
        assert mlrun.info.status == "FINISHED" and mlrun.data.params["cluster.workers"] == "2"
        assert mlrun.data.metrics["final_val_loss"] == pytest.approx(summary["final_val_loss"])
        assert "train/loss" in mlrun.data.metrics  # logged by rank 0 on the cluster, through the server
        assert list((tmp_path / "shared" / "mlflow").rglob("loss_curve.png")), "the artifact is not in the shared store"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    assert json.loads((project.artifacts / "pretrain/a/history.json").read_text())["val_losses"]
