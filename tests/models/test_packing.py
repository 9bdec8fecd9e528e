"""Packing: every token of every document lands in a block, separated; the dtype fits the vocabulary."""

from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import prose

from models.data import PackedBlocks, pack_split, token_dtype, write_meta
from models.tokenizer import TokenizerSpec, to_transformers, train_tokenizer


def test_packing_loses_no_tokens(tmp_path: Path):
    texts = [prose(i, 10 + 7 * i) for i in range(40)]
    spec = TokenizerSpec(vocab_size=400, min_frequency=1)
    tok = train_tokenizer(iter(texts), spec)
    to_transformers(tok, spec, 64).save_pretrained(str(tmp_path / "tok"))
    eos, pad = tok.token_to_id("<eos>"), tok.token_to_id("<pad>")
    ds = datasets.Dataset.from_dict({"text": texts})
    stats = pack_split(ds, tmp_path / "tok" / "tokenizer.json", eos, pad, 32, np.dtype(np.uint16), tmp_path / "train.bin", num_proc=2)
    expected = [t for text in texts for t in tok.encode(text, add_special_tokens=False).ids + [eos]]
    assert stats["tokens"] == len(expected) and stats["documents"] == 40
    flat = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert flat[: len(expected)].tolist() == expected  # count in = count out, order kept
    assert (flat[len(expected) :] == pad).all() and len(flat) % 32 == 0 and stats["padding"] < 32
    write_meta(tmp_path, {"block_size": 32, "dtype": "uint16", "pad_id": pad, "separator_id": eos, "splits": {"train": stats}})
    blocks = PackedBlocks(tmp_path, "train")
    assert len(blocks) == stats["blocks"] and blocks[0].tolist() == expected[:32]
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_dtype_is_sized_to_the_vocabulary():
    assert token_dtype(50_000) == np.uint16 and token_dtype(70_000) == np.uint32
    with pytest.raises(ValueError, match="tokenizer.dtype: uint16 .* vocab_size is 70000"):
        token_dtype(70_000, "uint16")
