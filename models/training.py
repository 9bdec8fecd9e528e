"""``pretrain()``: one candidate architecture trained on the packed corpus with a Lightning Trainer.

Checkpoints are written every ``checkpoint_every`` steps, atomically (to a temporary name, then
renamed), so the newest file in the checkpoint directory is always complete; ``pretrain`` resumes
from it.  The final model is exported in Hugging Face format (safetensors) with its tokenizer.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from models.architectures import ArchConfig, SpecialIds, flops_per_token, flops_per_token_of, parameter_count
from models.lightning_module import LMModule, PackedDataModule, module_args
from models.loading import load_model
from models.metrics import LMScores, score, token_byte_lengths
from models.objectives import CausalCollator, MlmNspCollator, SpanCorruptionCollator
from models.train_config import Scale, TrainConfig

CHECKPOINT = re.compile(r"^step=(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """A killed process leaves at worst a ``.tmp`` file, never a truncated checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def newest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory``, if any.

    A file checkpoint is complete by construction (``AtomicCheckpointIO``); a sharded (distributed)
    checkpoint directory is complete once ``torch.distributed.checkpoint`` has written its
    ``.metadata``, which it does last.
    """
    found = [
        (int(m.group(1)), p)
        for p in directory.glob("step=*.ckpt")
        if (m := CHECKPOINT.match(p.name)) and (p.is_file() or (p / ".metadata").exists())
    ]
    return max(found)[1] if found else None


def ray_strategy_class(base: type) -> type:
    """``base`` (a Lightning strategy class) on the device Ray Train assigned to this worker."""
    import ray.train.torch

    class OnRayDevice(base):
        @property
        def root_device(self):
            return ray.train.torch.get_device()

    OnRayDevice.__name__ = base.__name__  # export() and the logs name the strategy by its class
    return OnRayDevice


def make_strategy(scale: Scale, module: LMModule, ray_world: int = 0):
    """The Lightning strategy for ``scale.strategy``; FSDP wraps each transformer block.

    ``ray_world`` > 0: this process is one of that many Ray Train workers (``models.ray_training``),
    each with one device.  Ray, not Lightning, made the processes and the process group, and gave the
    worker its device; Lightning's own strategies would pick the device by local rank among the
    devices they see, which on a node with several workers is not the worker's.
    """
    if scale.strategy == "fsdp2":
        from pytorch_lightning.strategies import ModelParallelStrategy

        world = ray_world or (scale.devices * scale.num_nodes if scale.devices > 0 else "auto")
        cls = ray_strategy_class(ModelParallelStrategy) if ray_world else ModelParallelStrategy
        return cls(data_parallel_size=world, tensor_parallel_size=1)
    if scale.strategy == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        names = set(getattr(module.model, "_no_split_modules", None) or [])
        blocks = {type(m) for m in module.model.modules() if type(m).__name__ in names}
        cls = ray_strategy_class(FSDPStrategy) if ray_world else FSDPStrategy
        return cls(
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if scale.activation_checkpointing else None,
            state_dict_type=scale.state_dict,
        )
    if ray_world:  # auto or ddp: data parallel over the workers
        from pytorch_lightning.strategies import DDPStrategy

        return ray_strategy_class(DDPStrategy)()
    return scale.strategy


@torch.no_grad()
def validation_scores(module: LMModule, data: PackedDataModule, tokenizer, objective: str) -> LMScores:
    """Perplexity, bits per byte and accuracies of the trained model on the validation batches."""
    byte_lengths = token_byte_lengths(tokenizer)
    total = LMScores()
    module.eval()
    for batch in data.val_dataloader():
        batch = {k: v.to(module.device) for k, v in batch.items()}
        out = module.model(**batch)
        logits = out.prediction_logits if objective == "mlm" else out.logits  # BERT: MLM head's logits
        total += score(logits, batch["labels"], byte_lengths, shift=objective == "causal")
    return total


def export(module: LMModule, trainer: pl.Trainer, tokenizer, hf_dir: Path) -> None:
    """Save the model in Hugging Face format (safetensors), gathering shards first if sharded."""
    state = None
    if trainer.strategy.__class__.__name__ in ("ModelParallelStrategy", "FSDPStrategy"):  # also on one device: DTensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # a collective: every rank takes part, rank 0 receives the full tensors on CPU
        state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        module.model.save_pretrained(str(hf_dir), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(hf_dir))
    trainer.strategy.barrier()


@dataclass
class History(pl.Callback):
    """Losses and throughput as training goes, for the summary, MLflow and the loss plot."""

    tokens_per_step: int = 0  # per process
    flops_per_token: int = 0
    peak_flops: float = 0.0
    report: Any = None  # called with a progress line at each validation (the Dagster run log)
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)
    _last: float | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        now = time.perf_counter()
        if self._last is not None:
            speed = self.tokens_per_step * trainer.world_size / (now - self._last)  # all processes
            self.speeds.append(speed)
            module.log("train/tokens_per_second", speed)
            if self.peak_flops:
                module.log("train/mfu", speed * self.flops_per_token / (self.peak_flops * trainer.world_size))
        self._last = now
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train.append((trainer.global_step, float(loss)))
        module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_epoch_end(self, trainer, module) -> None:
        value = trainer.callback_metrics.get("val/loss")
        # during fit only: the final trainer.validate() is the summary's final_val_loss, not a new point
        if value is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.val.append((trainer.global_step, float(value)))
            module.log("val/perplexity", torch.exp(value.detach().float()))
            if self.report is not None and trainer.is_global_zero:
                train_loss = self.train[-1][1] if self.train else float("nan")
                self.report(
                    f"step {trainer.global_step}/{trainer.max_steps}: train loss {train_loss:.4f}, "
                    f"val loss {float(value):.4f}, {self.tokens_per_second():,.0f} tokens/s"
                )
        self._last = None  # validation time is not training time

    def tokens_per_second(self) -> float:
        return sum(self.speeds) / len(self.speeds) if self.speeds else 0.0


class StepPruning(pl.Callback):
    """Report each validation loss to an Optuna trial, at its training step, and stop the trial when
    the study's pruner says its curve is below the others' (``optuna.TrialPruned`` ends ``fit``); a
    trial at its last step completes.

    Optuna's own ``PyTorchLightningPruningCallback`` does this per epoch and for the ``lightning``
    package; lmforge trains by steps inside one epoch (``val_every``) with ``pytorch_lightning``, so
    its reports would all land on step 0, and its import would fail."""

    def __init__(self, trial: Any, monitor: str = "val/loss") -> None:
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer, module) -> None:
        import optuna

        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.trial.report(float(value), step=trainer.global_step)
        if trainer.global_step < trainer.max_steps and self.trial.should_prune():  # a finished trial completes
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step}: {self.monitor} {float(value):.4f}")


def special_ids(tokenizer) -> SpecialIds:
    return SpecialIds(pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in order (T5 span corruption)."""
    vocab = tokenizer.get_vocab()
    found = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := re.fullmatch(r"<extra_id_(\d+)>", t)))
    return [i for _, i in found]


def collator_for(objective: str, tokenizer, seed: int, pad_id: int | None = None):
    """The collator of an objective; ``pad_id``: the packed data's padding (default: the tokenizer's)."""
    if objective == "mlm":
        return MlmNspCollator(tokenizer, seed=seed)
    if objective == "seq2seq":
        return SpanCorruptionCollator(sentinel_ids(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=seed)
    return CausalCollator(tokenizer.pad_token_id if pad_id is None else pad_id)


def pretrain(
    arch: ArchConfig | None,
    cfg: TrainConfig,
    packed_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    scale: Scale | None = None,
    logger: Any = None,
    progress: bool = True,
    report: Any = None,
    init_from: Path | None = None,
    ray_world: int = 0,
    callbacks: list[pl.Callback] | None = None,
) -> dict[str, Any]:
    """Train (or resume) ``arch`` from scratch, or the causal model in ``init_from`` further, on
    ``packed_dir``; export to ``out_dir/hf``; return the summary.  ``report`` (e.g. a Dagster
    logger's ``info``) receives a progress line at each validation.  ``ray_world`` > 0: this process
    is a Ray Train worker of a group of that size (``models.ray_training``).  ``callbacks``: more
    Lightning callbacks (a search trial's ``StepPruning``)."""
    import json

    from transformers import AutoTokenizer

    scale = scale or Scale()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    meta = json.loads((Path(packed_dir) / "meta.json").read_text())
    block_size = meta["block_size"]
    if arch is not None:
        arch = arch.replace(vocab_size=len(tokenizer))
    module = LMModule(**module_args(arch, special_ids(tokenizer), cfg, block_size, str(init_from) if init_from else None))
    config = module.model.config
    objective = arch.objective if arch is not None else "causal"
    context = arch.max_context if arch is not None else getattr(config, "max_position_embeddings", None)
    if context is not None and block_size > context:
        raise ValueError(f"tokenizer.block_size: {block_size} is longer than the model's context {context}")
    data = PackedDataModule(packed_dir, collator_for(objective, tokenizer, cfg.seed, meta["pad_id"]), cfg)
    if arch is not None:
        n_params = parameter_count(arch)
        flops = flops_per_token(arch, n_params)
    else:
        n_params = sum(p.numel() for p in module.model.parameters())
        flops = flops_per_token_of(config, n_params, block_size)
    history = History(cfg.batch_size * cfg.accumulate * block_size, flops, scale.peak_tflops * 1e12, report)
    ckpt_dir = out_dir / "checkpoints"
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir, filename="step={step}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every, save_top_k=2, monitor="step", mode="max",
    )
    callbacks = [checkpoints, history, *(callbacks or [])]
    if cfg.early_stopping_patience:
        callbacks.append(pl.callbacks.EarlyStopping("val/loss", patience=cfg.early_stopping_patience, mode="min"))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if ray_world:
        from ray.train.lightning import RayLightningEnvironment

        plugins.append(RayLightningEnvironment())  # ranks and world size from Ray Train
    trainer = pl.Trainer(
        max_steps=cfg.max_steps,  # and train.max_minutes: LMModule stops at its time budget
        accelerator=scale.accelerator,
        devices=1 if ray_world else scale.devices,  # a Ray worker has one device
        num_nodes=1 if ray_world else scale.num_nodes,
        strategy=make_strategy(scale, module, ray_world),
        precision=cfg.precision,
        gradient_clip_val=cfg.grad_clip or None,
        accumulate_grad_batches=cfg.accumulate,
        val_check_interval=cfg.val_every * cfg.accumulate,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=plugins,
        enable_progress_bar=progress,
        enable_model_summary=False,
        use_distributed_sampler=False,  # StreamSampler shards the stream by rank itself (and resumes)
    )
    resume = newest_checkpoint(ckpt_dir)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    final_val = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    export(module, trainer, tokenizer, out_dir / "hf")
    with trainer.precision_plugin.forward_context():  # FSDP bf16-mixed: bf16 compute weights, autocast inputs
        val = validation_scores(module, data, tokenizer, objective)
    return {
        "family": arch.family if arch is not None else config.model_type,
        "objective": objective,
        "parameters": n_params,
        "flops_per_token": history.flops_per_token,
        "steps": trainer.global_step,
        "tokens_seen": trainer.global_step * cfg.batch_size * cfg.accumulate * trainer.world_size * block_size,
        "tokens_per_second": round(history.tokens_per_second(), 1),
        "final_train_loss": history.train[-1][1] if history.train else None,
        "final_val_loss": float(final_val),
        "val_perplexity": val.perplexity,
        "val_bits_per_byte": val.bits_per_byte,
        "val_token_accuracy": val.token_accuracy,
        "val_top5_accuracy": val.top5_accuracy,
        "resumed_from_step": int(CHECKPOINT.match(resume.name).group(1)) if resume else None,
        "final_lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
        "stopped_by_budget": module.budget_fraction >= 1.0,
        "train_losses": history.train,
        "val_losses": [v for v in history.val if v[0] != trainer.global_step] + [(trainer.global_step, float(final_val))],
    }


@torch.no_grad()
def score_as_is(model_dir: Path, cfg: TrainConfig, packed_dir: Path) -> dict[str, Any]:
    """The summary ``pretrain`` gives, for an existing causal model used without training: its
    scores on the same validation batches a training run validates on."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_model(str(model_dir), "causal", dtype=torch.float32).eval()
    meta = json.loads((Path(packed_dir) / "meta.json").read_text())
    data = PackedDataModule(packed_dir, collator_for("causal", tokenizer, cfg.seed, meta["pad_id"]), cfg)
    data.setup()
    byte_lengths = token_byte_lengths(tokenizer)
    val = LMScores()
    for batch in data.val_dataloader():
        val += score(model(**batch).logits, batch["labels"], byte_lengths, shift=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "family": model.config.model_type, "objective": "causal", "parameters": n_params,
        "flops_per_token": flops_per_token_of(model.config, n_params, meta["block_size"]),
        "steps": 0, "tokens_seen": 0, "tokens_per_second": None, "final_train_loss": None,
        "final_val_loss": val.loss, "val_perplexity": val.perplexity, "val_bits_per_byte": val.bits_per_byte,
        "val_token_accuracy": val.token_accuracy, "val_top5_accuracy": val.top5_accuracy, "resumed_from_step": None,
        "train_losses": [], "val_losses": [(0, val.loss)],
    }


def weights_finite(model_dir: Path) -> bool:
    """True if no tensor of the exported safetensors holds NaN or infinity."""
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for f in sorted(Path(model_dir).glob("*.safetensors")) for t in load_file(f).values())


def launch(arch: ArchConfig | None, cfg: TrainConfig, packed_dir: Path, tokenizer_dir: Path, out_dir: Path, scale: Scale,
           mlflow_uri: str | None = None, mlflow_run_id: str | None = None, init_from: Path | None = None) -> dict[str, Any]:
    """Run ``pretrain`` in ``scale.devices`` processes on this node with torchrun, wait, return rank 0's
    result.  (Several nodes: run the same torchrun command on each node, docs/training-and-scaling.md.)"""
    import json
    import subprocess
    import sys
    from dataclasses import asdict

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={scale.devices}",
        "-m", "models.training",
        "--arch", json.dumps(asdict(arch) if arch is not None else None), "--train", json.dumps(asdict(cfg)), "--scale", json.dumps(asdict(scale)),
        "--packed", str(packed_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out_dir),
    ]
    if mlflow_uri and mlflow_run_id:
        command += ["--mlflow-uri", mlflow_uri, "--mlflow-run-id", mlflow_run_id]
    if init_from is not None:
        command += ["--init-from", str(init_from)]
    (out_dir / "result.json").unlink(missing_ok=True)
    proc = subprocess.run(command, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}); its log is above")
    return json.loads((out_dir / "result.json").read_text())


def needs_launcher(scale: Scale) -> bool:
    """Several processes on this node: Lightning must not re-launch the caller (Dagster, pytest)."""
    return scale.devices > 1 or scale.strategy == "fsdp2"


def main() -> None:
    """Entry point for multi-process runs (``torchrun --nproc_per_node N -m models.training ...``):
    each process trains its shard; rank 0 writes ``result.json`` beside the exported model."""
    import argparse
    import json

    from models.architectures import ArchConfig

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", required=True, help="ArchConfig as JSON (null with --init-from)")
    parser.add_argument("--train", required=True, help="TrainConfig as JSON")
    parser.add_argument("--scale", required=True, help="Scale as JSON")
    parser.add_argument("--packed", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mlflow-uri", help="log to this MLflow tracking URI ...")
    parser.add_argument("--mlflow-run-id", help="... into this existing run (created by the caller)")
    parser.add_argument("--init-from", type=Path, help="a Hugging Face causal model directory to train further")
    args = parser.parse_args()
    logger = None
    if args.mlflow_uri and args.mlflow_run_id:
        from pytorch_lightning.loggers import MLFlowLogger

        logger = MLFlowLogger(tracking_uri=args.mlflow_uri, run_id=args.mlflow_run_id)
    arch = json.loads(args.arch)
    result = pretrain(
        ArchConfig(**arch) if arch is not None else None, TrainConfig(**json.loads(args.train)), args.packed, args.tokenizer,
        args.out, Scale(**json.loads(args.scale)), logger=logger, progress=False, init_from=args.init_from,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        (args.out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
