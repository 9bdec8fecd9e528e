"""Tokenizer training and measurement with Hugging Face ``tokenizers``.

Four algorithms, each assembled from the library's own parts:

- ``bpe``: byte-level BPE (GPT-2 style): every byte is in the alphabet, so nothing is ever unknown
  and decoding gives back the exact text;
- ``wordpiece``: BERT's algorithm, with ``##`` continuation pieces and an unknown token;
- ``unigram``: the SentencePiece unigram LM, with ``▁`` marking word starts;
- ``char``: one token per character, the classic small-corpus baseline.

The special tokens depend on the objectives the candidate models train with (``SPECIALS``).  The
result is saved as a ``PreTrainedTokenizerFast`` directory that ``AutoTokenizer`` loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Token strings for each role, per objective; roles shared by several objectives take the first.
SPECIALS = {
    "causal": {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"},
    "mlm": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "seq2seq": {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"},
}
ROLE_ORDER = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")


@dataclass
class TokenizerSpec:
    algorithm: str = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    normalizer: str = "nfc"
    objectives: tuple[str, ...] = ("causal",)
    extra_ids: int = 100  # T5 sentinels ``<extra_id_i>``, added when "seq2seq" is an objective

    def roles(self) -> dict[str, str]:
        roles: dict[str, str] = {}
        for objective in self.objectives:
            for role, token in SPECIALS[objective].items():
                roles.setdefault(role, token)
        if self.algorithm != "bpe":
            roles.setdefault("unk", "<unk>")  # only byte-level BPE can spell every input
        return {role: roles[role] for role in ROLE_ORDER if role in roles}

    def sentinels(self) -> list[str]:
        return [f"<extra_id_{i}>" for i in range(self.extra_ids)] if "seq2seq" in self.objectives else []


def _normalizer(name: str):
    from tokenizers import normalizers

    return {
        "none": None,
        "nfc": normalizers.NFC(),
        "nfkc": normalizers.NFKC(),
        "lowercase": normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()]),
    }[name]


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec, length: int | None = None):
    """Train a ``tokenizers.Tokenizer`` on ``texts`` (an iterator: the corpus is streamed)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    roles = spec.roles()
    specials = list(roles.values()) + spec.sentinels()
    unk = roles.get("unk")
    common = dict(vocab_size=spec.vocab_size, special_tokens=specials, show_progress=False)
    if spec.algorithm == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(min_frequency=spec.min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
    elif spec.algorithm == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(min_frequency=spec.min_frequency, **common)
    elif spec.algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(unk_token=unk, **common)
    elif spec.algorithm == "char":
        tok = Tokenizer(models.WordLevel(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(min_frequency=spec.min_frequency, **common)
    else:
        raise ValueError(f"tokenizer.algorithm: unknown algorithm '{spec.algorithm}' (bpe, wordpiece, unigram, char)")
    normalizer = _normalizer(spec.normalizer)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def to_transformers(tok, spec: TokenizerSpec, model_max_length: int):
    """Wrap a trained tokenizer so that ``save_pretrained``/``AutoTokenizer`` know its special tokens."""
    from transformers import PreTrainedTokenizerFast

    roles = {f"{role}_token": token for role, token in spec.roles().items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        additional_special_tokens=spec.sentinels() or None,
        **roles,
    )


@dataclass
class TokenizerMetrics:
    documents: int
    words: int
    tokens: int
    bytes: int
    unk: int
    exact_round_trips: int

    @property
    def fertility(self) -> float:
        """Tokens per whitespace-separated word: how finely the tokenizer cuts the language."""
        return self.tokens / max(self.words, 1)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token: compression; also converts loss per token to bits per byte."""
        return self.bytes / max(self.tokens, 1)

    @property
    def unk_rate(self) -> float:
        return self.unk / max(self.tokens, 1)

    @property
    def round_trip_rate(self) -> float:
        """Share of documents that ``decode(encode(text)) == text`` restores exactly."""
        return self.exact_round_trips / max(self.documents, 1)


def measure(tok, batches: Iterator[list[str]], unk_id: int | None) -> TokenizerMetrics:
    """Metrics of ``tok`` over batches of documents (encoded in parallel by the Rust library)."""
    m = TokenizerMetrics(0, 0, 0, 0, 0, 0)
    for texts in batches:
        encodings = tok.encode_batch(texts, add_special_tokens=False)
        decoded = tok.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
        for text, enc, back in zip(texts, encodings, decoded):
            m.documents += 1
            m.words += len(text.split())
            m.tokens += len(enc.ids)
            m.bytes += len(text.encode("utf-8", "surrogatepass"))
            m.unk += enc.ids.count(unk_id) if unk_id is not None else 0
            m.exact_round_trips += back == text
    return m


def load(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))
