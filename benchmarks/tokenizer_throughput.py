"""Tokenizer training and encoding throughput: lmforge's stage code vs ``tokenizers`` called directly.

Same text, same algorithm and vocabulary, same machine, in one run:
- training: ``models.tokenizer.train_tokenizer`` streaming texts from the Arrow split (what the
  ``tokenizer`` asset does) vs ``Tokenizer.train_from_iterator`` on a Python list held in memory;
- encoding: ``models.data.pack_split`` (parallel tokenization into a packed token file, what the
  ``packed`` asset does) vs ``Tokenizer.encode_batch`` on the list plus one ``numpy`` concatenation.
Prints MB/s for each and the ratio lmforge / direct (goal ≥ 0.9).

    .venv/bin/python benchmarks/tokenizer_throughput.py [--mb 20] [--algorithm bpe]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def corpus(megabytes: int) -> list[str]:
    """Documents of ~40 lines drawn from tinyshakespeare and the demo corpus, up to ``megabytes``."""
    if not SHAKESPEARE.exists():
        sys.exit(f"{SHAKESPEARE} not found: this benchmark needs ../shared/data (see its README)")
    lines = SHAKESPEARE.read_text().splitlines()
    for path in sorted((REPO / "data" / "raw").rglob("*.txt")):
        lines += path.read_text(errors="replace").splitlines()
    rng = random.Random(0)
    docs, size = [], 0
    while size < megabytes * 1_000_000:
        start = rng.randrange(len(lines) - 40)
        doc = "\n".join(lines[start : start + 40])
        docs.append(doc)
        size += len(doc.encode())
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--algorithm", default="bpe", choices=["bpe", "wordpiece", "unigram", "char"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    import datasets

    from models.data import pack_split
    from models.tokenizer import TokenizerSpec, train_tokenizer, to_transformers

    datasets.disable_progress_bars()
    docs = corpus(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    work = Path(tempfile.mkdtemp(prefix="lmforge-tokbench-"))
    try:
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(work / "split"))
        split = datasets.load_from_disk(str(work / "split"))
        spec = TokenizerSpec(algorithm=args.algorithm, vocab_size=args.vocab_size)

        start = time.perf_counter()
        texts = (t for b in split.data.select(["text"]).to_batches(max_chunksize=1000) for t in b.column(0).to_pylist())
        ours = train_tokenizer(texts, spec, length=len(split))
        t_ours = time.perf_counter() - start

        start = time.perf_counter()
        train_tokenizer(docs, spec)  # same assembly of tokenizers parts, list in memory
        t_direct = time.perf_counter() - start
        print(f"train : lmforge {mb / t_ours:6.2f} MB/s, direct {mb / t_direct:6.2f} MB/s, ratio {t_direct / t_ours:.2f}")

        to_transformers(ours, spec, 256).save_pretrained(str(work / "tok"))
        eos, pad = ours.token_to_id("<eos>"), ours.token_to_id("<pad>")
        start = time.perf_counter()
        stats = pack_split(split, work / "tok" / "tokenizer.json", eos, pad, 256, np.dtype(np.uint16), work / "train.bin", num_proc=2)
        t_ours = time.perf_counter() - start

        start = time.perf_counter()
        encodings = ours.encode_batch(docs, add_special_tokens=False)
        flat = np.concatenate([np.asarray(e.ids + [eos], dtype=np.uint16) for e in encodings])
        t_direct = time.perf_counter() - start
        assert stats["tokens"] == len(flat), "both paths must produce the same tokens"
        print(f"encode: lmforge {mb / t_ours:6.2f} MB/s, direct {mb / t_direct:6.2f} MB/s, ratio {t_direct / t_ours:.2f} "
              f"({stats['tokens']:,} tokens from {mb:.1f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
