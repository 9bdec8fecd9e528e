"""Stage ``pretrain``: one candidate architecture trained on the packed corpus, tracked in MLflow.

Output ``<artifacts>/pretrain/<candidate>/``: ``hf/`` (the model in Hugging Face format with its
tokenizer), ``runs/<fingerprint>/checkpoints/`` (resumable training state), ``loss_curve.png``,
``history.json`` and ``summary.json``.  The fingerprint hashes the architecture, the training settings
and the exact data and tokenizer, so a materialisation resumes only a run of the same configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.artifacts import write_params, write_summary
from lmforge.params import REPO_ROOT, LmforgeError, Params
from lmforge.tracking import lineage_tags, tracking_uri
from lmforge.vocabulary import candidate_configs


def fingerprint(arch, params: Params) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(arch), sort_keys=True).encode())
    h.update(json.dumps(dataclasses.asdict(params.pretrain.train), sort_keys=True).encode())
    h.update(json.dumps(dataclasses.asdict(params.pretrain.scale), sort_keys=True).encode())
    for path in (params.stage_dir("packed") / "meta.json", params.stage_dir("tokenizer") / "hf" / "tokenizer.json"):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def unigram_baseline(packed_dir: Path) -> float:
    """Cross-entropy (nats/token) of val under the train split's unigram distribution (add-one):
    the loss of a model that ignores context.  A trained model must beat it."""
    meta = json.loads((packed_dir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])

    def counts(split: str) -> np.ndarray:
        tokens = np.memmap(packed_dir / f"{split}.bin", dtype=dtype, mode="r")[: meta["splits"][split]["tokens"]]
        return np.bincount(tokens, minlength=meta["vocab_size"]).astype(np.float64)

    train, val = counts("train"), counts("val")
    if val.sum() == 0:
        return float("nan")
    log_p = np.log((train + 1) / (train.sum() + len(train)))
    return float(-(val * log_p).sum() / val.sum())


def plot_losses(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history["train_losses"]:
        ax.plot(*zip(*history["train_losses"]), label="train", linewidth=1)
    if history["val_losses"]:
        ax.plot(*zip(*history["val_losses"]), "o-", label="val")
    ax.axhline(history["unigram_baseline"], linestyle="--", color="grey", label="unigram baseline")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_pretrain(params: Params, candidate: str, dagster_run_id: str = "", progress: bool = True, report=None) -> dict[str, Any]:
    """Train (or resume) one candidate; log it to MLflow; return its summary."""
    from pytorch_lightning.loggers import MLFlowLogger

    from models.training import launch, needs_launcher, pretrain

    configs = candidate_configs(params)
    if candidate not in configs:
        raise LmforgeError(f"pretrain: no candidate '{candidate}' (candidates: {', '.join(configs)})")
    arch = configs[candidate]
    packed, tokenizer = params.stage_dir("packed"), params.stage_dir("tokenizer") / "hf"
    if not (packed / "meta.json").exists():
        raise LmforgeError(f"{packed} not found: materialize the 'packed' stage first")
    meta = json.loads((packed / "meta.json").read_text())
    if meta["splits"]["val"]["tokens"] == 0:
        raise LmforgeError("pretrain: the val split is empty (validation and the baseline check need it): raise split.val or add documents")
    if meta["block_size"] > arch.max_context:
        raise LmforgeError(
            f"tokenizer.block_size: blocks of {meta['block_size']} tokens are longer than candidate '{candidate}' "
            f"can attend to (max_context {arch.max_context})"
        )
    out = params.stage_dir("pretrain") / candidate
    run_key = fingerprint(arch, params)
    runs = out / "runs"
    if runs.exists():  # checkpoints of another configuration cannot be resumed: drop them
        for stale in runs.iterdir():
            if stale.name != run_key:
                shutil.rmtree(stale)
    work = runs / run_key
    if (work / "COMPLETE").exists():  # a finished run materialized again: train anew, do not "resume" it
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if (out / "hf").exists():
        shutil.rmtree(out / "hf")
    tags = {**lineage_tags(), "candidate": candidate, "dagster_run_id": dagster_run_id, "fingerprint": run_key, "family": arch.family}
    logger = MLFlowLogger(
        experiment_name=params.mlflow.experiment,
        run_name=candidate,
        tracking_uri=tracking_uri(params),
        tags=tags,
        artifact_location=(REPO_ROOT / "mlflow" / "artifacts").as_uri(),
    )
    logger.log_hyperparams({"candidate": candidate, **{f"arch.{k}": v for k, v in dataclasses.asdict(arch).items()},
                            **{f"train.{k}": v for k, v in dataclasses.asdict(params.pretrain.train).items()},
                            **{f"scale.{k}": v for k, v in dataclasses.asdict(params.pretrain.scale).items()}})
    train, scale = params.pretrain.train, params.pretrain.scale
    if needs_launcher(scale):  # torchrun processes log into the MLflow run created here
        result = launch(arch, train, packed, tokenizer, work, scale, tracking_uri(params), logger.run_id)
    else:
        result = pretrain(arch, train, packed, tokenizer, work, scale, logger=logger, progress=progress, report=report)
    shutil.move(str(work / "hf"), str(out / "hf"))
    result["unigram_baseline"] = unigram_baseline(packed)
    history = {k: result.pop(k) for k in ("train_losses", "val_losses")}
    history["unigram_baseline"] = result["unigram_baseline"]
    (out / "history.json").write_text(json.dumps(history) + "\n")
    plot_losses(history, out / "loss_curve.png", f"{candidate} ({arch.family}, {result['parameters']:,} parameters)")
    client, run_id = logger.experiment, logger.run_id
    client.log_artifact(run_id, str(out / "loss_curve.png"))
    for key in ("final_val_loss", "val_perplexity", "val_bits_per_byte", "val_token_accuracy", "val_top5_accuracy"):
        client.log_metric(run_id, key, result[key])
    client.log_metric(run_id, "unigram_baseline", result["unigram_baseline"])
    # a reference to the weights, not the weights: big models would time out an upload
    client.set_tag(run_id, "model_dir", str(out / "hf"))
    client.set_tag(run_id, "checkpoint_dir", str(work / "checkpoints"))
    client.set_terminated(run_id, "FINISHED")
    result.update(candidate=candidate, mlflow_run_id=run_id, fingerprint=run_key)
    (work / "COMPLETE").touch()
    write_params(out, params.pretrain.train)
    write_summary(out, result)
    return result
