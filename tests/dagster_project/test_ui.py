"""The web UIs as a person uses them, in headless Chromium, on the session's tiny project: `dagster dev`
serves the project's workspace, the asset graph shows every stage, an asset materialized from its page
runs and leaves the pipeline up to date, and the MLflow UI shows the model the pipeline registered.
Screenshots land in the test's directory (or in $LMFORGE_SCREENSHOTS, which is how docs/ui/ was made).

Every step waits for the element it acts on (no fixed screen coordinates, no sleeps that hope the page
is ready); timeouts bound a hang, they are not a budget."""

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, Project, free_port, stop_process_group, wait_for

from dagster_project.cli.run import stages as cli_stages

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


RUNS = "{ runsOrError { ... on Runs { results { runId status jobName tags { key value } } } } }"


def run_ids(port: int) -> set[str]:
    return {r["runId"] for r in graphql(port, RUNS)["data"]["runsOrError"]["results"]}


def wait_for_new_run(port: int, known: set[str], seconds: int = 600) -> dict:
    """The run the UI launched (one not in ``known``), once it is no longer queued or running."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runs = [r for r in graphql(port, RUNS)["data"]["runsOrError"]["results"] if r["runId"] not in known]
        if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"the run is still going after {seconds} s (a hang, not slowness): {runs}")


def names_on_graph(page, stages: set[str]) -> set[str]:
    """Every asset name drawn on the graph (not the sidebar's list).  Dagster shortens long names in the middle
    ("finetu…_classifier") and breaks them after underscores with zero-width spaces."""
    texts = {t.replace("\u200b", "").strip() for t in page.locator("[data-svg-viewport]").inner_text().splitlines()}
    shown = set()
    for stage in stages:
        for t in texts:
            head, _, tail = t.partition("…")
            if t == stage or (_ and len(head) >= 3 and stage.startswith(head) and stage.endswith(tail)):
                shown.add(stage)
    return shown


def wait_for_stages(page, stages: set[str], seconds: int = 120) -> None:
    """Until every stage's name has been on the graph.  The graph is taller than the window: a stage
    not in view is looked up in "Jump to…", which centres the graph on it, as a person does."""
    deadline = time.monotonic() + seconds
    seen: set[str] = set()
    while True:
        seen |= names_on_graph(page, stages)
        if seen == stages:
            return
        assert time.monotonic() < deadline, f"the asset graph lacks {stages - seen}"
        if seen:  # the graph is drawn: look up the rest
            jump = page.get_by_placeholder("Jump to…")
            jump.fill(sorted(stages - seen)[0])
            jump.press("Enter")
        time.sleep(1)


def expand_all_groups(page) -> None:
    """Right-click the graph's background (a corner of the viewport, away from the nodes, once the graph is
    drawn) and pick "Expand all groups" from its menu."""
    page.locator("svg[class*=svgContainer]").get_by_text("data", exact=True).first.wait_for()
    viewport = page.locator("[data-svg-viewport]")
    box = viewport.bounding_box()
    viewport.click(button="right", position={"x": 40, "y": box["height"] - 40})
    page.get_by_role("menuitem", name="Expand all groups").click()


def skip_welcome(port: int) -> None:
    """Dagster asks a new installation to join its community once, in a dialog over the first page a person
    opens; its Skip button records in the instance that it was seen (the ``setNuxSeen`` mutation).  The test
    records it the same way before it opens a page: under load the dialog came at any moment (once while the
    graph's menu was open: clicking Skip closed the menu too, and the menu item the test was clicking was gone)."""
    assert graphql(port, "mutation { setNuxSeen }")["data"]["setNuxSeen"] is True
    assert graphql(port, "{ shouldShowNux }")["data"]["shouldShowNux"] is False


@pytest.mark.slow
def test_dagster_and_mlflow_uis_in_a_real_browser(tiny_project: Project, tmp_path: Path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs it (Debian package chromium)"
    shots = Path(os.environ.get("LMFORGE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    port, mlflow_port = free_port(), free_port()
    stages = set(cli_stages())  # every stage of the Definitions
    dagster = subprocess.Popen(
        [str(REPO / ".venv/bin/dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tiny_project.path, env=tiny_project.env, stdout=open(tmp_path / "dagster.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    mlflow = subprocess.Popen(
        [str(REPO / ".venv/bin/mlflow"), "ui", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
         "--backend-store-uri", tiny_project.mlflow_uri],
        cwd=tmp_path, env=tiny_project.env, stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/server_info", seconds=300)
        skip_welcome(port)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            page.set_default_timeout(120_000)

            # the global asset graph holds every stage, once the groups are expanded
            page.goto(f"http://127.0.0.1:{port}/asset-groups")
            page.get_by_text("Global asset lineage").wait_for()
            expand_all_groups(page)
            wait_for_stages(page, {"ingest", "split", "pretrain", "evaluate", "select", "quantize"})  # drawn, as first shown
            page.screenshot(path=str(shots / "dagster_asset_graph.png"))
            wait_for_stages(page, stages)

            # materialize one asset from its page: the run goes through the instance's run queue and a run
            # worker, with the code location's params, into the same artifacts directory
            known = run_ids(port)
            page.goto(f"http://127.0.0.1:{port}/assets/select")
            page.get_by_text("Materialize", exact=True).click()
            run = wait_for_new_run(port, known)
            assert run["status"] == "SUCCESS", run
            page.goto(f"http://127.0.0.1:{port}/runs/{run['runId']}")
            page.get_by_text("RUN_SUCCESS").first.wait_for()
            page.screenshot(path=str(shots / "dagster_run.png"))

            # the MLflow UI lists the registered model and its version with the champion alias
            wait_for(f"http://127.0.0.1:{mlflow_port}/", seconds=300)
            page.goto(f"http://127.0.0.1:{mlflow_port}/#/models/lmforge")
            page.get_by_text(re.compile(r"^Version \d+$")).first.wait_for()
            page.get_by_text(re.compile(r"^@\W?champion$")).first.wait_for()  # MLflow writes "@\xa0champion"
            page.screenshot(path=str(shots / "mlflow_registered_model.png"))
            browser.close()
    finally:
        stop_process_group(dagster)
        stop_process_group(mlflow)
    # the UI's code location computed the same versions as `lmforge run`: nothing is out of date, for
    # Dagster nor for DVC (the stage computed the same files again; its new MLflow run id is in timings.json)
    assert "to compute: nothing" in tiny_project.lmforge("run", "--dry-run").stdout
    if (REPO / ".venv/bin/dvc").exists():
        assert json.loads(tiny_project.run("dvc", "status", "--json").stdout) == {}
