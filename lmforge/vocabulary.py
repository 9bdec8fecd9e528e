"""Stages ``tokenizer`` and ``packed``: train the vocabulary on the train split, measure it on val,
then tokenize and pack every split.  Library work is in ``models.tokenizer`` and ``models.data``."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from lmforge.artifacts import fresh_dir, load_dataset_dir, worker_friendly_signals, write_params, write_summary
from lmforge.candidates import TRAINED, packed_dir, scratch_archs, tokenizer_dir, tokenizers_in_use
from lmforge.cluster import connected
from lmforge.context import QUIET, RunContext
from lmforge.params import LmforgeError, Params
from lmforge.split import SPLITS
from lmforge.stages import Out, Stage


TOKENIZER = Stage(
    "tokenizer", group="tokenizer",
    params=("paths.artifacts", "tokenizer.algorithm", "tokenizer.vocab_size", "tokenizer.min_frequency", "tokenizer.sample_documents",
            "tokenizer.sample_seed", "tokenizer.normalizer",
            "tokenizer.extra_ids", "tokenizer.max_unk_rate", "tokenizer.block_size", "pretrain.candidates"),
    reads=("split/train", "split/val"),
    outs=("hf", Out("params.json", cache=False)),
    engines=("local", "ray"),  # the sample of tokenizer.sample_documents is drawn on the cluster
)
PACKED = Stage(
    "packed", group="tokenizer",
    params=("paths.artifacts", "tokenizer", "pretrain.candidates"),
    reads=("split/train", "split/val", "split/test", "tokenizer/hf", "base_models"),
    outs=("",),
    engines=("local", "ray"),
    note="packed/<tokenizer>/{train,val,test}.bin and meta.json, one folder per tokenizer (summary.json,\n"
         "inside it, is listed under metrics at the top)",
)


def text_batches(ds, size: int = 1000) -> Iterator[list[str]]:
    """Texts of a dataset in lists of ``size``, read from the memory-mapped Arrow table."""
    for batch in ds.data.select(["text"]).to_batches(max_chunksize=size):
        yield batch.column(0).to_pylist()


def sample_keys(ids: list[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random key per document id.  The sample is the documents with the smallest keys
    (ties by corpus position): a choice that depends neither on the engine nor on the order in which
    the rows are read, so the Ray engine's tasks draw the local engine's sample."""
    digest = (hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in ids)
    return np.fromiter((int.from_bytes(d, "little") for d in digest), dtype=np.uint64, count=len(ids))


def training_texts(params: Params, train, ctx: RunContext) -> tuple[Iterator[str], int]:
    """The texts the vocabulary is trained on, in corpus order, and how many: the whole train split
    (streamed), or a seeded sample of ``tokenizer.sample_documents`` of it (drawn on the cluster with
    ``cluster.data_engine: ray``)."""
    p = params.tokenizer
    if not p.sample_documents or p.sample_documents >= len(train):
        return (t for batch in text_batches(train) for t in batch), len(train)
    if TOKENIZER.engine(params.cluster.data_engine) == "ray":
        from lmforge import ray_data

        with connected(params.cluster, ctx.log):
            texts = ray_data.sample_texts(params.stage_dir("split") / "train", sample_keys, {"seed": p.sample_seed},
                                          p.sample_documents, ctx.log)
    else:
        keys = sample_keys(train.data.column("id").to_pylist(), p.sample_seed)
        rows = np.sort(np.lexsort((np.arange(len(keys)), keys))[: p.sample_documents])
        texts = train.data.column("text").take(rows).to_pylist()
    return iter(texts), len(texts)


def run_tokenizer(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Materialize ``<artifacts>/tokenizer``: ``hf/`` (AutoTokenizer directory), ``summary.json``."""
    from models.tokenizer import TokenizerSpec, measure, to_transformers, train_tokenizer

    p = params.tokenizer
    configs = scratch_archs(params)
    objectives = tuple(dict.fromkeys(cfg.objective for cfg in configs.values())) or ("causal",)
    spec = TokenizerSpec(p.algorithm, p.vocab_size, p.min_frequency, p.normalizer, objectives, p.extra_ids)
    split_dir = params.stage_dir("split")
    train = load_dataset_dir(split_dir / "train", "split")
    if len(train) == 0:
        raise LmforgeError("tokenizer: the train split is empty; add documents or lower split.val/test")
    out = fresh_dir(params.stage_dir("tokenizer"))
    start = time.perf_counter()
    texts, documents = training_texts(params, train, ctx)
    tok = train_tokenizer(texts, spec, length=documents)
    seconds = time.perf_counter() - start
    context = max([cfg.max_context for cfg in configs.values()] + [p.block_size])
    hf = to_transformers(tok, spec, model_max_length=context)
    hf.save_pretrained(str(out / "hf"))
    val = load_dataset_dir(split_dir / "val", "split")
    measured_on = "val" if len(val) else "train"
    metrics = measure(tok, text_batches(val if len(val) else train), tok.token_to_id(spec.roles().get("unk", "")) if "unk" in spec.roles() else None)
    sample = next(iter(text_batches(val if len(val) else train, 1)))[0][:300]
    summary = {
        "algorithm": p.algorithm,
        "objectives": list(objectives),
        "vocab_size": tok.get_vocab_size(),
        "fertility": round(metrics.fertility, 4),
        "bytes_per_token": round(metrics.bytes_per_token, 4),
        "unk_rate": round(metrics.unk_rate, 6),
        "round_trip_rate": round(metrics.round_trip_rate, 6),
        "measured_on": measured_on,
        "measured_documents": metrics.documents,
        "training_documents": documents,
        "training_seconds": round(seconds, 2),
        "special_tokens": spec.roles(),
        "sample_text": sample,
        # each token decoded on its own, so byte-level symbols (Ġ for a space) read as text
        "sample_tokens": [tok.decode([i]) for i in tok.encode(sample, add_special_tokens=False).ids],
    }
    write_params(out, p)
    write_summary(out, summary)
    ctx.log(f"tokenizer: {summary['algorithm']} vocab {summary['vocab_size']}, fertility {summary['fertility']}, "
            f"{summary['bytes_per_token']} bytes/token, UNK rate {summary['unk_rate']}")
    return summary


def run_pack(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Materialize ``<artifacts>/packed/<tokenizer>/`` for every tokenizer a candidate reads (the trained
    one for scratch candidates, each pretrained model's own): ``<split>.bin`` token arrays and
    ``meta.json``; one ``summary.json`` (the first tokenizer's counts flat, every tokenizer's nested).

    On the Ray engine (``cluster.data_engine: ray``) the tokenizing runs in Ray tasks, which write
    parts of each token file and then copy them into it at their offsets: the same bytes."""
    out = fresh_dir(params.stage_dir("packed"))
    on_ray = PACKED.engine(params.cluster.data_engine) == "ray"
    with connected(params.cluster, ctx.log) if on_ray else contextlib.nullcontext():
        per_tokenizer = _pack_all(params, ctx, on_ray)
    first = next(iter(per_tokenizer.values()))
    summary = {"block_size": params.tokenizer.block_size, "tokenizers": list(per_tokenizer), **first, "by_tokenizer": per_tokenizer}
    write_params(out, params.tokenizer)
    write_summary(out, summary)
    ctx.log(f"packed: {summary['train_tokens']} train tokens in {summary['train_blocks']} blocks of {summary['block_size']}")
    return summary


def _pack_all(params: Params, ctx: RunContext, on_ray: bool) -> dict[str, dict[str, Any]]:
    """Every split packed with every tokenizer in use: ``{tokenizer: counts}``; by Ray tasks ``on_ray``."""
    from transformers import AutoTokenizer

    from models.data import pack_split, token_dtype, write_meta

    p = params.tokenizer
    per_tokenizer = {}
    for name in tokenizers_in_use(params):
        tok_dir = tokenizer_dir(params, name)
        if not (tok_dir / "tokenizer.json").exists():
            stage = "tokenizer" if name == TRAINED else "base_models"
            raise LmforgeError(f"{tok_dir} has no tokenizer.json: materialize the '{stage}' stage first")
        hf = AutoTokenizer.from_pretrained(str(tok_dir))
        separator = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id  # between documents
        pad = hf.pad_token_id if hf.pad_token_id is not None else separator  # only fills the last block
        try:
            dtype = token_dtype(len(hf), p.dtype)
        except ValueError as exc:
            raise LmforgeError(str(exc)) from None
        target = packed_dir(params, name)
        target.mkdir(parents=True)
        splits = {}
        for split in SPLITS:
            split_dir = params.stage_dir("split") / split
            ds = load_dataset_dir(split_dir, "split")
            bin_file = target / f"{split}.bin"
            if on_ray:
                from lmforge import ray_data

                splits[split] = ray_data.pack_split(split_dir, tok_dir / "tokenizer.json", separator, pad, p.block_size, dtype, bin_file, ctx.log)
            else:
                with worker_friendly_signals():
                    splits[split] = pack_split(ds, tok_dir / "tokenizer.json", separator, pad, p.block_size, dtype, bin_file, p.num_proc)
        write_meta(target, {"block_size": p.block_size, "dtype": dtype.name, "pad_id": pad, "separator_id": separator,
                            "vocab_size": len(hf), "tokenizer": name, "splits": splits})
        per_tokenizer[name] = {"dtype": dtype.name, **{f"{n}_{k}": v for n, s in splits.items() for k, v in s.items()}}
    return per_tokenizer
