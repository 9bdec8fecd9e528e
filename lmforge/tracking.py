"""MLflow tracking shared by the stages: where the tracking store is, lineage tags, and runs.

Every stage that trains or measures a model records an MLflow run tagged with the code and data
versions (git commit, DVC hash of ``data.dvc``) and the Dagster run id; evaluation and fine-tuning runs
are children of the run of the model they start from, so the MLflow UI shows them nested.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from lmforge.params import REPO_ROOT, Params


#: Tags a nested run copies from its parent run (``lmforge.sources.source_tags``).
INHERITED_PREFIX = "source"


#: A local SQLite store's URI starts with this, then its path.
SQLITE = "sqlite:///"


def tracking_uri(params: Params) -> str:
    """``$MLFLOW_TRACKING_URI``, else params.yaml's, with a relative SQLite path made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    if uri.startswith(SQLITE) and not uri[len(SQLITE) :].startswith("/"):
        path = REPO_ROOT / uri[len(SQLITE) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = SQLITE + str(path)
    return uri


def lineage_tags() -> dict[str, str]:
    """Code and data versions: the git commit and the DVC hash of data.dvc."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", ""
    data_hash = "unknown"
    dvc_file = REPO_ROOT / "data.dvc"
    if dvc_file.exists():
        import yaml

        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        data_hash = outs[0].get("md5", "unknown")
    return {"git_sha": sha, "git_dirty": str(bool(dirty)).lower(), "dvc_data_md5": data_hash}


def artifact_location(params: Params) -> str | None:
    """Where a new experiment keeps its artifacts: ``artifacts/`` beside a SQLite store (the default
    ``mlflow/mlflow.db`` gives ``mlflow/artifacts``), so a store elsewhere keeps its runs' files with it
    rather than in the repository; ``mlflow/artifacts`` for another local database; a tracking
    server's own choice (``mlflow server --artifacts-destination``, a location every node reaches)."""
    uri = tracking_uri(params)
    if uri.startswith(("http://", "https://")):
        return None
    if uri.startswith(SQLITE):
        return (Path(uri[len(SQLITE) :]).parent / "artifacts").as_uri()
    return (REPO_ROOT / "mlflow" / "artifacts").as_uri()


def experiment_id(client, params: Params) -> str:
    """The id of params.yaml's experiment, created (see ``artifact_location``) if missing."""
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(params.mlflow.experiment, artifact_location=artifact_location(params))


def log_numbers(client, run_id: str, values: dict) -> None:
    """Every number of ``values`` (a stage summary) as an MLflow metric; flags and text are skipped."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, key, value)


@contextlib.contextmanager
def tracked_run(params: Params, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> Iterator[tuple[object, str]]:
    """An MLflow run (client, run id) that ends FINISHED, or FAILED if the block raises."""
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    client = MlflowClient(uri, registry_uri=uri)  # never a registry some earlier code made process-wide
    all_tags = {**lineage_tags(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
        # a run descending from a pretrained model carries where that model came from (source, sha256, licence)
        inherited = {k: v for k, v in client.get_run(parent_run_id).data.tags.items() if k.startswith(INHERITED_PREFIX)}
        all_tags = {**inherited, **all_tags}
    run = client.create_run(experiment_id(client, params), run_name=name, tags=all_tags)
    try:
        yield client, run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
