"""Where MLflow keeps an experiment's files: with the store it belongs to, never in a repository that
did not ask for them."""

from pathlib import Path

import pytest

from lmforge.params import REPO_ROOT, Params
from lmforge.tracking import artifact_location


def test_an_experiments_artifacts_live_beside_its_sqlite_store_or_where_the_server_says(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert artifact_location(Params()) == (REPO_ROOT / "mlflow" / "artifacts").as_uri()  # the default mlflow/mlflow.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert artifact_location(Params()) == (tmp_path / "store" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert artifact_location(Params()) is None  # the server's --artifacts-destination


@pytest.mark.parametrize("uri", ["postgresql://127.0.0.1/mlflow", "mysql://127.0.0.1/mlflow"])
def test_another_local_database_keeps_them_in_the_repository(uri: str, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert artifact_location(Params()) == (REPO_ROOT / "mlflow" / "artifacts").as_uri()
