"""``launch_on_ray()``: the same ``pretrain()`` run by Ray Train workers across a Ray cluster.

Ray Train's ``TorchTrainer`` starts one worker process per ``ScalingConfig`` slot on whatever nodes
have the resources, joins them in one torch process group (gloo on CPUs, NCCL on GPUs) and calls
``_train_worker`` in each; that calls the very ``pretrain()`` a laptop runs, with Lightning told by
``RayLightningEnvironment`` which rank it is.  When a worker or its node dies, Ray tears the group
down and starts it again (``FailureConfig.max_failures`` times), and ``pretrain()`` resumes from the
newest complete checkpoint in ``out_dir/checkpoints``, which therefore has to be on storage that
every node reaches.  Each worker reads only its own contiguous share of the train blocks
(``models.lightning_module.rank_share``), so a node streams one slice of the packed file.  The number
of workers may differ from one attempt or run to the next: the checkpoint holds the position in the
data stream counted over all ranks, not per rank.

The calling process is the Ray driver.  Rank 0's progress lines (one per validation) travel back to
it through a Ray queue and go to ``report`` (the Dagster run log); the metrics go to MLflow from rank 0
directly, as with torchrun.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.architectures import ArchConfig
from models.train_config import Scale, TrainConfig


@dataclass
class RaySettings:
    """How many Ray Train workers, with what, and where Ray keeps its run state."""

    workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    max_failures: int = 3
    storage_path: str = ""  # Ray Train's run storage (a shared path or s3://...); "": Ray's default
    name: str = "lmforge-pretrain"  # the run's directory under storage_path


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: ``pretrain()`` on its share of the train blocks; rank 0 writes ``result.json``.
    Each worker first says where it runs and which blocks it reads (the run log shows the placement,
    and any restart)."""
    import ray
    import ray.train

    from models.data import PackedBlocks
    from models.lightning_module import rank_share
    from models.training import pretrain

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    progress = config["progress"]
    node = ray.get_runtime_context().get_node_id()
    share = rank_share(len(PackedBlocks(Path(config["packed"]), "train")), rank, world)
    progress.put(f"worker {rank}/{world}: node {node[:12]} ({ray.util.get_node_ip_address()}), "
                 f"train blocks {share.start}-{share.stop - 1}, pid {os.getpid()}")
    logger = None
    if config["mlflow_uri"] and config["mlflow_run_id"]:
        from pytorch_lightning.loggers import MLFlowLogger

        logger = MLFlowLogger(tracking_uri=config["mlflow_uri"], run_id=config["mlflow_run_id"])
    out = Path(config["out"])
    result = pretrain(
        ArchConfig(**config["arch"]) if config["arch"] is not None else None,
        TrainConfig(**config["train"]),
        Path(config["packed"]),
        Path(config["tokenizer"]),
        out,
        Scale(**config["scale"]),
        logger=logger,
        progress=False,
        report=progress.put if rank == 0 else None,
        init_from=Path(config["init_from"]) if config["init_from"] else None,
        ray_world=world,
    )
    if rank == 0:
        (out / "result.json").write_text(json.dumps({**result, "workers": world}))


def short_of(settings: RaySettings) -> str:
    """What the cluster lacks for the worker group, if anything: "" when it has enough.  Ray Train then
    waits, silently, for nodes to join (what an autoscaler provides), so the caller should say so."""
    import ray

    need = {name: amount * settings.workers for name, amount in settings.resources_per_worker.items()}
    if settings.use_gpu:
        need["GPU"] = max(need.get("GPU", 0), settings.workers)
    have = ray.cluster_resources()
    return ", ".join(f"{need[name]:g} {name} (the cluster has {have.get(name, 0):g})" for name in sorted(need) if have.get(name, 0) < need[name])


def launch_on_ray(
    arch: ArchConfig | None,
    cfg: TrainConfig,
    packed_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    scale: Scale,
    settings: RaySettings,
    mlflow_uri: str | None = None,
    mlflow_run_id: str | None = None,
    init_from: Path | None = None,
    report: Any = None,
) -> dict[str, Any]:
    """Train on ``settings.workers`` Ray Train workers of the cluster this process is connected to
    (``ray.init``), wait, and return rank 0's result.  Raises ``RuntimeError`` once the run has failed
    more than ``settings.max_failures`` times."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from models.data import PackedBlocks
    from models.lightning_module import rank_share

    rank_share(len(PackedBlocks(packed_dir, "train")), 0, settings.workers)  # too few blocks: one error here, not a retried one per worker
    progress = Queue(actor_options={"num_cpus": 0})  # rank 0 → this process; outlives worker restarts
    say = report or print
    config = {
        "arch": asdict(arch) if arch is not None else None, "train": asdict(cfg), "scale": asdict(scale),
        "packed": str(packed_dir), "tokenizer": str(tokenizer_dir), "out": str(out_dir),
        "init_from": str(init_from) if init_from else None,
        "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id, "progress": progress,
    }
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=settings.resources_per_worker),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=RunConfig(name=settings.name, storage_path=settings.storage_path or None,
                             failure_config=FailureConfig(max_failures=settings.max_failures)),
    )
    done = threading.Event()

    def relay() -> None:  # progress lines as they come, until the run is over and the queue empty
        while not (done.is_set() and progress.empty()):
            try:
                say(progress.get(timeout=0.5))
            except Empty:
                pass

    if short := short_of(settings):
        say(f"waiting for resources: {settings.workers} workers need {short}; Ray starts them when nodes join "
            "(an autoscaler); otherwise stop the run and lower cluster.workers or cluster.resources_per_worker")
    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    (out_dir / "result.json").unlink(missing_ok=True)
    try:
        trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and the errors of the workers it wraps
        raise RuntimeError(f"training on Ray failed after {settings.max_failures} restart(s) at most: {exc}") from exc
    finally:
        done.set()
        relay_thread.join(timeout=10)
        progress.shutdown()
    return json.loads((out_dir / "result.json").read_text())
