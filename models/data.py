"""Packed token datasets: every document tokenized, separated, concatenated and cut into blocks.

On disk a split is one flat array of token ids (``<split>.bin``, ``numpy`` raw, dtype sized to the
vocabulary) plus its shape in ``meta.json``; training memory-maps it and reads block ``i`` as
``tokens[i * block_size : (i + 1) * block_size]``.  Packing streams Arrow record batches into the
file, so memory is flat in corpus size, and loses no token: the last block is completed with padding
and ``tokens`` records how many real tokens there are.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The smallest unsigned dtype holding every id, or the requested one if it fits."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    dtype = np.dtype(requested)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"tokenizer.dtype: {requested} holds ids below {np.iinfo(dtype).max + 1}, but vocab_size is {vocab_size}")
    return dtype


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _encode_batch(batch: dict[str, list], tokenizer_file: str, separator: int) -> dict[str, list]:
    """Worker: token ids of each document followed by the document separator."""
    encodings = _tokenizer(tokenizer_file).encode_batch(batch["text"], add_special_tokens=False)
    return {"ids": [e.ids + [separator] for e in encodings]}


def pack_split(ds, tokenizer_file: Path, separator: int, pad: int, block_size: int, dtype: np.dtype, out: Path, num_proc: int = 1) -> dict:
    """Tokenize ``ds`` (a ``datasets.Dataset`` with ``text``) in parallel and write ``out`` (.bin)."""
    import shutil
    import tempfile

    import datasets

    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("uint32"))})
    # the token cache goes to a scratch directory beside the output: by default ``datasets`` writes it
    # next to the input's Arrow files, which would modify the (DVC-tracked) split directories
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.stem}-"))
    encoded = ds.select_columns(["text"]).map(
        _encode_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={"tokenizer_file": str(tokenizer_file), "separator": separator},
        remove_columns=["text"],
        features=features,
        num_proc=num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
        load_from_cache_file=False,
        cache_file_name=str(work / "tokens.arrow"),
        desc=f"tokenize {out.stem}",
    )
    tokens = 0
    with open(out, "wb") as fh:
        for batch in encoded.data.to_batches(max_chunksize=4096):
            ids = batch.column(0).flatten().to_numpy().astype(dtype, copy=False)
            fh.write(ids.tobytes())
            tokens += len(ids)
        counts = _pad_to_blocks(fh, len(ds), tokens, pad, block_size, dtype)
    del encoded
    shutil.rmtree(work)
    return counts


def encode_texts(fh, texts: list[str], tokenizer_file: str, separator: int, dtype: np.dtype) -> int:
    """Append the token ids of ``texts`` (each document followed by ``separator``) to ``fh``, as
    ``pack_split`` writes them; returns how many.  The Ray engine's tasks write their parts with it."""
    from itertools import chain

    ids = _encode_batch({"text": texts}, tokenizer_file, separator)["ids"]
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32).astype(dtype, copy=False)
    fh.write(flat.tobytes())
    return len(flat)


def allocate_split(out: Path, tokens: int, documents: int, pad: int, block_size: int, dtype: np.dtype) -> dict:
    """``out`` at its final length, with ``pack_split``'s padding after the room for ``tokens`` ids,
    which the Ray engine's tasks then write in place, each part at its offset (``encode_texts``):
    the same bytes as ``pack_split``, with no copy through one process.  Returns the counts."""
    with open(out, "wb") as fh:
        fh.truncate(tokens * dtype.itemsize)
        fh.seek(tokens * dtype.itemsize)
        return _pad_to_blocks(fh, documents, tokens, pad, block_size, dtype)


def _pad_to_blocks(fh, documents: int, tokens: int, pad: int, block_size: int, dtype: np.dtype) -> dict:
    """Complete the last block with ``pad``; the counts ``meta.json`` records for the split."""
    padding = (-tokens) % block_size
    fh.write(np.full(padding, pad, dtype=dtype).tobytes())
    return {"documents": documents, "tokens": tokens, "padding": padding, "blocks": (tokens + padding) // block_size}


def write_meta(out_dir: Path, meta: dict) -> None:
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


class PackedBlocks:
    """A split of packed tokens as a map-style dataset of ``block_size`` int64 tensors."""

    def __init__(self, directory: Path, split: str):
        meta = json.loads((directory / "meta.json").read_text())
        self.block_size = meta["block_size"]
        self.pad_id = meta["pad_id"]
        self.separator_id = meta["separator_id"]
        self.tokens = meta["splits"][split]["tokens"]
        self.data = np.memmap(directory / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")

    def __len__(self) -> int:
        return len(self.data) // self.block_size

    def __getitem__(self, i: int):
        import torch

        if not 0 <= i < len(self):
            raise IndexError(i)
        block = self.data[i * self.block_size : (i + 1) * self.block_size]
        return torch.from_numpy(block.astype(np.int64))
