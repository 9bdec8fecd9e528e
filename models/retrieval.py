"""Retrieval for retrieval-augmented generation: chunking, a lexical index (BM25, from ``bm25s``), a
dense index (mean-pooled hidden states of a language model), rank fusion, and the known-item metrics
that say how well each finds what it should.  Plain Python and torch: no Dagster here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
import numpy as np
import torch

#: Sentence ends: a period, question or exclamation mark followed by white space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def chunk_words(text: str, size: int, overlap: int) -> list[str]:
    """Windows of ``size`` words that overlap by ``overlap`` words, covering every word.

    Words, not tokens: chunks then mean the same whatever the tokenizer, and a reader can check them.
    The overlap keeps a sentence cut by one boundary whole in the neighbouring chunk.
    """
    if not 0 <= overlap < size:
        raise ValueError(f"overlap ({overlap}) must be at least 0 and smaller than the chunk size ({size})")
    words = text.split()
    if not words:
        return []
    step = size - overlap
    starts = range(0, max(len(words) - overlap, 1), step)
    return [" ".join(words[s : s + size]) for s in starts]


def sentences(text: str, min_words: int = 6) -> list[str]:
    """The sentences of ``text`` with at least ``min_words`` words (queries of the known-item set)."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if len(s.split()) >= min_words]


class LexicalIndex:
    """BM25 over word tokens (English stop words removed): strong on names and rare words, which is
    most of what people type when they look something up in documentation."""

    def __init__(self, retriever):
        self.retriever = retriever

    @staticmethod
    def _tokens(texts: Sequence[str]):
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", show_progress=False)

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(cls._tokens(texts), show_progress=False)
        return cls(retriever)

    def save(self, directory: Path) -> None:
        self.retriever.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        import bm25s

        return cls(bm25s.BM25.load(str(directory), show_progress=False))

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """The indices of the ``k`` best chunks for each query (chunks sharing no word are left out)."""
        k = min(k, self.retriever.scores["num_docs"])
        ids, scores = self.retriever.retrieve(self._tokens(queries), k=k, show_progress=False)
        return [[int(i) for i, s in zip(row_ids, row_scores) if s > 0] for row_ids, row_scores in zip(ids, scores)]


@torch.no_grad()
def embed(model, tokenizer, texts: Sequence[str], max_tokens: int, batch_size: int = 16) -> np.ndarray:
    """Unit-length embeddings: the last hidden layer averaged over each text's tokens.

    Any of our language models works as the encoder (the champion by default), so the dense index
    needs no model from a hub; a better embedding model can take its place through the same call.
    """
    tokenizer.padding_side = "right"
    vectors = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
        batch.pop("token_type_ids", None)
        batch = batch.to(model.device)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        vectors.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
    return torch.cat(vectors).numpy() if vectors else np.zeros((0, 0), dtype=np.float32)


def dense_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    """The ``k`` chunks of highest cosine similarity (embeddings are unit length: a dot product)."""
    scores = torch.from_numpy(queries) @ torch.from_numpy(embeddings).T
    return torch.topk(scores, min(k, embeddings.shape[0]), dim=1).indices.tolist()


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60, limit: int | None = None) -> list[int]:
    """One ranking from several (Cormack et al., 2009): each item scores sum(1 / (k + rank)), so an
    item near the top of either list rises, without calibrating BM25 scores against cosines."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank + 1)
    fused = sorted(scores, key=lambda i: (-scores[i], i))
    return fused[:limit] if limit else fused


def known_item_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], ks: Sequence[int]) -> dict[str, float]:
    """recall@k (a relevant chunk among the first k) and MRR (mean of 1/rank of the first relevant)."""
    n = len(rankings)
    metrics = {f"recall_at_{k}": sum(bool(set(r[:k]) & rel) for r, rel in zip(rankings, relevant)) / n for k in ks}
    metrics["mrr"] = sum(next((1.0 / (i + 1) for i, c in enumerate(r) if c in rel), 0.0) for r, rel in zip(rankings, relevant)) / n
    return metrics


@torch.no_grad()
def continuation_loss(model, tokenizer, prompt: str, continuation: str, max_tokens: int) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of ``continuation`` after ``prompt``.

    Only the continuation is scored, so prompts with and without retrieved context (or with and
    without examples) are compared on exactly the same tokens; a long prompt loses its beginning
    (the end, next to the continuation, matters most) to fit ``max_tokens``.
    """
    target = tokenizer(" " + continuation.strip(), add_special_tokens=False)["input_ids"][: max_tokens // 2]
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"][-(max_tokens - len(target)) :]
    if not context:
        context = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    ids = torch.tensor([context + target], device=model.device)
    logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, len(context) :], reduction="sum").item(), len(target)


def continuation_perplexity(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], max_tokens: int) -> float:
    """Perplexity of the continuations given their prompts, over all continuation tokens."""
    losses = [continuation_loss(model, tokenizer, p, c, max_tokens) for p, c in zip(prompts, continuations)]
    return float(np.exp(sum(loss for loss, _ in losses) / max(sum(n for _, n in losses), 1)))


def truncate_left(tokenizer, text: str, max_tokens: int) -> str:
    """The end of ``text`` that fits ``max_tokens`` tokens (a prompt's end is where generation continues)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[-max_tokens:])


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of the texts (Li et al., 2016): low means repetitive output."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """Share of each text's n-grams that repeat an earlier n-gram of the same text, averaged."""
    rates = []
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0
