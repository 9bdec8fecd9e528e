"""Language-model metrics from logits: perplexity, bits per byte, token accuracy, top-5 accuracy.

Bits per byte divides the total negative log-likelihood (converted to bits) by the number of UTF-8
bytes of the predicted text rather than by the number of tokens, so models with different tokenizers
can be compared: a tokenizer that cuts text into fewer, longer tokens does not look better for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LMScores:
    nll: float = 0.0  # summed negative log-likelihood, nats
    tokens: int = 0  # predicted tokens
    bytes: int = 0  # UTF-8 bytes those tokens stand for
    correct: int = 0  # argmax == target
    correct_top5: int = 0  # target among the 5 most likely

    def __iadd__(self, other: LMScores) -> LMScores:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.correct += other.correct
        self.correct_top5 += other.correct_top5
        return self

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token (nats)."""
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    @property
    def token_accuracy(self) -> float:
        return self.correct / max(self.tokens, 1)

    @property
    def top5_accuracy(self) -> float:
        return self.correct_top5 / max(self.tokens, 1)


def score(logits: torch.Tensor, labels: torch.Tensor, byte_lengths: np.ndarray, shift: bool) -> LMScores:
    """Scores of one batch.  ``logits`` (batch, time, vocab); ``labels`` (batch, time) with -100 where
    nothing is predicted; ``shift``: causal models predict position t + 1 from position t."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    targets = labels[mask]  # (n,)
    selected = logits[mask].float()  # (n, vocab)
    log_probs = torch.log_softmax(selected, dim=-1)
    nll = -log_probs.gather(1, targets[:, None]).sum().item()
    top5 = selected.topk(min(5, selected.shape[-1]), dim=-1).indices
    return LMScores(
        nll=nll,
        tokens=int(targets.numel()),
        bytes=int(byte_lengths[targets.cpu().numpy()].sum()),
        correct=int((top5[:, 0] == targets).sum()),
        correct_top5=int((top5 == targets[:, None]).any(dim=1).sum()),
    )


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 length of the text each token id stands for (special tokens: 0).

    Byte-level BPE tokens map to exact bytes through GPT-2's byte-to-unicode table; for other
    algorithms the decoded piece is measured, which misses the space a word-initial piece implies.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    byte_level = tokenizer.backend_tokenizer.decoder.__class__.__name__ == "ByteLevel"
    for token, i in vocab.items():
        if i in special:
            continue
        if byte_level and all(c in to_byte for c in token):
            lengths[i] = len(token)  # one unicode stand-in per byte
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths
