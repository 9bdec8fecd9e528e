"""The web UIs as a person uses them, in headless Chromium: `dagster dev` serves the project's workspace,
the asset graph shows every stage, "Materialize all" on the tiny tier's job runs the whole pipeline,
and the MLflow UI shows the model it registered.  Screenshots land in the test's directory (or in
$LMFORGE_SCREENSHOTS, which is how docs/ui/ was made)."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, stop_process_group, write_params
from test_finetune import TINY_DOWNSTREAM, write_task_sets

STAGES = ("ingest", "clean", "split", "tokenizer", "packed", "pretrain", "evaluate", "select", "task_data", "finetune_classifier",
          "finetune_sft", "quantize", "prune", "distil", "register", "register_quantized", "retrieval_index", "rag_eval", "prompt_eval",
          "sampling_sweep")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


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


def wait_for(url: str, seconds: int = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {seconds} s")


RUNS = "{ runsOrError { ... on Runs { results { runId status jobName tags { key value } } } } }"


def wait_for_runs(port: int, seconds: int = 420) -> list[dict]:
    """The runs the UI launched, once none is queued or running any more."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runs = graphql(port, RUNS)["data"]["runsOrError"]["results"]
        if runs and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"runs still going after {seconds} s: {runs}")


def names_on_graph(page) -> set[str]:
    """Every asset name drawn on the graph.  Dagster shortens long names in the middle
    ("finetu…_classifier") and breaks them after underscores with zero-width spaces."""
    texts = {t.replace("\u200b", "").strip() for t in page.inner_text("body").splitlines()}
    shown = set()
    for stage in STAGES:
        for t in texts:
            head, _, tail = t.partition("…")
            if t == stage or (_ and len(head) >= 3 and stage.startswith(head) and stage.endswith(tail)):
                shown.add(stage)
    return shown


def wait_for_stages(page, seconds: int = 60) -> None:
    deadline = time.monotonic() + seconds
    while names_on_graph(page) != set(STAGES):
        assert time.monotonic() < deadline, f"the asset graph lacks {set(STAGES) - names_on_graph(page)}"
        time.sleep(1)


def dismiss_welcome(page) -> None:
    """Dagster asks new installations to join its community once; a user clicks Skip."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5000)
        skip.click()
    except Exception:  # playwright's TimeoutError: no dialog this time
        pass


@pytest.mark.slow
def test_dagster_and_mlflow_uis_in_a_real_browser(tmp_path: Path, corpus: Path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs it (Debian package chromium)"
    shots = Path(os.environ.get("LMFORGE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    port, mlflow_port = free_port(), free_port()
    mlflow_db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = write_params(
        tmp_path, corpus,
        split={"train": 0.6, "val": 0.2, "test": 0.2},
        tokenizer={"vocab_size": 400, "block_size": 64},
        mlflow={"tracking_uri": mlflow_db, "experiment": "ui"},
        pretrain={
            "train": {"max_steps": 60, "batch_size": 4, "lr": 0.01, "val_every": 30, "checkpoint_every": 30, "warmup_steps": 5, "val_batches": 2},
            "candidates": [{"name": "tiny", "preset": "tiny", "overrides": {}}, {"name": "alibi", "preset": "tiny", "overrides": {"position": "alibi"}}],
        },
        **TINY_DOWNSTREAM,
    )
    # the tiny tier of this project: its own artifacts and registered model, as in params.yaml
    data = yaml.safe_load(params.read_text())
    data["tiers"] = {"tiny": {"paths": {"artifacts": str(tmp_path / "artifacts_tiny")}, "registry": {"name": "ui-tiny"}}}
    params.write_text(yaml.safe_dump(data))
    write_task_sets(tmp_path / "finetune")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / ".dagster" / "dagster.yaml", home / "dagster.yaml")  # the project's instance settings
    env = {**os.environ, "DAGSTER_HOME": str(home), "LMFORGE_PARAMS": str(params)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LMFORGE_TIER", None)
    dagster = subprocess.Popen(
        [str(REPO / ".venv/bin/dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=open(tmp_path / "dagster.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    mlflow = subprocess.Popen(
        [str(REPO / ".venv/bin/mlflow"), "ui", "--host", "127.0.0.1", "--port", str(mlflow_port), "--backend-store-uri", mlflow_db],
        cwd=tmp_path, env=env, stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/server_info")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            page.set_default_timeout(60_000)

            # the tiny tier's job: its graph holds every stage, once the groups are expanded
            page.goto(f"http://127.0.0.1:{port}/locations/lmforge/jobs/tiny_job")
            dismiss_welcome(page)
            page.get_by_text("lmforge/tier: tiny").wait_for()
            page.mouse.click(600, 800, button="right")
            page.locator("text=Expand all groups >> visible=true").first.click()
            wait_for_stages(page)
            page.screenshot(path=str(shots / "dagster_tiny_job.png"))

            # materialize it all: every candidate in the partition dialog, then the backfill (a run per
            # candidate, one at a time: the instance's tag concurrency limit)
            page.get_by_text("Materialize all…").click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("All", exact=True).click()
            dialog.get_by_role("button", name="Launch backfill").click()
            runs = wait_for_runs(port)
            assert [r["status"] for r in runs] == ["SUCCESS", "SUCCESS"], runs
            tags = [{t["key"]: t["value"] for t in r["tags"]} for r in runs]
            assert {t["dagster/partition"] for t in tags} == {"tiny", "alibi"} and all(t["lmforge/tier"] == "tiny" for t in tags)
            register = json.loads((tmp_path / "artifacts_tiny" / "register" / "summary.json").read_text())
            assert register["registered_model"] == "ui-tiny" and register["champion_version"] in ("1", "2", "3")

            page.goto(f"http://127.0.0.1:{port}/asset-groups")
            page.get_by_text("Global asset lineage").wait_for()
            time.sleep(3)  # the graph lays itself out
            page.mouse.click(900, 900, button="right")
            page.locator("text=Expand all groups >> visible=true").first.click()
            wait_for_stages(page)
            time.sleep(2)
            page.screenshot(path=str(shots / "dagster_asset_graph.png"))

            # the MLflow UI lists the registered model and its version with the champion alias
            wait_for(f"http://127.0.0.1:{mlflow_port}/")
            page.goto(f"http://127.0.0.1:{mlflow_port}/#/models/ui-tiny")
            page.get_by_text(re.compile(r"^Version \d+$")).first.wait_for()
            page.get_by_text(re.compile(r"^@\W?champion$")).first.wait_for()  # MLflow writes "@\xa0champion"
            page.screenshot(path=str(shots / "mlflow_registered_model.png"))
            browser.close()
    finally:
        stop_process_group(dagster)
        stop_process_group(mlflow)
