"""Exact and near-duplicate detection: MinHash signatures of word shingles, an LSH index (datasketch).

Signatures are computed per document in worker processes (``signature``); the index that decides
which document is a duplicate of which is built in one sequential pass (``Deduplicator``), so that
"the first occurrence wins" is deterministic.  Memory grows with the number of *kept* documents only
(band keys plus one ``num_perm``-sized uint32 signature each), never with their text.
"""

from __future__ import annotations

import hashlib
import zlib
from functools import lru_cache

import numpy as np

from lmforge.params import DedupParams

_PRIME = np.uint64(0x9E3779B1)  # odd multiplier that mixes word hashes into a shingle hash


@lru_cache(maxsize=4)
def _permutations(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1).permutations


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the distinct word k-grams of ``text`` (lowercased), computed with numpy.

    Hashing each word once with crc32 and combining k neighbours arithmetically is ~k times cheaper
    than hashing every k-gram string, which matters at hundreds of MB of text.
    """
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    wh = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint64, count=len(words))
    k = min(k, len(wh))
    n = len(wh) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):  # polynomial rolling combination; uint64 arithmetic wraps, which is fine
        h = h * _PRIME + wh[j : j + n]
    return np.unique(h & np.uint64(0xFFFFFFFF))


def signature(text: str, p: DedupParams) -> np.ndarray:
    """The MinHash signature (``num_perm`` uint32 values) of a document's word shingles."""
    from datasketch import MinHash

    m = MinHash(num_perm=p.num_perm, hashfunc=int, permutations=_permutations(p.num_perm), scheme="affine32")
    m.update_batch(shingle_hashes(text, p.shingle_words))
    return m.hashvalues


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Deduplicator:
    """Decides, document by document in corpus order, whether each is a duplicate of an earlier one."""

    def __init__(self, p: DedupParams):
        from datasketch import MinHashLSH

        self.p = p
        self._seen: dict[bytes, str] = {}  # sha256 digest prefix → id of first document with it
        self._lsh = MinHashLSH(threshold=p.threshold, num_perm=p.num_perm) if p.near != "off" else None
        self._signatures: dict[str, np.ndarray] = {}  # representative id → signature, to verify candidates

    def exact_duplicate_of(self, doc_id: str, sha256: str) -> str | None:
        if not self.p.exact:
            return None
        key = bytes.fromhex(sha256[:32])
        first = self._seen.get(key)
        if first is None:
            self._seen[key] = doc_id
        return first

    def near_cluster(self, doc_id: str, sig: np.ndarray) -> tuple[str, float] | None:
        """If a kept document is a near duplicate (estimated Jaccard ≥ threshold), return its id and the
        similarity; otherwise index this document as a new cluster representative and return None."""
        if self._lsh is None:
            return None
        sig = np.asarray(sig, dtype=np.uint32)
        best: tuple[str, float] | None = None
        for cand in sorted(self._lsh.query(self._lean(sig))):
            sim = float(np.mean(self._signatures[cand] == sig))
            if sim >= self.p.threshold and (best is None or sim > best[1]):
                best = (cand, sim)
        if best is None:
            self._lsh.insert(doc_id, self._lean(sig), check_duplication=False)
            self._signatures[doc_id] = sig
        return best

    def _lean(self, sig: np.ndarray):
        from datasketch import LeanMinHash, MinHash

        return LeanMinHash(MinHash(num_perm=self.p.num_perm, hashvalues=sig, permutations=_permutations(self.p.num_perm), scheme="affine32"))
