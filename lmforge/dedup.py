"""Exact and near-duplicate detection over a whole corpus, with memory that stays small.

Near duplicates: MinHash signatures of word shingles (datasketch's ``MinHash``, computed per
document in worker processes), split into ``b`` bands of ``r`` values (datasketch's optimal banding
for the threshold).  Two documents that agree on a whole band are candidates; candidates are joined
into clusters (connected components, scipy), and each cluster's representative is its first
document, so "the first occurrence wins" deterministically.  A member is a near duplicate if its
estimated Jaccard similarity with the representative reaches the threshold.

Why not datasketch's ``MinHashLSH`` index: it keeps a Python set per bucket and a key list per
document, about 2.5 KB per document in the process that decides; here the state is ``b`` uint64
band hashes per document in one numpy array (~40 bytes), and signatures stay on disk until the few
candidates need theirs.  At a million documents that is 40 MB instead of 2.5 GB.
"""

from __future__ import annotations

import hashlib
import zlib
from functools import lru_cache

import numpy as np

from lmforge.params import DedupParams

_PRIME = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio) that mixes values

# The fate of a document, one int8 each: decided by ``lmforge.clean.plan_dedup`` (local engine) or by
# ``lmforge.ray_data`` (Ray engine), acted on by ``lmforge.clean.route``.
KEEP, REJECTED, EXACT_DUPLICATE, NEAR_DUPLICATE = 0, 1, 2, 3


@lru_cache(maxsize=4)
def _permutations(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1).permutations


@lru_cache(maxsize=16)
def banding(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising false positives + negatives at ``threshold`` (datasketch)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def kgram_hashes(text: str, k: int) -> np.ndarray:
    """64-bit hashes of the word k-grams of ``text`` (lowercased, in order, repeats kept), with numpy.

    Hashing each word once with crc32 and combining k neighbours arithmetically is ~k times cheaper
    than hashing every k-gram string, which matters at hundreds of MB of text.  A text shorter than
    ``k`` words is one k-gram of its whole length.
    """
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    wh = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint64, count=len(words))
    k = min(k, len(wh))
    n = len(wh) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):  # polynomial combination of the k word hashes; uint64 arithmetic wraps
        h = h * _PRIME + wh[j : j + n]
    return h


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the distinct word k-grams of ``text``: MinHash's input."""
    return np.unique(kgram_hashes(text, k) & np.uint64(0xFFFFFFFF))


def signature(text: str, p: DedupParams) -> np.ndarray:
    """The MinHash signature (``num_perm`` uint32 values) of a document's word shingles."""
    from datasketch import MinHash

    m = MinHash(num_perm=p.num_perm, hashfunc=int, permutations=_permutations(p.num_perm), scheme="affine32")
    m.update_batch(shingle_hashes(text, p.shingle_words))
    return m.hashvalues


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, num_perm) uint32 signatures → (n, bands) uint64: one hash of each band's ``rows`` values."""
    sig = signatures.astype(np.uint64)
    out = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    for b in range(bands):
        for r in range(rows):
            out[:, b] = out[:, b] * _PRIME + sig[:, b * rows + r] + np.uint64(1)
    return out


def bucket_links(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Links between positions of ``keys`` (in corpus order) that share a key: (member, first), each
    position that is not the first with its key linked to the first one.

    Only colliding positions produce links, so the output is as small as the duplicates are few.  Both
    engines build their clusters from these links: the local one over the whole corpus, the Ray one
    within each partition of a shuffle by key (``lmforge.ray_data``).
    """
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    if n == 0:
        return order, order
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    first = np.repeat(order[starts], np.diff(np.r_[starts, n]))  # first position of each bucket
    linked = first != order
    return order[linked], first[linked]


def component_firsts(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """For each of ``n`` nodes, the smallest node of its connected component given the links
    ``src[i]``-``dst[i]`` (scipy's connected components; a node without links is its own first)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first_of_component = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(first_of_component, component, np.arange(n))
    return first_of_component[component]


def cluster_representatives(bands: np.ndarray) -> np.ndarray:
    """For each row of ``bands`` (in corpus order), the index of the first row of its cluster.

    Rows sharing a band hash are linked; clusters are the connected components of those links.
    """
    n = bands.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    src, dst = zip(*(bucket_links(bands[:, b]) for b in range(bands.shape[1])))
    return component_firsts(np.concatenate(src), np.concatenate(dst), n)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise share of equal MinHash values: an unbiased estimate of Jaccard similarity."""
    return (a == b).mean(axis=1)


def verify_near(members: np.ndarray, leaders: np.ndarray, p: DedupParams) -> tuple[np.ndarray, np.ndarray]:
    """(estimated Jaccard as float32, whether each member is a near duplicate to remove) for the
    signatures of cluster members and of their representatives, row by row.  One function for both
    engines, so that the same float32 value is compared with the threshold and printed."""
    jaccard = estimated_jaccard(members, leaders).astype(np.float32)
    return jaccard, (jaccard >= p.threshold) & (p.near == "remove")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
