"""Typed, strict loading of ``params.yaml``.

``params.yaml`` is the single source of every stage's settings: a stage reads them only from the
``Params`` parsed here (a run's config may override single values for that run), never from
defaults of its own.  The file is parsed into dataclasses (and those of ``models.train_config``,
which the ``models`` code takes as is) so that the rest of the code reads attributes, not dictionary
keys; a key the file leaves out takes its dataclass's default, and a typo in a key is reported as an
error with a suggestion instead of silently falling back to a default.  Nothing here imports
Dagster: notebooks and benchmarks load parameters the same way.

The package is in parts; import from ``lmforge.params``, which re-exports them all:

- ``errors.py``: ``LmforgeError`` (a user mistake, printed as one line) and ``ParamsError``;
- ``root.py``: ``REPO_ROOT``, where relative paths resolve, and ``params_file()``, the file in force;
- ``sections.py``: one dataclass per section of ``params.yaml`` (the comments beside the defaults
  say why; ``lmforge docs`` makes docs/configuration.md from them) and ``Params``, the whole file;
- ``loading.py``: strict conversion of plain data to those dataclasses (``build``), the size tiers
  and ``load_params``, ``deep_merge``, ``with_overrides``.
"""

from __future__ import annotations

from lmforge.params.errors import LmforgeError, ParamsError
from lmforge.params.loading import BASE_TIER, build, current_tier, deep_merge, load_params, tier_names, to_dict, with_overrides
from lmforge.params.root import REPO_ROOT, params_file
from lmforge.params.sections import (
    AutomationParams, BatchInferenceParams, BenchmarksParams, BiasParams, CandidateParams, CandidateUse,
    ClassificationTaskParams, CleanParams, ClusterParams, DedupParams, DistilParams, EvaluateParams,
    ExportParams, FeedbackParams, FewShotParams, FilterParams, FinetuneParams, FinetuneTask,
    FinetuneTrainParams, GgufType, HpsearchParams, IngestParams, LoraParams, MlflowParams, Params,
    PathsParams, PreferenceLoss, PreferenceParams, PretrainParams, PruneParams, QuantizeParams, RagParams,
    RegistryParams, SELECT_FACTORS, STANDARD_TASKS, SamplingParams, SearchDimension, SelectParams,
    ServeParams, SftTaskParams, SourceParams, SourceType, SplitParams, SweepParams, TokenizerParams,
    UserBenchmarkParams, ValidationParams, XSTestParams,
)

__all__ = [
    # errors.py
    "LmforgeError", "ParamsError",
    # root.py
    "REPO_ROOT", "params_file",
    # sections.py
    "PathsParams", "MlflowParams", "SourceType", "SourceParams", "IngestParams", "FilterParams",
    "DedupParams", "ValidationParams", "CleanParams", "SplitParams", "TokenizerParams", "CandidateUse",
    "CandidateParams", "PretrainParams", "SamplingParams", "BiasParams", "EvaluateParams", "STANDARD_TASKS",
    "UserBenchmarkParams", "XSTestParams", "BenchmarksParams", "SELECT_FACTORS", "SelectParams",
    "FinetuneTrainParams", "LoraParams", "ClassificationTaskParams", "SftTaskParams", "FinetuneTask",
    "FinetuneParams", "QuantizeParams", "PruneParams", "DistilParams", "GgufType", "ExportParams",
    "RegistryParams", "FewShotParams", "SweepParams", "RagParams", "BatchInferenceParams",
    "AutomationParams", "ServeParams", "FeedbackParams", "PreferenceLoss", "PreferenceParams",
    "SearchDimension", "HpsearchParams", "ClusterParams", "Params",
    # loading.py
    "BASE_TIER", "build", "current_tier", "deep_merge", "load_params", "tier_names", "to_dict",
    "with_overrides",
]
