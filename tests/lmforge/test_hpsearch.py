"""The hyper-parameter search: an Optuna study over a candidate's pretraining or the champion's SFT fine-tuning, each
trial a nested MLflow run, resumable after a kill, its best trial written as a params overlay that reproduces the
trial's metric."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import REPO, Project, copy_project, start_command

from lmforge.hpsearch import nested


def test_dotted_keys_become_the_params_file_nesting():
    assert nested({"pretrain.train.lr": 0.01, "pretrain.train.warmup_steps": 5, "pretrain.adapt.lr": 1e-4}) == {
        "pretrain": {"train": {"lr": 0.01, "warmup_steps": 5}, "adapt": {"lr": 1e-4}}}


def test_a_key_outside_the_params_is_refused_by_name(tmp_path: Path, monkeypatch):
    from conftest import write_params

    from lmforge.hpsearch import run_hpsearch
    from lmforge.params import LmforgeError, load_params

    path = write_params(tmp_path, hpsearch={"space": {"pretrain.train.learning_rate": {"type": "float", "low": 0.001, "high": 0.01}}})
    monkeypatch.setenv("LMFORGE_PARAMS", str(path))
    with pytest.raises(LmforgeError, match=r"hpsearch.space: unknown key 'pretrain.train.learning_rate' \(known keys: .*\blr\b"):
        run_hpsearch(load_params(path))


def test_a_key_the_searched_stage_does_not_read_is_refused(tmp_path: Path, monkeypatch):
    from conftest import write_params

    from lmforge.hpsearch import run_hpsearch
    from lmforge.params import LmforgeError, load_params

    path = write_params(tmp_path, hpsearch={"stage": "finetune_sft",
                                            "space": {"finetune.train.lora_lr": {"type": "float", "low": 0.001, "high": 0.01},
                                                      "pretrain.train.lr": {"type": "float", "low": 0.001, "high": 0.01}}})
    monkeypatch.setenv("LMFORGE_PARAMS", str(path))
    with pytest.raises(LmforgeError, match=r"hpsearch.space: pretrain.train.lr: nothing a finetune_sft trial trains reads it"):
        run_hpsearch(load_params(path))


def running_trial(db: Path) -> int | None:
    """The number of the trial the study is running (None before the study exists, or between trials)."""
    if not db.exists():
        return None
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT max(number) FROM trials WHERE state = 'RUNNING'").fetchone()
    except sqlite3.OperationalError:  # the tables are being created
        return None
    return row[0] if row else None


@pytest.mark.slow
def test_a_killed_search_resumes_to_the_same_best_trial_and_its_overlay_reproduces_it(tiny_snapshot: Project, tmp_path: Path):
    from mlflow import MlflowClient

    whole, killed = copy_project(tiny_snapshot, tmp_path / "whole"), copy_project(tiny_snapshot, tmp_path / "killed")
    whole.lmforge("run", "--select", "hpsearch")
    best = whole.summary("hpsearch")
    assert best["trials"] == 3 and best["ran_now"] == 3 and best["retried"] == 0
    assert sum(t["state"] == "COMPLETE" for t in best["trial_log"]) >= 1 and best["pruned"] + best["failed"] <= 2
    client = MlflowClient(whole.mlflow_uri)
    trials = client.search_runs([client.get_run(best["mlflow_run_id"]).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{best['mlflow_run_id']}'")
    assert sorted(r.data.tags["optuna_trial"] for r in trials) == ["0", "1", "2"]  # one nested run per trial

    # the same search, killed in the middle of a trial after its first (SIGKILL: no clean-up), then started again
    db = killed.artifacts / "hpsearch" / "study.db"
    with open(os.devnull, "w") as devnull:
        proc = start_command([str(REPO / ".venv/bin/lmforge"), "run", "--select", "hpsearch"], killed.path, killed.env, devnull)
    deadline = time.monotonic() + 600
    while not running_trial(db) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = running_trial(db)
    assert interrupted in (1, 2), "the search was not killed in a trial after its first"
    resumed_run = killed.lmforge("run", "--select", "hpsearch")  # the killed run still held the `training` pool: it is released
    assert "died with its process" in resumed_run.stdout
    resumed = killed.summary("hpsearch")
    assert resumed["retried"] == 1 and resumed["ran_now"] == 3 - interrupted and resumed["trials"] == 3
    assert resumed["best_params"] == best["best_params"] and resumed["best_value"] == pytest.approx(best["best_value"], abs=1e-6)
    assert [(t["state"], t["params"]) for t in resumed["trial_log"] if t["state"] != "FAIL"] == [(t["state"], t["params"]) for t in best["trial_log"]]

    # the overlay: the candidate pretrained with it (the trials ran the candidate's own steps) scores what its best trial did
    overlay = whole.artifacts / "hpsearch" / "best_params.yaml"
    assert "lmforge run --params" in overlay.read_text().splitlines()[1]
    whole.lmforge("run", "--params", str(overlay), "--select", "pretrain", "--partition", "a")
    assert whole.summary("pretrain/a")["final_val_loss"] == pytest.approx(best["best_value"], abs=1e-5)


@pytest.mark.slow
def test_trials_run_as_ray_tasks_and_report_through_the_shared_study(tiny_snapshot: Project, ray_cluster, tmp_path: Path):
    """On a cluster that `cluster.address` names (the session's two nodes of one CPU each), not a Ray of the run's own."""
    import yaml

    project = copy_project(tiny_snapshot, tmp_path / "ray")
    params = project.params()
    params["hpsearch"].update({"engine": "ray", "parallel": 2, "trials": 2, "pruner": "none"})
    params["cluster"]["address"] = ray_cluster
    (project.path / "params.yaml").write_text(yaml.safe_dump(params))
    run = project.lmforge("run", "--select", "hpsearch")
    assert f"ray: joined {ray_cluster}: 2 node(s)" in run.stdout + run.stderr
    summary = project.summary("hpsearch")
    assert summary["trials"] == 2 and summary["ran_now"] == 2
    # each task reported its validation curve to the study the driver reads (the pruner's input), at its steps
    assert all(t["state"] == "COMPLETE" and t["last_step"] == 60 for t in summary["trial_log"]), summary["trial_log"]
    assert summary["best_value"] == min(t["value"] for t in summary["trial_log"])


@pytest.mark.slow
def test_a_fine_tuning_search_prunes_by_epoch_and_its_overlay_reproduces_the_best_trial(tiny_snapshot: Project, tmp_path: Path):
    import yaml
    from mlflow import MlflowClient

    project = copy_project(tiny_snapshot, tmp_path / "sft")
    params = project.params()
    params["finetune"]["methods"] = ["lora"]
    params["finetune"]["train"]["epochs"] = 3  # the pruner sees epochs 1 and 2 before a trial completes
    params["hpsearch"] = {**params["hpsearch"], "stage": "finetune_sft", "method": "lora", "trials": 4, "startup_trials": 1,
                          "space": {"finetune.train.lora_lr": {"type": "float", "low": 0.0001, "high": 0.02, "log": True},
                                    "finetune.lora.r": {"type": "categorical", "choices": [2, 8]}}}
    (project.path / "params.yaml").write_text(yaml.safe_dump(params))
    project.lmforge("run", "--select", "hpsearch")
    summary = project.summary("hpsearch")
    assert summary["target"] == "finetune_sft-lora" and summary["metric"] == "best_val_loss" and summary["trials"] == 4
    log = summary["trial_log"]
    # each trial reported its validation loss per epoch: a completed one all 3, a pruned one stopped before its last
    assert all(t["state"] == "COMPLETE" and t["last_step"] == 3 or t["state"] == "PRUNED" and t["last_step"] < 3 for t in log), log
    assert set(summary["best_params"]) == {"finetune.train.lora_lr", "finetune.lora.r"}
    assert summary["best_value"] == min(t["value"] for t in log if t["state"] == "COMPLETE")
    client = MlflowClient(project.mlflow_uri)
    trials = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'")
    assert len(trials) == 4 and all(len(client.get_metric_history(r.info.run_id, "val_loss")) >= 1 for r in trials)

    # the overlay: finetune_sft with it scores the best trial's validation loss again
    overlay = project.artifacts / "hpsearch" / "best_params.yaml"
    assert yaml.safe_load(overlay.read_text())["finetune"]["lora"]["r"] == summary["best_params"]["finetune.lora.r"]
    project.lmforge("run", "--params", str(overlay), "--select", "finetune_sft")
    assert project.summary("finetune_sft")["lora_val_loss"] == pytest.approx(summary["best_value"], abs=1e-5)


def test_the_trials_table_holds_a_trial_killed_before_its_values_were_drawn():
    """A search killed between asking Optuna for a trial and drawing its values leaves a trial without params:
    the asset's table shows it with empty cells instead of failing on the missing column."""
    from assets.common import md_table

    table = md_table([{"trial": 0, "state": "COMPLETE", "lr": 0.01}, {"trial": 1, "state": "FAIL"}])
    assert table.splitlines()[0] == "| trial | state | lr |" and table.splitlines()[-1] == "| 1 | FAIL |  |"
