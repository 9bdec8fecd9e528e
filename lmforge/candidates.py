"""The candidates of ``pretrain.candidates``, resolved: what each one is, how it trains, and which
tokenizer (and so which packed data) it reads.

Three kinds:

- ``scratch``: a preset architecture, trained from random weights with the tokenizer lmforge trains
  on the corpus (``<artifacts>/tokenizer``); every scratch candidate shares it: ``packed/trained``;
- ``as_is``: an existing model, evaluated without training, with its own tokenizer;
- ``adapt``: an existing model, further pretrained on the corpus with its own tokenizer
  (``pretrain.adapt`` lowers the learning rate, the candidate's ``train`` overrides come last).

Each pretrained tokenizer gets its own packed data, ``packed/<base model>``, shared by every
candidate of that base model.  Candidates with different tokenizers are compared in bits per byte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.params import LmforgeError, Params
from lmforge.sources import Source, resolve_source
from models.train_config import TrainConfig

#: The tokenizer lmforge trains on the corpus (stage ``tokenizer``), shared by scratch candidates.
TRAINED = "trained"


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # scratch | as_is | adapt
    train: TrainConfig  # the training settings in force for this candidate
    tokenizer: str  # TRAINED, or the base model's slug
    arch: Any = None  # scratch: models.architectures.ArchConfig
    source: Source | None = None  # as_is / adapt


def resolve(params: Params) -> dict[str, Candidate]:
    """Every candidate by name, or a one-line error naming the bad one."""
    from models.architectures import ArchConfigError, from_name

    resolved: dict[str, Candidate] = {}
    slugs: dict[str, str] = {}
    for c in params.pretrain.candidates:
        if c.source is None:
            try:
                arch = from_name(c.preset, **c.overrides)
            except (ArchConfigError, TypeError) as exc:
                raise LmforgeError(f"pretrain.candidates '{c.name}': {exc}") from None
            train = dataclasses.replace(params.pretrain.train, **c.train)
            resolved[c.name] = Candidate(c.name, "scratch", train, TRAINED, arch=arch)
            continue
        source = resolve_source(params, c)
        if slugs.setdefault(source.slug, source.location) != source.location:
            raise LmforgeError(f"pretrain.candidates '{c.name}': sources {slugs[source.slug]} and {source.location} share the name "
                               f"'{source.slug}'; rename one")
        overrides = {**(params.pretrain.adapt if c.use == "adapt" else {}), **c.train}
        train = dataclasses.replace(params.pretrain.train, **overrides)
        resolved[c.name] = Candidate(c.name, c.use, train, source.slug, source=source)
    return resolved


def get(params: Params, name: str, stage: str) -> Candidate:
    candidates = resolve(params)
    if name not in candidates:
        raise LmforgeError(f"{stage}: no candidate '{name}' (candidates: {', '.join(candidates)})")
    return candidates[name]


def scratch_archs(params: Params) -> dict[str, Any]:
    """The architecture of every scratch candidate (what the trained tokenizer must serve)."""
    return {name: c.arch for name, c in resolve(params).items() if c.kind == "scratch"}


def base_model_dir(params: Params, slug: str) -> Path:
    return params.stage_dir("base_models") / slug


def tokenizer_dir(params: Params, tokenizer: str) -> Path:
    """The directory ``AutoTokenizer`` loads for a tokenizer name."""
    return params.stage_dir("tokenizer") / "hf" if tokenizer == TRAINED else base_model_dir(params, tokenizer)


def packed_dir(params: Params, tokenizer: str) -> Path:
    return params.stage_dir("packed") / tokenizer


def tokenizers_in_use(params: Params) -> list[str]:
    """Tokenizer names the candidates need packed data for, in params order (the trained one first)."""
    return list(dict.fromkeys(c.tokenizer for c in sorted(resolve(params).values(), key=lambda c: c.tokenizer != TRAINED)))


def sources_in_use(params: Params) -> dict[str, Source]:
    """The distinct sources of the pretrained candidates, by slug."""
    return {c.source.slug: c.source for c in resolve(params).values() if c.source is not None}


def champion_packed_dir(params: Params) -> Path:
    """The packed data of the champion's tokenizer (what compression, distillation and RAG score on)."""
    from lmforge.artifacts import read_summary

    return packed_dir(params, read_summary(params.stage_dir("select")).get("champion_tokenizer", TRAINED))
