"""Tokenizers trained in-process for each algorithm, loaded back through AutoTokenizer."""

from pathlib import Path

import pytest
from conftest import prose
from transformers import AutoTokenizer

from models.tokenizer import TokenizerSpec, measure, to_transformers, train_tokenizer

CORPUS = [prose(i, 80) + "\nLine two: naïve café, 42 items!" for i in range(60)]


@pytest.mark.parametrize("algorithm", ["bpe", "wordpiece", "unigram", "char"])
def test_each_algorithm_trains_saves_and_loads(tmp_path: Path, algorithm: str):
    spec = TokenizerSpec(algorithm=algorithm, vocab_size=300, min_frequency=1, objectives=("causal",))
    tok = train_tokenizer(iter(CORPUS), spec, length=len(CORPUS))
    assert tok.get_vocab_size() <= 300
    to_transformers(tok, spec, model_max_length=128).save_pretrained(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<eos>" and hf.pad_token == "<pad>" and hf.bos_token == "<bos>"
    text = CORPUS[0]
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text, add_special_tokens=False).ids
    unk = tok.token_to_id(spec.roles().get("unk", "")) if algorithm != "bpe" else None
    m = measure(tok, iter([CORPUS[:10]]), unk)
    assert m.documents == 10 and m.tokens > m.words * 0.9 and m.bytes_per_token > 0.9
    if algorithm in ("bpe", "char"):
        assert m.round_trip_rate == 1.0  # byte-level BPE and characters spell text exactly
    if algorithm == "bpe":
        assert hf.decode(hf("unseen ✓ 漢字", add_special_tokens=False)["input_ids"]) == "unseen ✓ 漢字"


def test_char_tokenizer_maps_unseen_characters_to_unk():
    spec = TokenizerSpec(algorithm="char", vocab_size=200, min_frequency=1)
    tok = train_tokenizer(iter(CORPUS), spec)
    m = measure(tok, iter([["abc ✓✓"]]), tok.token_to_id("<unk>"))
    assert m.unk == 2 and m.unk_rate == pytest.approx(2 / 6)


def test_special_tokens_follow_the_objectives():
    assert TokenizerSpec(objectives=("mlm",)).roles() == {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
    both = TokenizerSpec(objectives=("causal", "seq2seq"), extra_ids=3)
    assert both.roles() == {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
    assert both.sentinels() == ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
    tok = train_tokenizer(iter(CORPUS), both)
    assert tok.token_to_id("<extra_id_2>") is not None and tok.token_to_id("<bos>") is not None
