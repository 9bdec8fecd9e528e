"""The sections of ``params.yaml`` as dataclasses, and ``Params``, the whole file.

Each default is written once, here (or in ``models.train_config``, whose dataclasses ``models`` takes
as is), and the comment beside it says why it was chosen: ``lmforge docs`` turns these comments into
the configuration reference (docs/configuration.md).  Validation that spans several keys of a
section is its ``__post_init__``; a ``ValueError`` there becomes a ``ParamsError`` with the section's
path when a params file is loaded (``lmforge.params.loading.build``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.params.errors import ParamsError
from lmforge.params.root import REPO_ROOT
from models.train_config import VARIANTS, DistilSettings, MixedPrecision, OnnxPrecision, Scale, TrainConfig, Variant


@dataclass
class PathsParams:
    raw: str = "data/raw"  # the demo corpus and the default ingest source
    finetune: str = "data/finetune"  # task sets for fine-tuning (classification, summarisation)
    artifacts: str = "artifacts"  # every stage writes <artifacts>/<stage>/


@dataclass
class MlflowParams:
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"  # the registry needs a database backend
    experiment: str = "lmforge"


SourceType = Literal["directory", "hf_disk", "hf_files", "hf_hub"]


@dataclass
class SourceParams:
    """One ingest source.  ``type`` picks how it is read:

    - ``directory``: files under ``path`` (recursive), filtered by ``include``/``exclude`` globs;
    - ``hf_disk``: a dataset saved with ``datasets.save_to_disk`` at ``path``;
    - ``hf_files``: ``datasets.load_dataset(builder, data_files=path)`` on local files;
    - ``hf_hub``: ``datasets.load_dataset(name, config, split=split)``, streamed (needs network, or a
      local dataset directory given as ``name``).
    """

    name: str = "raw"
    type: SourceType = "directory"
    path: str | None = None  # None means paths.raw
    include: list[str] = field(default_factory=lambda: ["**/*"])
    exclude: list[str] = field(default_factory=lambda: ["**/.*"])  # hidden files (.gitkeep, .DS_Store)
    text_field: str = "text"  # field/column holding the text in JSON, JSONL, CSV, Parquet and HF data
    builder: str | None = None  # hf_files: "json", "csv", "parquet", "text"; None guesses from suffix
    config: str | None = None  # hf_hub: dataset configuration name
    split: str = "train"  # hf_*: which split to read


@dataclass
class IngestParams:
    sources: list[SourceParams] = field(default_factory=lambda: [SourceParams()])
    # A single document larger than this is quarantined rather than loaded: one runaway file (a log,
    # a dump) must not dominate the corpus or the memory of the run.
    max_document_bytes: int = 10_000_000
    num_proc: int = 2  # worker processes converting files; 2 cores is the laptop target


@dataclass
class FilterParams:
    """Gopher-style quality heuristics (Rae et al. 2021), loosened where technical text needs it."""

    min_words: int = 20  # Gopher uses 50; package READMEs are often short but still useful
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1  # '#' and '...' per word: markers of lists of hashtags or truncation
    min_alpha_word_fraction: float = 0.6  # Gopher: 0.8; code snippets in docs lower it legitimately
    max_duplicate_line_fraction: float = 0.3  # boilerplate repeated line after line


@dataclass
class DedupParams:
    exact: bool = True  # drop documents whose cleaned text is identical to an earlier one
    # near: "remove" quarantines near duplicates; "cluster" keeps them but tags a cluster id so the
    # split keeps each cluster in one split; "off" skips MinHash entirely (fastest, leaks most).
    near: Literal["remove", "cluster", "off"] = "remove"
    threshold: float = 0.8  # estimated Jaccard similarity of word shingles
    num_perm: int = 64  # permutations: 64 estimates Jaccard within ~±0.06, at half the cost of 128
    shingle_words: int = 5  # word 5-grams: short enough to match paraphrase, long enough to be rare


@dataclass
class ValidationParams:
    """Thresholds of the great-expectations suite run as blocking checks on the cleaned data."""

    min_rows: int = 10
    min_chars: int = 1
    max_chars: int = 1_000_000
    max_rejection_ratio: float = 0.9  # more than this quarantined means the input or config is wrong


@dataclass
class CleanParams:
    # Applied in this order.  Available: fix_mojibake, normalize_unicode, strip_markup,
    # remove_control_chars, scrub_pii, remove_special_chars, lowercase, remove_stopwords, lemmatize,
    # normalize_whitespace.  The last five of the optional ones are off by default: lowercasing,
    # stopword removal and lemmatisation destroy information a generative model must learn.
    steps: list[str] = field(
        default_factory=lambda: [
            "fix_mojibake",
            "normalize_unicode",
            "strip_markup",
            "remove_control_chars",
            "normalize_whitespace",
        ]
    )
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"  # NFC keeps the text as written
    language: str = "en"  # for stopwords and lemmatisation
    filters: FilterParams = field(default_factory=FilterParams)
    dedup: DedupParams = field(default_factory=DedupParams)
    validation: ValidationParams = field(default_factory=ValidationParams)
    num_proc: int = 2  # worker processes for cleaning and MinHash; 2 cores is the laptop target


@dataclass
class SplitParams:
    train: float = 0.90
    val: float = 0.05
    test: float = 0.05
    seed: str = "lmforge"  # salts the hash: change it to draw a different, still deterministic, split

    def __post_init__(self) -> None:
        ratios = (self.train, self.val, self.test)
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            raise ParamsError(f"split: train + val + test must be non-negative and sum to 1, got {ratios}")


@dataclass
class TokenizerParams:
    algorithm: Literal["bpe", "wordpiece", "unigram", "char"] = "bpe"  # bpe is byte-level: no UNK ever
    vocab_size: int = 8192  # small corpora: a few thousand; 32k–64k for billions of tokens
    min_frequency: int = 2  # a merge/piece seen once is noise
    # train on at most this many train documents, a sample seeded by sample_seed (the same on both data
    # engines; on Ray it is drawn on the cluster); 0: all of them.  A few GB of text gives the vocabulary.
    sample_documents: int = 0
    sample_seed: int = 0
    normalizer: Literal["none", "nfc", "nfkc", "lowercase"] = "nfc"  # nfc: the cleaned text is NFC already
    extra_ids: int = 100  # T5 sentinel tokens, added when a candidate is an encoder-decoder
    max_unk_rate: float = 0.01  # blocking check: more unknown tokens means the vocabulary is too small
    block_size: int = 256  # packed block length in tokens (the longest candidate context is typical)
    dtype: Literal["auto", "uint16", "uint32"] = "auto"  # token id storage; auto: the smallest that fits
    num_proc: int = 2


CandidateUse = Literal["as_is", "adapt"]


@dataclass
class CandidateParams:
    """One candidate: trained from scratch (``preset`` plus ``overrides``, see models/architectures.py),
    or an existing model (``source``) evaluated ``as_is`` or adapted to the corpus (``adapt``:
    continued pretraining with its own tokenizer).  ``lmforge.candidates`` resolves an entry."""

    name: str = "gpt"
    preset: str | None = None  # from scratch: a preset of models/architectures.py
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields (position, n_layer, ...)
    # An existing model: a local Hugging Face directory, a .gguf file (dequantized once, cached as
    # safetensors) or a hub id "org/name" (needs network, or a hub cache with HF_HUB_OFFLINE=1).
    source: str | None = None
    use: CandidateUse = "as_is"  # what to do with a source: evaluate it as is, or adapt it
    revision: str | None = None  # hub sources: a branch, tag or commit (None: the default branch)
    sha256: str | None = None  # a file source's pinned hash: another file is refused
    licence: str | None = None  # declared licence (None: read from the model's card or config, else unknown)
    train: dict[str, Any] = field(default_factory=dict)  # this candidate's overrides of pretrain.train
    # Safety of loading: pickled weights (.bin, .pt) can run code when loaded, and so can a model's own
    # Python code.  Both are refused unless switched on here, for this one candidate.
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.source is None):
            raise ValueError(f"candidate '{self.name}': give either a preset (train from scratch) or a source (an existing model)")
        if self.source is None and self.use != "as_is":
            raise ValueError(f"candidate '{self.name}': use applies to a source; a preset is always trained from scratch")


@dataclass
class PretrainParams:
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: Scale = field(default_factory=Scale)
    # Overrides of ``train`` for candidates with ``use: adapt``: a pretrained model is already near a
    # good minimum, and the learning rate of a from-scratch run would wreck it ("catastrophic
    # forgetting"); a short warm-up lets Adam's moment estimates settle before full steps.
    adapt: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-4, "warmup_steps": 10, "min_lr_ratio": 0.1})
    candidates: list[CandidateParams] = field(
        default_factory=lambda: [CandidateParams("llama-rope", "cpu-small"), CandidateParams("bloom-alibi", "cpu-small", {"position": "alibi"})]
    )

    def __post_init__(self) -> None:
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidates: names must be unique, got {', '.join(names)}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for where, overrides in [("adapt", self.adapt), *((f"candidates '{c.name}'.train", c.train) for c in self.candidates)]:
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise ValueError(f"{where}: unknown training setting(s) {', '.join(unknown)} (settings: {', '.join(sorted(fields))})")


@dataclass
class SamplingParams:
    """How text is sampled (``lmforge generate`` and the evaluation's samples)."""

    max_new_tokens: int = 40
    temperature: float = 0.8  # 0: greedy (argmax); higher: more varied text
    top_k: int = 50  # sample among the k most likely tokens; 0: no limit
    top_p: float = 0.95  # nucleus: the smallest set holding this probability mass; 1.0: no limit
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens; 1.0: off
    seed: int = 1337  # sampled text is reproducible

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("sampling: need temperature ≥ 0, top_k ≥ 0, 0 < top_p ≤ 1, max_new_tokens ≥ 1")


@dataclass
class BiasParams:
    """Social bias on CrowS-Pairs (the ``ethics`` factor of selection): the share of sentence pairs
    where a candidate prefers the more stereotyping sentence (docs/evaluation-and-selection.md)."""

    file: str | None = "evalsets/crows_pairs/crows_pairs_anonymized.csv"  # CrowS-Pairs CSV, shipped in git (CC BY-SA 4.0); null: not measured
    max_pairs: int = 0  # a seeded sample stratified by bias type; 0: all 1,508 pairs
    batch_size: int = 16  # sentences per forward pass
    seed: int = 1337  # the sample: every candidate is scored on the same pairs

    def __post_init__(self) -> None:
        if self.max_pairs < 0 or self.batch_size < 1:
            raise ValueError("bias: need max_pairs ≥ 0 (0: all) and batch_size ≥ 1")


@dataclass
class EvaluateParams:
    splits: list[Literal["val", "test"]] = field(default_factory=lambda: ["val", "test"])
    batch_size: int = 8
    max_blocks: int = 0  # blocks scored per split; 0: all (cap it for big held-out sets)
    context_multiples: list[int] = field(default_factory=lambda: [1, 2, 4])  # × the training block length
    speed_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    speed_new_tokens: int = 32  # generated tokens per timing (KV cache on)
    speed_rounds: int = 3  # quantize and prune time their models side by side in this many alternating rounds
    prompts: list[str] = field(
        default_factory=lambda: ["The model", "This package provides", "Python is", "To install the library,"]
    )
    sampling: SamplingParams = field(default_factory=SamplingParams)
    bias: BiasParams = field(default_factory=BiasParams)


#: The standard benchmarks lmforge knows (``lmforge.benchdata.STANDARD``; docs/benchmarks.md).
STANDARD_TASKS = ("hellaswag", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa", "truthfulqa_mc1", "gsm8k")


@dataclass
class UserBenchmarkParams:
    """A benchmark of the user's own: a JSONL file scored exactly like the standard ones."""

    name: str = ""  # the task's name in summaries and tags (letters, digits, _)
    file: str = ""  # JSONL; relative to the repository root
    type: Literal["multiple_choice", "exact_match"] = "multiple_choice"
    question_field: str = "question"
    choices_field: str = "choices"  # multiple_choice: a list of strings
    answer_field: str = "answer"  # multiple_choice: the right choice's index, letter or text; exact_match: the answer

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name or ""):
            raise ValueError(f"user: name {self.name!r} must be lowercase letters, digits and _ (a task name)")
        if self.name in STANDARD_TASKS:
            raise ValueError(f"user: name {self.name!r} is a standard task's")
        if not self.file:
            raise ValueError(f"user '{self.name}': file is required")


@dataclass
class XSTestParams:
    """XSTest (Röttger et al. 2024): refusals of unsafe prompts and over-refusals of safe ones, judged
    by the authors' string matcher on the model's greedy chat answers (the ``ethics`` factor)."""

    max_prompts: int = 40  # a seeded sample, half safe, half unsafe; 0: all 450; the factor needs a chat model
    max_new_tokens: int = 24  # the matcher reads the answer's opening words only


@dataclass
class BenchmarksParams:
    """Standard benchmarks through EleutherAI's lm-evaluation-harness (docs/benchmarks.md)."""

    dir: str = "evalsets/standard"  # where `lmforge fetch-benchmarks` writes the pinned files (make does)
    tasks: list[str] = field(default_factory=lambda: [t for t in STANDARD_TASKS if t != "gsm8k"])
    max_items: int = 0  # a seeded subset per task (the same items for every model); 0: every item
    num_fewshot: dict[str, int] = field(default_factory=dict)  # per task; a task not named here: 0-shot
    batch_size: int = 16  # requests per forward pass
    max_gen_tokens: int = 256  # generation tasks (gsm8k, exact_match benchmarks)
    seed: int = 1337
    xstest: XSTestParams = field(default_factory=XSTestParams)
    user: list[UserBenchmarkParams] = field(default_factory=list)
    contamination_ngram: int = 13  # word n-grams shared with the training split mark an item contaminated (GPT-3's 13)
    exclude_contaminated: bool = True  # leave contaminated items out of every score
    max_regression: float = 1.0  # accuracy points a derived model may lose against its parent (and 2 paired standard errors)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(STANDARD_TASKS))
        if unknown:
            raise ValueError(f"tasks: unknown {', '.join(unknown)} (known: {', '.join(STANDARD_TASKS)}; your own go under `user`)")
        unknown = sorted(set(self.num_fewshot) - set(STANDARD_TASKS) - {u.name for u in self.user})
        if unknown or any(k < 0 for k in self.num_fewshot.values()):
            raise ValueError(f"num_fewshot: need task names with counts ≥ 0 (unknown: {', '.join(unknown) or 'none'})")
        if self.max_items < 0 or self.batch_size < 1 or self.contamination_ngram < 1 or self.max_regression < 0:
            raise ValueError("benchmarks: need max_items ≥ 0, batch_size ≥ 1, contamination_ngram ≥ 1, max_regression ≥ 0")
        if len({u.name for u in self.user}) != len(self.user):
            raise ValueError("user: two benchmarks share a name")


#: The factors of model selection, each normalised to [0, 1] (1: the best candidate).
SELECT_FACTORS = ("quality", "accuracy", "speed", "memory", "size", "training_cost", "context", "context_window", "licence", "ethics")


@dataclass
class SelectParams:
    """Weights of the factor matrix (normalised: only their ratios matter; 0 drops a factor)."""

    weights: dict[str, float] = field(
        default_factory=lambda: {
            "quality": 0.5, "accuracy": 0.3, "speed": 0.1, "memory": 0.05, "size": 0.05, "training_cost": 0.1,
            "context": 0.1, "context_window": 0.05, "licence": 0.05, "ethics": 0.1,
        }
    )
    # Licences a user may deploy without asking a lawyer: a candidate under one of them (or trained
    # here from scratch: "own") scores 1 on the licence factor, any other or an unknown one scores 0.
    open_licences: list[str] = field(default_factory=lambda: ["own", "apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0"])

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(SELECT_FACTORS))
        if unknown:
            raise ValueError(f"weights: unknown factor(s) {', '.join(unknown)} (factors: {', '.join(SELECT_FACTORS)})")
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.weights.values()) or not sum(self.weights.values()) > 0:
            raise ValueError("weights: need non-negative numbers with a positive sum")
        self.open_licences = [x.lower() for x in self.open_licences]


@dataclass
class FinetuneTrainParams:
    epochs: int = 6  # passes over the task's train part (early stopping may end sooner)
    batch_size: int = 8
    lr: float = 5e-4  # full fine-tuning: a fraction of the pretraining rate
    lora_lr: float = 2e-3  # LoRA trains few weights, the update starting from zero: a higher rate
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    patience: int = 2  # epochs without a better val score before stopping; 0: off
    max_length: int = 256  # tokens per example (≤ the model's context)
    precision: MixedPrecision = "auto"  # training steps only; scoring stays in the model's dtype (models/precision.py)
    seed: int = 1337


@dataclass
class LoraParams:
    r: int = 8  # rank of the update matrices
    alpha: int = 16  # scaling = alpha / r
    dropout: float = 0.05
    target_modules: str = "all-linear"  # peft's shorthand: every linear layer except the output head


@dataclass
class ClassificationTaskParams:
    """Sequence classification: ``text`` → one of ``labels`` (an unknown label is refused)."""

    file: str = "classification.jsonl"  # under paths.finetune; .jsonl or .csv
    text_field: str = "text"
    label_field: str = "label"
    group_field: str | None = "source"  # examples sharing it stay in one split (no leakage); null: none
    labels: list[str] = field(default_factory=lambda: ["readme", "module", "api"])


@dataclass
class SftTaskParams:
    """Supervised fine-tuning of a causal model on prompt/response pairs (summarisation in the demo)."""

    file: str = "summarisation.jsonl"
    prompt_field: str = "document"
    response_field: str = "summary"
    group_field: str | None = "package"
    template: str = "{prompt}\nSummary:"  # the model sees this, then learns to write " {response}<eos>"
    max_prompt_tokens: int = 192  # a longer prompt keeps its beginning
    max_new_tokens: int = 32  # generated for scoring (greedy)


#: The kinds of fine-tuning task (``finetune.tasks``), each with its section of ``finetune``.
FinetuneTask = Literal["classification", "sft"]


@dataclass
class FinetuneParams:
    # The tasks to read, validate and fine-tune on; the others are skipped (their files are not read),
    # so a user who brings only a classification set lists only it.
    tasks: list[FinetuneTask] = field(default_factory=lambda: ["classification", "sft"])
    methods: list[Literal["full", "lora"]] = field(default_factory=lambda: ["full", "lora"])
    min_examples: int = 50  # blocking check: a smaller task set cannot be evaluated meaningfully
    # Caps on the examples used from each part (a seeded sample; 0: all).  Fine-tuning a 135 M model
    # trains ~30 tokens/s on 2 CPU cores: the demo caps what a GPU runs whole.  Baselines use the same parts.
    max_train_examples: int = 0
    max_eval_examples: int = 0  # for val and for test each
    val_fraction: float = 0.2  # by a hash of the example: adding examples does not reshuffle the rest
    test_fraction: float = 0.2
    train: FinetuneTrainParams = field(default_factory=FinetuneTrainParams)
    lora: LoraParams = field(default_factory=LoraParams)
    classification: ClassificationTaskParams = field(default_factory=ClassificationTaskParams)
    sft: SftTaskParams = field(default_factory=SftTaskParams)

    def __post_init__(self) -> None:
        known = typing.get_args(FinetuneTask)
        unknown = [t for t in self.tasks if t not in known]  # run config bypasses the Literal check of params files
        if unknown:
            raise ValueError(f"tasks: unknown task {unknown[0]!r} (tasks: {', '.join(known)})")
        twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if twice:
            raise ValueError(f"tasks: {', '.join(twice)} listed more than once")
        if not self.methods:
            raise ValueError("methods: name at least one of full, lora")
        if not (0 < self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be positive and leave a train part")


@dataclass
class QuantizeParams:
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))  # every variant models.quantization builds
    max_perplexity_increase: float = 0.02  # blocking check: the chosen variant loses at most this (relative)
    speedup_goal: float = 1.5  # reported (speed_goal_met): the chosen variant's slowest round beats fp32 by this at every batch size
    # int8_dynamic leaves these linear layers (fnmatch on module names) in fp32: in gated-MLP models
    # (Llama, Mistral, Qwen) the input of the MLP's output projection carries activation outliers that
    # int8 activations clip (SmolLM2-135M: test perplexity +270% with them quantized, +13% without)
    keep_full_precision: list[str] = field(default_factory=lambda: ["*down_proj"])


@dataclass
class PruneParams:
    sparsity: float = 0.3  # share of each linear layer's weights (unstructured) or output rows (structured)
    methods: list[Literal["unstructured", "structured"]] = field(default_factory=lambda: ["unstructured", "structured"])

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity: must be in (0, 1), got {self.sparsity}")


@dataclass
class DistilParams(DistilSettings):
    """The student's architecture; how it is trained is ``models.train_config.DistilSettings``."""

    student_preset: str = "tiny"  # a smaller preset than the champion's
    student_overrides: dict[str, Any] = field(default_factory=dict)


GgufType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


@dataclass
class ExportParams:
    """GGUF files of the champion for llama.cpp and Ollama, and ONNX models for ONNX Runtime
    (`lmforge serve --engine onnx`) (docs/compression-and-registry.md#export-for-deployment)."""

    converter_dir: str = "tools/llama.cpp"  # llama.cpp's convert_hf_to_gguf.py, from `lmforge fetch-converter` (make does)
    types: list[GgufType] = field(default_factory=lambda: ["q8_0", "q4_1"])
    onnx: list[OnnxPrecision] = field(default_factory=lambda: ["int8"])  # ONNX Runtime GenAI's model builder
    # blocking check: each file, read back (GGUF by transformers, ONNX by ONNX Runtime), scores the champion's
    # test perplexity within this (relative); each of `types` and `onnx_<precision>` needs one
    max_perplexity_increase: dict[str, float] = field(default_factory=lambda: {"q8_0": 0.01, "q4_1": 0.05, "onnx_int8": 0.02})

    def kinds(self) -> list[str]:
        """What the stage writes: the GGUF types, then ``onnx_<precision>`` per ONNX model."""
        return [*self.types, *(f"onnx_{p}" for p in self.onnx)]

    def __post_init__(self) -> None:
        missing = [t for t in self.kinds() if t not in self.max_perplexity_increase]
        if missing:
            raise ValueError(f"max_perplexity_increase: give a tolerance for {', '.join(missing)} (every type in types and every onnx_<precision> needs one)")


@dataclass
class RegistryParams:
    name: str = "lmforge"  # the registered model in MLflow: models:/lmforge@champion


@dataclass
class FewShotParams:
    k: int = 2  # examples shown before the question
    selection: list[Literal["fixed", "retrieved"]] = field(default_factory=lambda: ["fixed", "retrieved"])  # each is evaluated
    example_words: int = 40  # an example's text is cut to this many words: several must fit the context


@dataclass
class SweepParams:
    temperature: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])  # 0: greedy (top_k/top_p unused)
    top_k: list[int] = field(default_factory=lambda: [0, 40])
    top_p: list[float] = field(default_factory=lambda: [0.9, 1.0])
    examples: int = 24  # per task set (val part), per setting
    max_new_tokens: int = 24


@dataclass
class RagParams:
    """Retrieval over the cleaned corpus, RAG, prompt templates and the sampling sweep (docs/rag-and-prompts.md)."""

    chunk_words: int = 120  # words per chunk
    overlap_words: int = 30  # words shared by neighbouring chunks
    encoder: Literal["champion", "none"] = "champion"  # dense index from the champion's hidden states; none: BM25 only
    encoder_max_tokens: int = 128
    retrieval: Literal["best", "hybrid", "bm25", "dense"] = "best"  # what RAG uses; best: the highest MRR on the known items
    top_k: int = 3  # chunks put into the prompt
    queries: int = 200  # known-item queries, from held-out (val/test) chunks
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    continuations: int = 60  # held-out continuations scored with and without retrieval
    continuation_words: int = 30  # words scored after a lead-in of as many words
    templates: str = "prompts"  # template files (rag.txt, summarise.txt, classify.txt), under version control
    few_shot: FewShotParams = field(default_factory=FewShotParams)
    eval_examples: int = 60  # test examples per task set for rag_eval and prompt_eval
    sweep: SweepParams = field(default_factory=SweepParams)
    seed: int = 1337

    def __post_init__(self) -> None:
        if not 0 <= self.overlap_words < self.chunk_words:
            raise ValueError("rag: need 0 ≤ overlap_words < chunk_words")
        if 2 * self.continuation_words > self.chunk_words:
            raise ValueError("rag: a lead-in and a continuation (2 × continuation_words) must fit in chunk_words")


@dataclass
class BatchInferenceParams:
    """Completions for a file of prompts, batched and resumable: the asset ``batch_inference`` and
    ``lmforge generate --file PROMPTS.jsonl --output OUT.jsonl`` (docs/batch-inference.md)."""

    # JSONL (one object a line) or CSV (a header row); relative to the repository root.  Not under
    # ``paths``: every stage's version includes ``paths``, and moving the prompts must not re-run them all.
    file: str = "data/prompts/prompts.jsonl"
    prompt_field: str = "prompt"  # the prompt text (JSONL field, CSV column)
    id_field: str = "id"  # a row's id (string or integer; unique); absent: its line number
    messages_field: str = "messages"  # JSONL: a chat conversation ([{role, content}, ...]) instead of a prompt
    model: str | None = None  # a model directory or MLflow URI; None: models:/<registry.name>@champion
    batch_size: int = 8  # prompts per model.generate call; also how much a killed run can lose
    # auto: an instruct model (its tokenizer has a chat template) gets each prompt as a user message;
    # true: required (an error without a template); false: the raw text is completed
    chat: Literal["auto", True, False] = "auto"
    # params.yaml sets greedy (temperature 0): the same prompts give the same completions, resumed or not
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")


@dataclass
class AutomationParams:
    """Schedules and sensors (dagster_project/schedules.py, sensors.py); read when the code location loads."""

    retrain_cron: str = "0 4 * * 1"  # weekly: retraining follows slow-moving sources
    retrain_tier: str = "demo"  # the size tier that scheduled and sensor-started runs use
    settle_seconds: int = 30  # a file still being copied changes size/mtime: wait until the sources are quiet


@dataclass
class ServeParams:
    """``lmforge serve``: the OpenAI-compatible server (docs/serving.md); command-line options override these."""

    model: str | None = None  # a model directory or MLflow URI; None: models:/<registry.name>@champion
    host: str = "127.0.0.1"  # another address needs an API key (--api-key or $LMFORGE_API_KEY)
    port: int = 8000
    # dynamic: requests in dynamic batches; continuous: greedy ones join and leave the running batch at every
    # step (transformers' continuous batching), sampled ones in dynamic batches (docs/serving.md#batching)
    # onnx: greedy ones by continuous batching over the model's ONNX twin of onnx_precision in ONNX Runtime (fastest here)
    engine: Literal["dynamic", "continuous", "onnx"] = "dynamic"
    onnx_precision: OnnxPrecision = "int8"  # the onnx engine's model: the export stage's (tagged on the version), else built once
    max_batch_size: int = 32  # requests generated together (a dynamic batch; a continuous or onnx step)
    batch_wait_ms: float = 50.0  # how long the first request of a dynamic batch waits for others to join
    kv_cache_tokens: int = 16384  # the continuous engine's paged KV cache, allocated once (SmolLM2-135M: ~46 KB a token)
    max_tokens: int = 64  # when a request does not say
    max_tokens_limit: int = 512  # the most a request may ask for
    max_request_bytes: int = 1_048_576  # a larger body is refused (413) before it is read
    max_requests_per_client: int = 32  # requests one client (address) may have queued or generating; more: 429
    follow_seconds: float = 30.0  # serving models:/NAME@ALIAS: how often to check whether the alias moved (0: never)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_ms < 0 or not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ValueError("serve: need max_batch_size ≥ 1, batch_wait_ms ≥ 0, 1 ≤ max_tokens ≤ max_tokens_limit")
        if self.kv_cache_tokens < 256:
            raise ValueError(f"serve.kv_cache_tokens: at least one page of 256 tokens, got {self.kv_cache_tokens}")
        if self.max_request_bytes < 1024 or self.max_requests_per_client < 1 or self.follow_seconds < 0:
            raise ValueError("serve: need max_request_bytes ≥ 1024, max_requests_per_client ≥ 1 and follow_seconds ≥ 0")


@dataclass
class FeedbackParams:
    """User feedback on served answers → SFT examples → fine-tuning → the alias moves only if better (docs/serving.md)."""

    store: str = "feedback/feedback.db"  # SQLite: every served request and every feedback (written before the reply)
    inbox: str = "feedback/inbox"  # JSONL files dropped here are bulk feedback
    min_rating: int = 4  # ratings 1-5; an answer rated this or higher (without a correction) becomes an example
    max_chars: int = 4000  # a longer prompt or answer is quarantined
    max_rejection_ratio: float = 0.5  # blocking: more feedback quarantined than this stops the loop (a broken client, spam)
    min_new_examples: int = 20  # the sensor starts fine-tuning when this many new accepted examples arrived
    sensor_interval_seconds: int = 60
    alias: str = "champion"  # the alias fine-tuning starts from, and moves when the new model is better
    method: Literal["full", "lora"] = "lora"
    epochs: int = 2
    lr: float = 0.0005
    include_task_train: bool = True  # train on the sft task set's train part too, not on feedback alone
    min_improvement: float = 0.0  # held-out ROUGE-L the new model must gain over the current one (strictly more)

    def __post_init__(self) -> None:
        if not 1 <= self.min_rating <= 5 or self.min_new_examples < 1 or self.epochs < 1 or self.lr < 0:
            raise ValueError("feedback: need 1 ≤ min_rating ≤ 5, min_new_examples ≥ 1, epochs ≥ 1, lr ≥ 0")


#: TRL's DPO losses (trl.DPOConfig.loss_type): sigmoid is the DPO paper's; ipo, hinge and robust are its common variants.
PreferenceLoss = Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down", "exo_pair", "nca_pair", "bco_pair",
                         "sppo_hard", "aot", "discopop"]


@dataclass
class PreferenceParams:
    """What users prefer → chosen/rejected pairs → DPO (TRL) → held-out preference accuracy and benchmark gates →
    the alias moves only when both pass (docs/preference-and-search.md).  The store, inbox, ratings, alias and
    rejection limit are the feedback section's."""

    files: list[str] = field(default_factory=list)  # your own pairs: JSONL globs, rows {prompt, chosen, rejected} or chat messages
    max_rejected_rating: int = 2  # for one prompt, an answer rated feedback.min_rating+ is preferred to one rated at most this
    heldout_fraction: float = 0.25  # pairs (by a hash of the prompt) kept out of training for the accuracy gate
    min_pairs: int = 4  # blocking check: at least this many training pairs and one held-out pair
    min_new_pairs: int = 20  # the feedback_arrived sensor starts preference_job at this many new pairs
    method: Literal["full", "lora"] = "lora"  # lora: the reference model is the same weights with the adapter switched off
    reference: str | None = None  # the DPO reference model (a directory or MLflow URI); None: the model tuned from (feedback.alias)
    beta: float = 0.1  # how far the tuned model may move from the reference (the KL penalty's inverse temperature)
    loss_type: PreferenceLoss = "sigmoid"
    epochs: int = 2
    lr: float = 0.0005  # LoRA; full tuning wants ~1e-6..1e-5
    batch_size: int = 4  # pairs per step
    max_length: int = 256  # tokens of prompt + answer (a long prompt keeps its start)
    seed: int = 1337
    min_improvement: float = 0.0  # held-out preference accuracy the tuned model must gain over the current one (strictly more)

    def __post_init__(self) -> None:
        if not 1 <= self.max_rejected_rating <= 5 or not 0 < self.heldout_fraction < 1 or self.min_pairs < 1 or self.min_new_pairs < 1:
            raise ValueError("preference: need 1 ≤ max_rejected_rating ≤ 5, 0 < heldout_fraction < 1, min_pairs ≥ 1, min_new_pairs ≥ 1")
        if self.beta <= 0 or self.epochs < 1 or self.lr < 0 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError("preference: need beta > 0, epochs ≥ 1, lr ≥ 0, batch_size ≥ 1, max_length ≥ 8")


@dataclass
class SearchDimension:
    """One searched setting: a float (log scale for rates), an int, or one of a list."""

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.type == "categorical" and not self.choices:
            raise ValueError("a categorical dimension needs choices")
        if self.type != "categorical" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"a {self.type} dimension needs low ≤ high")


@dataclass
class HpsearchParams:
    """An Optuna study over the settings of a pretraining candidate or of SFT fine-tuning
    (docs/preference-and-search.md#hyper-parameter-search)."""

    # what each trial trains: pretrain: `candidate` (from scratch, or `use: adapt`), scored by its final
    # val loss; finetune_sft: the champion fine-tuned on the SFT task set with `method`, scored by its best epoch's val loss
    stage: Literal["pretrain", "finetune_sft"] = "pretrain"
    candidate: str = "llama-rope"
    method: Literal["lora", "full"] = "lora"
    # dotted params keys → dimensions, e.g. pretrain.train.lr: {type: float, low: 1e-4, high: 1e-2, log: true}
    space: dict[str, SearchDimension] = field(default_factory=dict)
    max_steps: int | None = None  # a pretraining trial's steps; None: the candidate's own (then the overlay run repeats the best trial)
    trials: int = 8  # the study's size: a resumed study runs only the trials it still lacks
    max_minutes: float | None = None  # this materialization's wall-clock budget (a trial running at the limit finishes)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "none"] = "median"  # stop a trial whose validation curve is below the median of earlier ones
    startup_trials: int = 2  # trials before the sampler and the pruner use what earlier ones learned
    engine: Literal["local", "ray"] = "local"  # ray: trials as Ray tasks on the cluster below, sharing the study's storage
    parallel: int = 2  # trials at once on Ray
    storage: str = ""  # the study's database URL; "": SQLite at <artifacts>/hpsearch/study.db (a cluster's nodes need a shared one)
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.trials < 1 or self.startup_trials < 0 or self.parallel < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("hpsearch: need trials ≥ 1, startup_trials ≥ 0, parallel ≥ 1, max_steps ≥ 1 or null")


@dataclass
class ClusterParams:
    """A Ray cluster that pretraining (``pretrain.scale.engine: ray``) and the data stages
    (``data_engine: ray``) hand their work to (docs/scaling-out.md)."""

    data_engine: Literal["local", "ray"] = "local"  # the stages declared with a Ray path (ingest, clean, tokenizer, packed): here, or Ray Data
    # "": a Ray instance on this machine, started for the stage and stopped after it; else a running
    # cluster: "auto" (the one `ray start` runs here), "HOST:6379" (its head), "ray://HOST:10001" (Ray Client).
    # $RAY_ADDRESS, when set, wins (as in every Ray program).
    address: str = ""
    # Ray Train's run storage, which every node must reach: a shared path or a URI (s3://, gs://);
    # "": <artifacts>/ray (enough on one machine)
    storage: str = ""
    workers: int = 2  # Ray Train workers, one process each (one GPU each with use_gpu)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    max_failures: int = 3  # restarts of the training group after a worker or node dies, before the run fails
    # the Ray started here (address ""): with Ray's dashboard on 127.0.0.1:8265, for as long as the stage runs.
    # Off by default: its nine processes cost ~6-10 s of CPU at every start, once per stage
    dashboard: bool = False


@dataclass
class Params:
    """The whole params file: one field per section, in the order of the configuration reference."""

    paths: PathsParams = field(default_factory=PathsParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    clean: CleanParams = field(default_factory=CleanParams)
    split: SplitParams = field(default_factory=SplitParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    benchmarks: BenchmarksParams = field(default_factory=BenchmarksParams)
    select: SelectParams = field(default_factory=SelectParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    quantize: QuantizeParams = field(default_factory=QuantizeParams)
    prune: PruneParams = field(default_factory=PruneParams)
    distil: DistilParams = field(default_factory=DistilParams)
    export: ExportParams = field(default_factory=ExportParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    rag: RagParams = field(default_factory=RagParams)
    batch_inference: BatchInferenceParams = field(default_factory=BatchInferenceParams)
    automation: AutomationParams = field(default_factory=AutomationParams)
    serve: ServeParams = field(default_factory=ServeParams)
    feedback: FeedbackParams = field(default_factory=FeedbackParams)
    preference: PreferenceParams = field(default_factory=PreferenceParams)
    hpsearch: HpsearchParams = field(default_factory=HpsearchParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)

    def path(self, value: str | os.PathLike) -> Path:
        """Resolve a path from a params file: absolute as is, relative against the repo root."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def artifacts(self) -> Path:
        return self.path(self.paths.artifacts)

    def stage_dir(self, stage: str) -> Path:
        return self.artifacts / stage
