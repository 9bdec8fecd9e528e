"""Collators: causal labels, MLM 80/10/10 masking with NSP pairs, T5 span corruption."""


import numpy as np
import pytest
import torch
from conftest import prose
from transformers import AutoTokenizer

from models.objectives import CausalCollator, MlmNspCollator, SpanCorruptionCollator, random_spans_noise_mask
from models.tokenizer import TokenizerSpec, to_transformers, train_tokenizer


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    spec = TokenizerSpec(algorithm="wordpiece", vocab_size=400, min_frequency=1, objectives=("mlm",))
    tok = train_tokenizer(iter([prose(i, 80) for i in range(50)]), spec)
    path = tmp_path_factory.mktemp("tok")
    to_transformers(tok, spec, 128).save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def test_causal_collator_ignores_padding():
    batch = CausalCollator(pad_id=0)([torch.tensor([5, 6, 7, 0]), torch.tensor([8, 9, 10, 11])])
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [8, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_mlm_masking_rates_and_nsp_pairs(bert_tokenizer):
    tok = bert_tokenizer
    torch.manual_seed(0)
    blocks = [torch.randint(5, tok.vocab_size, (128,)) for _ in range(400)]
    batch = MlmNspCollator(tok, seed=0)(blocks)
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert input_ids.shape == (400, 128)
    assert (input_ids[:, 0] == tok.cls_token_id).all() and (input_ids[:, -1] == tok.sep_token_id).all()
    selected = labels != -100
    maskable = 400 * (128 - 3)
    assert abs(selected.sum().item() / maskable - 0.15) < 0.01
    as_mask = (input_ids[selected] == tok.mask_token_id).float().mean().item()
    unchanged = (input_ids[selected] == labels[selected]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.03  # the rest: random tokens
    assert abs(batch["next_sentence_label"].float().mean().item() - 0.5) < 0.08
    assert batch["token_type_ids"][0].tolist() == [0] * 64 + [1] * 64


def test_span_noise_mask_density_and_spans():
    rng = np.random.default_rng(0)
    masks = [random_spans_noise_mask(200, 0.15, 3.0, rng) for _ in range(200)]
    assert all(m.sum() == 30 for m in masks)
    spans = [np.sum(m[1:] & ~m[:-1]) + m[0] for m in masks]
    assert abs(np.mean([30 / s for s in spans]) - 3.0) < 0.2


def test_span_corruption_targets_restore_the_input():
    sentinels = list(range(1000, 1100))
    collate = SpanCorruptionCollator(sentinels, eos_id=2, pad_id=0, seed=1)
    block = torch.arange(10, 74)
    inputs, targets = collate.corrupt(block.numpy())
    # fill each sentinel of the input with the span that follows it in the target
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    restored = [x for t in inputs[:-1] for x in (spans[t] if t in sentinels else [t])]
    assert restored == block.tolist() and inputs[-1] == 2 and targets[-1] == 2
    batch = collate([block, torch.cat([torch.arange(10, 40), torch.zeros(34, dtype=torch.long)])])
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] == -100).any()
