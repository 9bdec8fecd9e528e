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
from lmforge.candidates import Candidate, base_model_dir, get, packed_dir, sources_in_use, tokenizer_dir
from lmforge.context import QUIET, RunContext
from lmforge.params import LmforgeError, Params
from lmforge.sources import link_or_copy, source_tags
from lmforge.stages import Out, Stage
from lmforge.tracking import artifact_location, lineage_tags, tracking_uri
from models.train_config import Scale


BASE_MODELS = Stage(
    "base_models", group="tokenizer",  # a base model brings its own tokenizer: packed needs it
    params=("paths.artifacts", "pretrain.candidates"),
    outs=(Out("", cache=False),),
    note="existing models named by candidates' `source`; the weights stay outside DVC's cache (they are\n"
         "derived from the source, whose sha256 is recorded in base_models/<name>/source.json)",
)
PRETRAIN = Stage(
    "pretrain", group="pretrain",
    params=("pretrain.train", "pretrain.scale", "pretrain.adapt", "pretrain.candidates", "cluster.workers"),
    reads=("packed", "tokenizer/hf", "base_models"),
    outs=("hf", Out("loss_curve.png", cache=False)),
    per_candidate=True,
    note="one stage per candidate of params.yaml (pretrain.candidates); a killed run resumes from the\n"
         "checkpoints under artifacts/pretrain/<name>/runs/, which DVC leaves in place",
)


def checkpoint_format(scale: Scale) -> str:
    """What a resume reads back: one file, or a directory of shards (FSDP's sharded state)."""
    sharded = scale.strategy == "fsdp2" or (scale.strategy == "fsdp" and scale.state_dict == "sharded")
    return "sharded" if sharded else "file"


def fingerprint(candidate: Candidate, params: Params) -> str:
    """What makes a run of this candidate the same run: the architecture or the exact base model, the
    training settings, the exact data and tokenizer, and the checkpoint format.

    Where it runs is left out (engine, devices, nodes, Ray workers): the checkpoints count the data
    consumed over all ranks, so a run resumed on another number of processes continues the same run.
    """
    h = hashlib.sha256()
    h.update(candidate.kind.encode())
    if candidate.arch is not None:
        h.update(json.dumps(dataclasses.asdict(candidate.arch), sort_keys=True).encode())
    else:
        h.update(base_record(params, candidate)["sha256"].encode())
    h.update(json.dumps(dataclasses.asdict(candidate.train), sort_keys=True).encode())
    h.update(checkpoint_format(params.pretrain.scale).encode())
    for path in (packed_dir(params, candidate.tokenizer) / "meta.json", tokenizer_dir(params, candidate.tokenizer) / "tokenizer.json"):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def base_record(params: Params, candidate: Candidate) -> dict[str, Any]:
    """``source.json`` of a pretrained candidate's base model (where it came from, its hash, licence)."""
    record = base_model_dir(params, candidate.tokenizer) / "source.json"
    if not record.is_file():
        raise LmforgeError(f"{record.parent} not found: materialize the 'base_models' stage first")
    return json.loads(record.read_text())


def run_base_models(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Materialize ``<artifacts>/base_models/<name>/`` for every distinct source of the candidates."""
    from lmforge.sources import materialize

    out = params.stage_dir("base_models")
    out.mkdir(parents=True, exist_ok=True)
    sources = sources_in_use(params)
    records = {slug: materialize(source, base_model_dir(params, slug), ctx.log) for slug, source in sources.items()}
    for stale in out.iterdir():  # models no candidate names any more
        if stale.is_dir() and stale.name not in records:
            shutil.rmtree(stale)
    summary = {"models": len(records), "sources": {slug: {k: r[k] for k in ("source", "kind", "sha256", "licence", "model_type", "context_window")}
                                                     for slug, r in records.items()}}
    write_summary(out, summary)
    return summary


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


def run_pretrain(params: Params, candidate: str, progress: bool = True, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Train (or resume) one candidate, or take an existing model as is; log it to MLflow; return its summary."""
    from pytorch_lightning.loggers import MLFlowLogger

    from models.training import launch, needs_launcher, pretrain, score_as_is

    cand = get(params, candidate, "pretrain")
    packed, tokenizer = packed_dir(params, cand.tokenizer), tokenizer_dir(params, cand.tokenizer)
    if not (packed / "meta.json").exists():
        raise LmforgeError(f"{packed} not found: materialize the 'packed' stage first")
    meta = json.loads((packed / "meta.json").read_text())
    if meta["splits"]["val"]["tokens"] == 0:
        raise LmforgeError("pretrain: the val split is empty (validation and the baseline check need it): raise split.val or add documents")
    if cand.arch is not None and meta["block_size"] > cand.arch.max_context:
        raise LmforgeError(
            f"tokenizer.block_size: blocks of {meta['block_size']} tokens are longer than candidate '{candidate}' "
            f"can attend to (max_context {cand.arch.max_context})"
        )
    record = base_record(params, cand) if cand.source is not None else None
    out = params.stage_dir("pretrain") / candidate
    run_key = fingerprint(cand, params)
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
    family = cand.arch.family if cand.arch is not None else record["model_type"]
    tags = {**lineage_tags(), "candidate": candidate, **ctx.tags(), "fingerprint": run_key, "family": family,
            "candidate_kind": cand.kind, "tokenizer": cand.tokenizer, **(source_tags(record) if record else {})}
    logger = MLFlowLogger(
        experiment_name=params.mlflow.experiment,
        run_name=candidate,
        tracking_uri=tracking_uri(params),
        tags=tags,
        artifact_location=artifact_location(params),
    )
    arch_params = {f"arch.{k}": v for k, v in dataclasses.asdict(cand.arch).items()} if cand.arch is not None else {"source": record["source"]}
    train, scale = cand.train, params.pretrain.scale
    on_ray = scale.engine == "ray" and cand.kind != "as_is"
    logger.log_hyperparams({"candidate": candidate, "kind": cand.kind, **arch_params,
                            **{f"train.{k}": v for k, v in dataclasses.asdict(cand.train).items()},
                            **{f"scale.{k}": v for k, v in dataclasses.asdict(scale).items()},
                            **({"cluster.workers": params.cluster.workers} if on_ray else {})})
    init_from = tokenizer if cand.kind == "adapt" else None  # a base model's directory holds weights and tokenizer
    if cand.kind == "as_is":
        ctx.log(f"pretrain {candidate}: {record['source']} as is (no training); scoring its validation batches")
    else:
        where = f"on {params.cluster.workers} Ray Train workers" if on_ray else "here"
        ctx.log(f"pretrain {candidate}: started {where} (progress at each validation; metrics in MLflow)")
    if cand.kind == "as_is":
        (work / "hf").mkdir()
        for path in tokenizer.iterdir():  # the base model's files, hard-linked: no second copy of the weights
            link_or_copy(path, work / "hf" / path.name)
        result = score_as_is(work / "hf", train, packed)
    elif on_ray:  # Ray Train workers on the cluster log into the MLflow run created here
        from lmforge.cluster import connected
        from models.ray_training import RaySettings, launch_on_ray

        c = params.cluster
        settings = RaySettings(workers=c.workers, use_gpu=c.use_gpu, resources_per_worker=c.resources_per_worker,
                               max_failures=c.max_failures, storage_path=c.storage or str(params.artifacts / "ray"),
                               name=f"pretrain-{candidate}-{run_key}-{logger.run_id[:8]}")
        with connected(c, ctx.log):
            result = launch_on_ray(cand.arch, train, packed, tokenizer, work, scale, settings, tracking_uri(params), logger.run_id,
                                   init_from=init_from, report=ctx.log)
    elif needs_launcher(scale):  # torchrun processes log into the MLflow run created here
        result = launch(cand.arch, train, packed, tokenizer, work, scale, tracking_uri(params), logger.run_id, init_from=init_from)
    else:
        result = pretrain(cand.arch, train, packed, tokenizer, work, scale, logger=logger, progress=progress, report=ctx.log, init_from=init_from)
    shutil.move(str(work / "hf"), str(out / "hf"))
    if record is not None:
        (out / "hf" / "source.json").unlink(missing_ok=True)  # the run's tags and summary carry it
    result["unigram_baseline"] = unigram_baseline(packed)
    history = {k: result.pop(k) for k in ("train_losses", "val_losses")}
    history["unigram_baseline"] = result["unigram_baseline"]
    (out / "history.json").write_text(json.dumps(history) + "\n")
    plot_losses(history, out / "loss_curve.png", f"{candidate} ({family}, {result['parameters']:,} parameters)")
    client, run_id = logger.experiment, logger.run_id
    client.log_artifact(run_id, str(out / "loss_curve.png"))
    for key in ("final_val_loss", "val_perplexity", "val_bits_per_byte", "val_token_accuracy", "val_top5_accuracy"):
        client.log_metric(run_id, key, result[key])
    client.log_metric(run_id, "unigram_baseline", result["unigram_baseline"])
    # a reference to the weights, not the weights: big models would time out an upload
    client.set_tag(run_id, "model_dir", str(out / "hf"))
    client.set_tag(run_id, "checkpoint_dir", str(work / "checkpoints"))
    client.set_terminated(run_id, "FINISHED")
    result.update(candidate=candidate, kind=cand.kind, tokenizer=cand.tokenizer, mlflow_run_id=run_id, fingerprint=run_key,
                  source=record and {k: record[k] for k in ("source", "kind", "sha256", "licence")})
    (work / "COMPLETE").touch()
    write_params(out, train)
    write_summary(out, result)
    ctx.log(f"pretrain {candidate}: val loss {result['final_val_loss']:.4f} (unigram {result['unigram_baseline']:.4f})")
    return result
