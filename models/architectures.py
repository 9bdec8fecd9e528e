"""The model zoo: one typed architecture config mapped onto Hugging Face ``transformers`` classes.

lmforge writes no transformer layers of its own.  ``ArchConfig`` names the few hyperparameters that
matter; ``hf_config`` turns them into the config of the ``transformers`` family that implements that
combination, so every model we train loads anywhere in that ecosystem:

| arch            | position | extra                     | family  | why choose it                                   |
|-----------------|----------|---------------------------|---------|-------------------------------------------------|
| decoder         | learned  |                           | GPT-2   | the classic baseline; cannot extrapolate        |
| decoder         | rope     |                           | Llama   | modern default; GQA/MQA via ``n_kv_head``       |
| decoder         | rope     | ``window``                | Mistral | sliding-window attention: cost linear in length |
| decoder         | rope     | ``n_experts``             | Mixtral | mixture of experts: capacity without FLOPs      |
| decoder         | alibi    |                           | BLOOM   | linear biases: extrapolates past training length|
| encoder         | learned  |                           | BERT    | masked LM + next-sentence pretraining           |
| encoder-decoder | relative |                           | T5      | span corruption; inputs → outputs tasks         |

Attention runs through PyTorch SDPA (Flash attention kernels on GPUs) where the family supports it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from models.loading import auto_class

Arch = Literal["decoder", "encoder", "encoder-decoder"]
Position = Literal["learned", "rope", "alibi", "relative"]
OBJECTIVES = {"decoder": "causal", "encoder": "mlm", "encoder-decoder": "seq2seq"}
_DEFAULT_POSITION = {"decoder": "rope", "encoder": "learned", "encoder-decoder": "relative"}


class ArchConfigError(ValueError):
    """An impossible architecture; the message names the field to change."""


@dataclass
class ArchConfig:
    arch: Arch = "decoder"
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (multi-head); 1: multi-query; between: grouped-query
    d_ff: int | None = None  # None: 4 × d_model (the classic ratio)
    activation: str = "gelu"  # gelu | gelu_new | relu | silu; Llama-family uses it in a gated MLP
    dropout: float = 0.0  # small models on small data overfit little in one epoch; 0 is fastest
    position: Position | None = None  # None: rope (decoder), learned (encoder), relative (T5)
    window: int | None = None  # sliding-window attention span (decoder + rope → Mistral)
    n_experts: int = 0  # > 0: mixture of experts (decoder + rope → Mixtral)
    experts_per_token: int = 2
    max_context: int = 256
    tie_embeddings: bool = True  # input and output embeddings share weights: fewer parameters
    vocab_size: int = 8192  # replaced by the trained tokenizer's size at build time
    rope_theta: float = 10_000.0

    def __post_init__(self) -> None:
        if self.arch not in OBJECTIVES:
            raise ArchConfigError(f"arch: '{self.arch}' is not one of {', '.join(OBJECTIVES)}")
        if self.position is None:
            self.position = _DEFAULT_POSITION[self.arch]
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "max_context", "vocab_size"):
            if getattr(self, name) < 1:
                raise ArchConfigError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ArchConfigError(f"n_head: {self.n_head} heads do not divide d_model {self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ArchConfigError(f"n_kv_head: {self.n_kv_head} key/value heads do not divide n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ArchConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ArchConfigError(f"experts_per_token: must be in [1, n_experts={self.n_experts}], got {self.experts_per_token}")
        self._check_family()

    def _check_family(self) -> None:
        """Combinations that no ``transformers`` family implements are refused here, by field."""
        if self.arch == "encoder-decoder" and self.position != "relative":
            raise ArchConfigError("position: the encoder-decoder (T5) uses relative position buckets; set position: relative")
        if self.arch != "encoder-decoder" and self.position == "relative":
            raise ArchConfigError(f"position: 'relative' is for arch encoder-decoder, not {self.arch}")
        if self.arch == "encoder" and self.position != "learned":
            raise ArchConfigError("position: the encoder (BERT) uses learned positions; set position: learned")
        grouped = self.n_kv_head != self.n_head
        if grouped and not (self.arch == "decoder" and self.position == "rope"):
            raise ArchConfigError("n_kv_head: grouped/multi-query attention needs arch decoder with position rope")
        if self.window and not (self.arch == "decoder" and self.position == "rope"):
            raise ArchConfigError("window: sliding-window attention needs arch decoder with position rope")
        if self.n_experts and not (self.arch == "decoder" and self.position == "rope"):
            raise ArchConfigError("n_experts: mixture of experts needs arch decoder with position rope")
        if self.position == "alibi" and self.d_ff != 4 * self.d_model:
            raise ArchConfigError(f"d_ff: BLOOM (alibi) fixes the MLP at 4 × d_model = {4 * self.d_model}, got {self.d_ff}")

    @property
    def family(self) -> str:
        if self.arch == "encoder":
            return "bert"
        if self.arch == "encoder-decoder":
            return "t5"
        if self.position == "learned":
            return "gpt2"
        if self.position == "alibi":
            return "bloom"
        if self.n_experts:
            return "mixtral"
        return "mistral" if self.window else "llama"

    @property
    def objective(self) -> str:
        return OBJECTIVES[self.arch]

    def replace(self, **changes: Any) -> ArchConfig:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Presets.  Comments say what each is for; overrides pick the architecture variant.
# --------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # tests: < 1M parameters with an 8k vocabulary, a forward pass in milliseconds
    "tiny": dict(n_layer=2, d_model=64, n_head=4, d_ff=256, max_context=128),
    # the demo: nanoGPT's CPU configuration (4 × 128, block 256) trains in minutes on 2 cores
    "cpu-small": dict(n_layer=4, d_model=128, n_head=4, d_ff=512, max_context=256),
    # GPU sizes: GPT-2 small / medium shapes, and a TinyLlama-like 1B with grouped-query attention
    "125m": dict(n_layer=12, d_model=768, n_head=12, d_ff=3072, max_context=1024, tie_embeddings=True),
    "350m": dict(n_layer=24, d_model=1024, n_head=16, d_ff=4096, max_context=1024),
    "1b": dict(n_layer=22, d_model=2048, n_head=32, n_kv_head=4, d_ff=5632, max_context=2048, activation="silu"),
}


def from_name(name: str, **overrides: Any) -> ArchConfig:
    """A preset by name with field overrides: ``from_name("cpu-small", position="alibi")``."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"presets: {', '.join(PRESETS)}"
        raise ArchConfigError(f"preset: unknown preset '{name}' ({hint})")
    fields = {f.name for f in dataclasses.fields(ArchConfig)}
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ArchConfigError(f"{key}: not an architecture field" + (f" (did you mean '{close[0]}'?)" if close else ""))
    values = {**PRESETS[name], **overrides}
    if values.get("arch", "decoder") != "decoder" and "n_kv_head" not in overrides:
        values.pop("n_kv_head", None)  # presets' GQA applies to decoders only
    return ArchConfig(**values)


# --------------------------------------------------------------------------------------------------
# Mapping onto transformers
# --------------------------------------------------------------------------------------------------


@dataclass
class SpecialIds:
    """Token ids the model configs need, taken from the trained tokenizer."""

    pad: int = 0
    bos: int | None = None
    eos: int | None = None
    extra: dict[str, int] = field(default_factory=dict)


def hf_config(cfg: ArchConfig, ids: SpecialIds | None = None):
    """The ``transformers`` config implementing ``cfg``."""
    import transformers as tf

    ids = ids or SpecialIds()
    common = dict(vocab_size=cfg.vocab_size, pad_token_id=ids.pad, tie_word_embeddings=cfg.tie_embeddings)
    family = cfg.family
    if family == "gpt2":
        return tf.GPT2Config(
            n_positions=cfg.max_context, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
            activation_function=cfg.activation, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=ids.bos, eos_token_id=ids.eos, **common,
        )
    if family == "bloom":
        return tf.BloomConfig(
            hidden_size=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, hidden_dropout=cfg.dropout,
            attention_dropout=cfg.dropout, bos_token_id=ids.bos, eos_token_id=ids.eos, **common,
        )
    if family in ("llama", "mistral", "mixtral"):
        kwargs = dict(
            hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, hidden_act=cfg.activation,
            max_position_embeddings=cfg.max_context, attention_dropout=cfg.dropout,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            bos_token_id=ids.bos, eos_token_id=ids.eos, **common,
        )
        if family == "llama":
            return tf.LlamaConfig(**kwargs)
        if family == "mistral":
            return tf.MistralConfig(sliding_window=cfg.window, **kwargs)
        return tf.MixtralConfig(
            sliding_window=cfg.window, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token, **kwargs
        )
    if family == "bert":
        return tf.BertConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
            intermediate_size=cfg.d_ff, hidden_act=cfg.activation, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, max_position_embeddings=cfg.max_context, type_vocab_size=2, **common,
        )
    return tf.T5Config(
        d_model=cfg.d_model, d_kv=cfg.d_model // cfg.n_head, d_ff=cfg.d_ff, num_layers=cfg.n_layer,
        num_decoder_layers=cfg.n_layer, num_heads=cfg.n_head, dropout_rate=cfg.dropout,
        feed_forward_proj="relu" if cfg.activation == "relu" else "gated-gelu",
        eos_token_id=ids.eos, decoder_start_token_id=ids.pad, **common,
    )


def model_class(cfg: ArchConfig):
    """The class a model of this architecture is built and trained as: its objective's Auto class
    (``models.loading``), except for encoders, which pretrain with BERT's MLM and next-sentence heads
    (``models.loading`` later opens the saved model's MLM part with ``AutoModelForMaskedLM``)."""
    if cfg.arch == "encoder":
        from transformers import BertForPreTraining

        return BertForPreTraining
    return auto_class(cfg.objective)


def build_model(cfg: ArchConfig, ids: SpecialIds | None = None):
    """A freshly initialised model, with SDPA attention where the family has it."""
    config = hf_config(cfg, ids)
    cls = model_class(cfg)
    make = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    try:
        return make(config, attn_implementation="sdpa")
    except ValueError:  # BLOOM has no SDPA path in transformers: its own ("eager") attention
        return make(config, attn_implementation="eager")


def parameter_count(cfg: ArchConfig) -> int:
    """Parameters of the model, counted on the meta device (no memory, even for 1B)."""
    import torch

    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ArchConfig, n_params: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6·N_active + 12·L·d·T_attended (PaLM, App. B).

    N_active counts the experts a token actually uses; T_attended is the context, or the window.
    Embedding parameters are excluded from N (lookups, not matmuls).
    """
    n = parameter_count(cfg) if n_params is None else n_params
    n -= cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if cfg.n_experts:
        expert = 3 * cfg.d_model * cfg.d_ff  # gated MLP of one expert
        n -= cfg.n_layer * expert * (cfg.n_experts - cfg.experts_per_token)
    attended = min(cfg.max_context, cfg.window) if cfg.window else cfg.max_context
    layers = cfg.n_layer * (2 if cfg.arch == "encoder-decoder" else 1)
    return 6 * n + 12 * layers * cfg.d_model * attended


def flops_per_token_of(config, n_params: int, context: int) -> int:
    """``flops_per_token`` for a model that lmforge did not build (a pretrained checkpoint), read from
    its Hugging Face config: 6·N_non-embedding + 12·L·d·T at the attended ``context``."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    tied = getattr(config, "tie_word_embeddings", True)
    n = n_params - config.vocab_size * width * (1 if tied else 2)
    return 6 * n + 12 * layers * width * context
