"""`dagster dev -w workspace.yaml` serves the code location: the UI's GraphQL API lists our assets."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, stop_process_group, write_params
from test_finetune import TINY_DOWNSTREAM, write_task_sets

QUERY = "{ assetNodes { assetKey { path } groupName hasAssetChecks } }"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"


def run_job(port: int, job: str, partition: str | None = None) -> str:
    """Launch a job the way the UI's Launchpad does, and wait for its end status."""
    params = {"selector": {"repositoryLocationName": "lmforge", "repositoryName": "__repository__", "jobName": job}, "runConfigData": {}}
    if partition:
        params["executionMetadata"] = {"tags": [{"key": "dagster/partition", "value": partition}]}
    launched = graphql(port, LAUNCH, {"params": params})["data"]["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = graphql(port, STATUS, {"id": run_id})["data"]["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    raise AssertionError(f"{job} did not finish in 300 s")


@pytest.mark.slow
def test_dagster_dev_serves_the_workspace_and_runs_jobs(tmp_path: Path, corpus: Path):
    port = free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    params = write_params(
        tmp_path, corpus,
        split={"train": 0.6, "val": 0.2, "test": 0.2},
        tokenizer={"vocab_size": 400, "block_size": 64},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ui"},
        pretrain={
            "train": {"max_steps": 60, "batch_size": 4, "lr": 0.01, "val_every": 30, "checkpoint_every": 30, "warmup_steps": 5, "val_batches": 2},
            "candidates": [{"name": "tiny", "preset": "tiny", "overrides": {}}],
        },
        **TINY_DOWNSTREAM,
    )
    write_task_sets(tmp_path / "finetune")
    env = {**os.environ, "DAGSTER_HOME": str(home), "LMFORGE_PARAMS": str(params)}
    env.pop("MLFLOW_TRACKING_URI", None)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    proc = subprocess.Popen(
        [str(REPO / ".venv/bin/dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        nodes = None
        while time.monotonic() < deadline and nodes is None:
            try:
                nodes = graphql(port, QUERY)["data"]["assetNodes"]
            except (OSError, KeyError, TypeError):
                time.sleep(1)
        assert nodes is not None, "the Dagster UI did not answer within 120 s"
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        assert {"ingest", "clean", "split", "tokenizer", "packed"} <= set(by_key)
        assert by_key["clean"]["groupName"] == "data" and by_key["clean"]["hasAssetChecks"]
        assert by_key["tokenizer"]["groupName"] == "tokenizer"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200 and b"Dagster" in page.read()
        # materialize from the UI's API: the data job, then the vocabulary job
        assert run_job(port, "data_job") == "SUCCESS"
        assert run_job(port, "tokenizer_job") == "SUCCESS"
        summary = json.loads((tmp_path / "artifacts" / "tokenizer" / "summary.json").read_text())
        assert summary["vocab_size"] > 0 and (tmp_path / "artifacts" / "packed" / "train.bin").exists()
        assert run_job(port, "pretrain_job", partition="tiny") == "SUCCESS"
        assert json.loads((tmp_path / "artifacts/pretrain/tiny/summary.json").read_text())["steps"] == 60
        # then evaluation and the champion's fine-tuning, as a user launches them (deploy: tests/test_deploy.py, test_cli.py)
        assert run_job(port, "evaluation_job", partition="tiny") == "SUCCESS"
        assert run_job(port, "finetune_job") == "SUCCESS"
        assert json.loads((tmp_path / "artifacts/select/summary.json").read_text())["champion"] == "tiny"
        assert "macro_f1" in json.loads((tmp_path / "artifacts/finetune_classifier/summary.json").read_text())
    finally:
        stop_process_group(proc)
