"""Perplexity, bits per byte and accuracies against a hand computation."""

import math
from pathlib import Path

import numpy as np
import torch
from conftest import prose

from models.metrics import LMScores, score, token_byte_lengths
from models.tokenizer import TokenizerSpec, to_transformers, train_tokenizer


def test_scores_match_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, 0]])
    byte_lengths = np.array([0, 1, 2, 3, 4, 5, 6])
    got = score(logits, labels, byte_lengths, shift=True)
    nll = tokens = nbytes = correct = top5 = 0
    for b in range(2):
        for t in range(3):  # position t predicts label t + 1
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            row = logits[b, t].tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            nll += log_z - row[target]
            tokens += 1
            nbytes += byte_lengths[target]
            ranked = sorted(range(7), key=lambda i: -row[i])
            correct += ranked[0] == target
            top5 += target in ranked[:5]
    assert got.tokens == tokens == 5 and got.bytes == nbytes
    assert math.isclose(got.nll, nll, rel_tol=1e-5)
    assert math.isclose(got.perplexity, math.exp(nll / tokens), rel_tol=1e-5)
    assert math.isclose(got.bits_per_byte, nll / math.log(2) / nbytes, rel_tol=1e-5)
    assert got.correct == correct and got.correct_top5 == top5


def test_scores_accumulate():
    total = LMScores()
    total += LMScores(nll=2.0, tokens=2, bytes=8, correct=1, correct_top5=2)
    total += LMScores(nll=4.0, tokens=2, bytes=8, correct=0, correct_top5=1)
    assert total.loss == 1.5 and total.token_accuracy == 0.25 and total.top5_accuracy == 0.75
    assert math.isclose(total.bits_per_byte, 6 / math.log(2) / 16)


def test_byte_lengths_of_byte_level_tokens_are_exact(tmp_path: Path):
    spec = TokenizerSpec(vocab_size=300, min_frequency=1)
    tok = train_tokenizer(iter([prose(i, 60) + " café ✓" for i in range(30)]), spec)
    to_transformers(tok, spec, 64).save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    lengths = token_byte_lengths(hf)
    text = prose(99, 40) + " naïve ✓"
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert lengths[ids].sum() == len(text.encode("utf-8"))  # even where a token is half a character
    assert lengths[hf.eos_token_id] == 0
