"""What is served: a model loaded for serving, from a directory or the MLflow registry, its ONNX twin for
the onnx engine, and where a server of an alias looks for the alias's next version."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.params import LmforgeError
from models.train_config import OnnxPrecision


@dataclass
class ServedModel:
    """What ``create_app`` serves: a loaded model and how clients name it."""

    name: str  # the `model` clients send (and /v1/models lists)
    ref: str  # the reference it was loaded from (a directory or an MLflow URI)
    version: str | None  # the registry version behind an alias, for the request log
    model: Any
    tokenizer: Any
    onnx_dir: Path | None = None  # the ONNX model the onnx engine decodes with (``onnx_model``, or the served model itself)

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt + completion) the model's positions allow; None: no declared limit."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        if limit is None and getattr(self.tokenizer, "model_max_length", 0) < 1_000_000:
            limit = self.tokenizer.model_max_length
        return limit


def load_served(ref: str, tracking_uri: str | None, name: str | None = None, onnx: OnnxPrecision | None = None) -> ServedModel:
    """Load the model ``ref`` (a directory or an MLflow URI) for serving; a clear error if there is none.
    An alias is pinned to its version first: the version recorded with every answer is the one loaded.
    ``onnx``: also find or build its ONNX model of that precision (``onnx_model``), for the onnx engine.
    A model that is an ONNX graph already (the ``onnx_int8`` quantized variant) is served by the onnx
    engine whatever ``serve.engine`` says: its greedy requests by continuous batching, its sampled
    ones in dynamic batches of the same graph (``OnnxCausalLM.generate``)."""
    from lmforge.registry import model_directory
    from models.loading import load_dir

    try:
        directory, version = model_directory(ref, tracking_uri)
    except LmforgeError as exc:
        raise LmforgeError(f"serve: {exc}") from None
    model, tokenizer, objective = load_dir(directory)
    if objective != "causal":
        raise LmforgeError(f"serve: {ref} is a {objective} model; the completion API serves causal language models")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    registered = ref.startswith("models:/")
    return ServedModel(name=name or (ref[len("models:/") :] if registered else ref.rstrip("/").rsplit("/", 1)[-1]), ref=ref,
                       version=version.rsplit("/", 1)[-1] if registered else None, model=model, tokenizer=tokenizer,
                       onnx_dir=getattr(model, "onnx_dir", None) or (onnx_model(version, directory, onnx, tracking_uri) if onnx else None))


def onnx_model(pinned: str, directory: Path, precision: OnnxPrecision, tracking_uri: str | None) -> Path:
    """The ONNX model the onnx engine decodes with.  For a registry version, the one the export stage
    built, checked and tagged on it (``onnx_<precision>_uri``); otherwise (or without that tag) the build
    of ``directory`` in the cache of ONNX builds (``models.onnx_genai.built``), made the first time."""
    from models.onnx_genai import CONFIG, OnnxBuildError, built

    if pinned.startswith("models:/") and "@" not in pinned:
        import mlflow

        from models.generation import use_mlflow_store

        name, version = pinned[len("models:/") :].rsplit("/", 1)
        tags = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version(name, version).tags
        if uri := tags.get(f"onnx_{precision}_uri"):
            use_mlflow_store(tracking_uri)
            found = sorted(p.parent for p in Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)).rglob(CONFIG))
            if found:
                return found[0]
    try:
        return built(directory, precision)
    except OnnxBuildError as exc:
        raise LmforgeError(f"serve --engine onnx: {exc}\n(serve it with --engine dynamic or continuous)") from None


@dataclass
class AliasFollower:
    """Where a server of ``models:/NAME@ALIAS`` looks for the alias's version, and loads a new one."""

    ref: str
    tracking_uri: str | None
    name: str | None = None
    onnx: OnnxPrecision | None = None

    def version(self) -> str:
        from lmforge.registry import pin_version

        return pin_version(self.ref, self.tracking_uri)[1].rsplit("/", 1)[-1]

    def load(self) -> ServedModel:
        return load_served(self.ref, self.tracking_uri, self.name, self.onnx)
