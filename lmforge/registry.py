"""Stage ``register``: the champion (and its quantized variant) in the MLflow model registry.

A registered model (``registry.name``) gets one immutable version per registration, each an MLflow
pyfunc model that carries the Hugging Face directory as an artifact and generates text when served
(``mlflow models serve -m models:/NAME@champion``).  Every version is tagged with the git commit, the
DVC data hash, the Dagster run id, its parameters and key metrics; a pretrained version also with its
CrowS-Pairs bias figures (``crows_pairs_*``: overall, per bias type).  Aliases move only when the
model's blocking checks passed:

- ``candidate``: the newest model the pipeline produced;
- ``champion``: the candidate, when it is at least as good (test bits per byte) as the current
  champion on the same data, or when the data changed (scores on other data do not compare); a
  champion fine-tuned on feedback (``lmforge.feedback``) is judged by the version it was tuned from;
- ``quantized``: the chosen quantized variant of the champion, when its perplexity stayed within
  ``quantize.max_perplexity_increase`` and its benchmark gate passed (stage ``register_quantized``,
  behind quantize's blocking check).

Every version carries its benchmark scores as tags (``bench_<task>``, ``bench_<task>_se``,
``bench_accuracy``, ``xstest_*``; ``lmforge.benchmarks``), so ``lmforge registry show`` puts them
next to a model card's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from lmforge.artifacts import read_summary, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.params import REPO_ROOT, LmforgeError, Params
from lmforge.sources import source_tags
from lmforge.stages import Stage
from lmforge.tracking import lineage_tags, tracked_run, tracking_uri
from models.checksums import weights_sha256


REGISTER = Stage(
    "register", group="deploy",
    params=("registry",),
    reads=("benchmark_eval", "select/summary.json", "evaluate", "pretrain"),  # pretrain: the champion's source and architecture
    note="a new registry version each time the champion or its evaluation changes",
)
REGISTER_QUANTIZED = Stage(
    "register_quantized", group="deploy",
    params=("registry",),
    reads=("register/summary.json", "quantize/summary.json", "quantize/models"),
)


class TextGenerator(mlflow.pyfunc.PythonModel):
    """A pyfunc model: prompts in, completions out; sampling options (``SamplingParams``) as params."""

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the loaded model.  MLflow loads it (``load_context``) to check the input example,
        then pickles this object: the weights are the ``model`` artifact already (the pickled copy
        doubled every version: 540 MB more for SmolLM2-135M), and ONNX Runtime's session cannot be pickled."""
        return {}

    def load_context(self, context) -> None:
        from models.generation import load

        self.model, self.tokenizer, _ = load(Path(context.artifacts["model"]))

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from lmforge.params import SamplingParams
        from models.generation import generate

        sampling = SamplingParams(**{k: v for k, v in (params or {}).items() if v is not None})
        return generate(self.model, self.tokenizer, [str(p) for p in model_input], sampling)


def _input_example() -> tuple[list[str], dict[str, Any]]:
    """Prompts and the sampling params: MLflow infers the signature (with its params) from them and
    the type hints of ``TextGenerator.predict``."""
    from lmforge.params import SamplingParams

    return ["The model"], dict(SamplingParams().__dict__)


def _requirements(model_dir: Path) -> list[str]:
    """The packages the pyfunc model needs, at the versions here (ONNX Runtime for an ONNX graph)."""
    from importlib.metadata import version

    from models.loading import read_recipe

    names = ["torch", "transformers", "tokenizers", "safetensors", "pandas", "mlflow", "pyyaml"]
    if (read_recipe(model_dir) or {}).get("runtime") == "onnxruntime":
        names.append("onnxruntime")
    return [f"{name}=={version(name)}" for name in names]


def log_and_register(params: Params, run_id: str, model_dir: Path, tags: dict[str, str]) -> str:
    """Log ``model_dir`` as a pyfunc model in ``run_id`` and register it; return the new version."""
    import mlflow
    from models.generation import use_mlflow_store

    use_mlflow_store(tracking_uri(params))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TextGenerator(),
            artifacts={"model": str(model_dir)},
            code_paths=[str(REPO_ROOT / "models"), str(REPO_ROOT / "lmforge")],
            input_example=_input_example(),
            pip_requirements=_requirements(model_dir),
        )
    version = mlflow.register_model(info.model_uri, params.registry.name, tags=tags).version
    return str(version)


def register_once(params: Params, model_dir: Path, tags: dict[str, str], run_name: str, run_tags: dict[str, str],
                  parent_run_id: str | None) -> tuple[str, str, bool]:
    """Register ``model_dir`` unless a version with the same weights exists: (version, MLflow run id, new?).

    Re-running the pipeline on unchanged inputs reproduces the same weights; registering them again
    would pile up identical versions, so the existing one is reused (its aliases are still updated).
    """
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    sha = weights_sha256(model_dir)
    client = MlflowClient(tracking_uri(params), registry_uri=tracking_uri(params))
    try:
        same = client.search_model_versions(f"name='{params.registry.name}' and tags.weights_sha256='{sha}'")
    except MlflowException:  # no such registered model yet
        same = []
    if same:
        existing = max(same, key=lambda v: int(v.version))
        return str(existing.version), existing.run_id, False
    with tracked_run(params, run_name, run_tags, parent_run_id=parent_run_id) as (_client, run_id):
        version = log_and_register(params, run_id, model_dir, {**tags, "weights_sha256": sha})
    return version, run_id, True


def is_alias(ref: str) -> bool:
    """Whether ``ref`` names a registry alias (``models:/NAME@ALIAS``), which may move to another version."""
    return ref.startswith("models:/") and "@" in ref


def pin_version(ref: str, tracking_uri: str | None) -> tuple[str, str]:
    """(reference to load, resolved version): ``models:/NAME@ALIAS`` is looked up once and pinned to
    ``models:/NAME/VERSION`` (the alias may move while the batch runs); other MLflow URIs are their own
    version, as is a directory (a caller that needs more hashes its files).  ``lmforge serve`` and
    batch inference load the pinned reference, so what they record is what answered."""
    if is_alias(ref):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        name, alias = ref[len("models:/") :].split("@", 1)
        try:
            version = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            raise LmforgeError(f"{ref}: no registered model '{name}' with alias '{alias}' in {tracking_uri} "
                               f"({str(exc).splitlines()[0]}); run `lmforge run --select register` first, or name another "
                               "model (--model)") from None
        pinned = f"models:/{name}/{version}"
        return pinned, pinned
    return ref, ref


def model_directory(ref: str, tracking_uri: str | None) -> tuple[Path, str]:
    """(local directory, version) of a model reference: a directory, or an MLflow URI whose alias is
    pinned first (``pin_version``) and whose artifacts are downloaded; a clear error when it is missing."""
    from models.generation import ModelNotFound, resolve

    pinned, version = pin_version(ref, tracking_uri)
    try:
        return resolve(pinned, tracking_uri), version
    except ModelNotFound as exc:
        hint = "; run `lmforge run --select register` first" if ref.startswith("models:/") else ""
        raise LmforgeError(f"{exc}{hint}") from None


def current(client, name: str, alias: str):
    """The version behind ``name@alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def candidate_source_tags(params: Params, candidate: str) -> dict[str, str]:
    """Source, sha256 and licence of the base model a candidate descends from (none for scratch models)."""
    summary = read_summary(params.stage_dir("pretrain") / candidate, missing_ok=True)
    source = summary.get("source") if summary else None
    return source_tags(source) if source else {}


#: The benchmark scores' summary keys (``lmforge.benchmarks.flat``) that become tags of a version.
BENCHMARK_TAGS = ("bench_", "xstest_")


def number_tags(summary: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, str]:
    """The numbers of a summary whose keys start with one of ``prefixes``, as registry tags."""
    return {k: (f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()
            if k.startswith(prefixes) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def bias_tags(evaluation: dict[str, Any]) -> dict[str, str]:
    """The champion's CrowS-Pairs figures from its evaluation summary (``crows_pairs_*``: the overall
    share of stereotyping preferences, its standard error, |share − 0.5|, the pairs scored and each bias
    type's share), as tags: a registered model says how biased it measured, and on how many pairs."""
    return number_tags(evaluation, ("crows_pairs_",))


#: Registry versions made by tuning a registered version (their ``base_version`` tag): the feedback and preference loops.
TUNED_KINDS = ("feedback", "preference")


def _promote(client, registry: str, reigning, version: str, data_md5: str, bits_per_byte: float) -> bool:
    """Whether the newly registered ``version`` becomes the champion instead of ``reigning``.

    Bits per byte decide on the same data; on other data the new model wins (scores do not compare).
    A champion tuned on users' feedback or preferences (``kind`` feedback or preference, ``lmforge.feedback``,
    ``lmforge.preference``) has no bits per byte of its own: the candidate is judged against the
    pretrained version its chain of tunings started from, and no version of that chain displaces it
    (each tuning was better on held-out data), so a pipeline re-run on the same data keeps the tuned champion."""
    if reigning is None or str(reigning.version) == version or reigning.tags.get("dvc_data_md5") != data_md5:
        return True
    judge = reigning
    if reigning.tags.get("kind") in TUNED_KINDS:
        chain = set()
        while judge.tags.get("kind") in TUNED_KINDS:
            chain.add(judge.tags["base_version"])
            judge = client.get_model_version(registry, judge.tags["base_version"])
        if version in chain:
            return False
        return bits_per_byte < float(judge.tags.get("bits_per_byte", "inf"))  # strictly better than what the tuning started from
    return bits_per_byte <= float(judge.tags.get("bits_per_byte", "inf"))


def run_register(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Register the champion of ``select`` (once per distinct weights), point ``candidate`` at it, and
    ``champion`` too unless the reigning champion scores better on the same data."""
    from mlflow import MlflowClient

    say = ctx.log
    chosen = read_summary(params.stage_dir("select"))
    name = chosen["champion"]
    evaluation = read_summary(params.stage_dir("evaluate") / name)
    benchmarks = read_summary(params.stage_dir("benchmark_eval") / name)
    measured_tags = {**bias_tags(evaluation), **number_tags(benchmarks, BENCHMARK_TAGS)}  # what the champion measured
    failed = [c for c, ok in {**evaluation.get("checks", {}), **benchmarks.get("checks", {})}.items() if not ok]
    if failed:
        raise LmforgeError(f"register: champion '{name}' failed check(s) {', '.join(failed)}: nothing registered")
    registry = params.registry.name
    lineage = {**lineage_tags(), **ctx.tags()}
    metrics = {k: evaluation[k] for k in ("perplexity", "bits_per_byte", "token_accuracy") if evaluation.get(k) is not None}
    arch = json.loads((params.stage_dir("pretrain") / name / "params.json").read_text()) if (params.stage_dir("pretrain") / name / "params.json").exists() else {}
    summary: dict[str, Any] = {"registered_model": registry, "candidate": name}
    tags = {**lineage, "candidate": name, "kind": "pretrained", "params": json.dumps(arch, sort_keys=True)[:5000],
            **{k: str(v) for k, v in metrics.items()}, **candidate_source_tags(params, name), **measured_tags}
    version, run_id, new = register_once(params, params.path(chosen["champion_dir"]), tags, f"register {name}",
                                         {"stage": "register", "candidate": name, **ctx.tags()},
                                         chosen.get("champion_pretrain_run_id"))
    client = MlflowClient(tracking_uri(params), registry_uri=tracking_uri(params))
    if not new:
        say(f"register: {registry} version {version} already holds these weights ({name}): not registered again")
        for key, value in measured_tags.items():  # the same weights, perhaps measured on another sample since
            client.set_model_version_tag(registry, version, key, value)
    client.set_registered_model_alias(registry, "candidate", version)
    summary["candidate_version"] = version
    reigning = current(client, registry, "champion")
    promote = _promote(client, registry, reigning, version, lineage["dvc_data_md5"], float(metrics["bits_per_byte"]))
    if promote:
        client.set_registered_model_alias(registry, "champion", version)
        say(f"register: {registry} version {version} ({name}) is the champion")
    else:
        why = (f"is version {reigning.tags['base_version']} tuned on users' {reigning.tags['kind']}" if reigning.tags.get("kind") in TUNED_KINDS
               else f"has {reigning.tags['bits_per_byte']} bits/byte on the same data")
        say(f"register: {registry} version {version} ({name}) stays a candidate: champion version {reigning.version} {why}")
    summary["champion_version"] = version if promote else str(reigning.version)
    summary["promoted"] = promote
    summary["mlflow_run_id"] = run_id
    params.stage_dir("register").mkdir(parents=True, exist_ok=True)
    write_summary(params.stage_dir("register"), summary)
    return summary


def run_register_quantized(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Register the chosen quantized variant of the model `register` registered and point ``quantized`` at it."""
    from mlflow import MlflowClient

    say = ctx.log
    registered = read_summary(params.stage_dir("register"))
    quantized = read_summary(params.stage_dir("quantize"))
    if not quantized.get("chosen"):
        raise LmforgeError(f"register_quantized: no variant stayed within quantize.max_perplexity_increase ({quantized['max_perplexity_increase']:.0%})")
    registry = params.registry.name
    client = MlflowClient(tracking_uri(params), registry_uri=tracking_uri(params))
    # the base is the version `register` made of select's champion (it may stay a candidate when the
    # reigning champion has better bits/byte on the same data): the quantized model is of that one
    champion = client.get_model_version(registry, registered["candidate_version"])
    if champion.tags.get("candidate") != quantized["champion"]:
        raise LmforgeError(f"register_quantized: the quantized model is of '{quantized['champion']}', but the last registered "
                           f"version ({champion.version}) is of '{champion.tags.get('candidate')}': re-run quantize and register")
    tags = {**lineage_tags(), **candidate_source_tags(params, quantized["champion"]), **ctx.tags(),
            "candidate": quantized["champion"], "kind": "quantized",
            "variant": quantized["chosen"], "base_version": str(champion.version),
            **{k: str(quantized[k]) for k in ("perplexity_increase", "linear_size_ratio", "disk_size_ratio") if k in quantized},
            **number_tags(quantized["benchmarks"][quantized["chosen"]]["summary"], BENCHMARK_TAGS), "benchmark_gate": "passed"}
    version, run_id, _new = register_once(params, params.path(quantized["chosen_dir"]), tags, f"register quantized {quantized['champion']}",
                                          {"stage": "register_quantized", **ctx.tags()}, registered.get("mlflow_run_id"))
    client.set_registered_model_alias(registry, "quantized", version)
    say(f"register_quantized: {registry} version {version} ({quantized['chosen']} of version {champion.version}) is `quantized`")
    summary = {"registered_model": registry, "quantized_version": version, "variant": quantized["chosen"], "base_version": str(champion.version),
               "mlflow_run_id": run_id}
    params.stage_dir("register_quantized").mkdir(parents=True, exist_ok=True)
    write_summary(params.stage_dir("register_quantized"), summary)
    return summary


def describe_versions(params: Params, name: str | None = None) -> list[dict[str, Any]]:
    """Registered versions (newest first) with their aliases and key tags, for ``lmforge registry``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(params), registry_uri=tracking_uri(params))
    names = [name] if name else [m.name for m in client.search_registered_models()]
    rows = []
    for model_name in names:
        model = client.get_registered_model(model_name)
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(client.search_model_versions(f"name='{model_name}'"), key=lambda v: -int(v.version)):
            rows.append({"name": model_name, "version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                         "created": v.creation_timestamp, "tags": dict(v.tags), "source": v.source})
    return rows
