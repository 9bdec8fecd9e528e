"""The feedback loop: feedback in (the server's API and the inbox) → validated examples → the sensor's run →
fine-tuning → a new registry version and the alias moved, or the alias kept when the new model is not better."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Project, Server, copy_project, tick, write_params

from lmforge.feedback import run_feedback_examples
from lmforge.feedback_store import FeedbackStore
from lmforge.params import load_params


def feedback_params(tmp_path: Path, **feedback):
    return load_params(write_params(tmp_path, feedback={"store": str(tmp_path / "feedback.db"), "inbox": str(tmp_path / "inbox"), **feedback}))


def served(store: FeedbackStore, n: int, endpoint: str = "completions") -> list[str]:
    """``n`` requests as the server records them; their ids."""
    ids = []
    for i in range(n):
        prompt = f"question {i}" if endpoint == "completions" else [{"role": "system", "content": "be kind"}, {"role": "user", "content": f"question {i}"}]
        store.log_request(f"req-{endpoint}-{i}", endpoint.replace("chat", "chat.completions"), "m", "3", prompt, f"answer {i}", "stop", 3, 2)
        ids.append(f"req-{endpoint}-{i}")
    return ids


def test_feedback_becomes_examples_and_every_record_is_accounted_for(tmp_path: Path):
    params = feedback_params(tmp_path, min_rating=4, max_chars=50)
    store = FeedbackStore(params.path(params.feedback.store))
    done, chats = served(store, 5), served(store, 2, "chat")
    store.add_feedback(done[0], 5)  # a good answer: kept as it is
    store.add_feedback(done[1], 1, correction="the right answer")  # corrected: the correction is the example
    store.add_feedback(done[2], 2)  # a bad answer, no correction: teaches nothing
    store.add_feedback(done[3], 5)
    store.add_feedback(done[3], 3, correction="rated again")  # the latest feedback on a request counts
    store.add_feedback(done[4], 1, correction="x" * 80)  # longer than max_chars: quarantined by great-expectations
    store.add_feedback(chats[0], 4)  # a chat: the example's prompt is the last user message
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "bulk.jsonl").write_text("\n".join([
        json.dumps({"prompt": "a bulk question", "correction": "a bulk answer", "rating": 5}),
        json.dumps({"request_id": chats[1], "rating": 1, "correction": "fixed chat answer"}),
        json.dumps({"request_id": "req-never-served", "rating": 5}),
        "{not json",
        json.dumps({"rating": 5}),
        json.dumps({"prompt": "rated oddly", "answer": "fine", "rating": "great"}),
    ]) + "\n")
    summary = run_feedback_examples(params)
    examples = {e["example_id"]: e for e in map(json.loads, (params.stage_dir("feedback_examples") / "examples.jsonl").read_text().splitlines())}
    quarantined = [json.loads(line) for line in (params.stage_dir("feedback_examples") / "quarantine.jsonl").read_text().splitlines()]
    pairs = sorted((e["prompt"], e["response"]) for e in examples.values())
    assert pairs == sorted([
        ("question 0", "answer 0"),  # rated 5: the model's answer
        ("question 1", "the right answer"),  # corrected
        ("question 3", "rated again"),  # the latest of two feedbacks
        ("question 0", "answer 0"),  # the chat rated 4: its prompt is the last user message, "question 0"
        ("a bulk question", "a bulk answer"),  # a self-contained inbox example
        ("question 1", "fixed chat answer"),  # an inbox correction of a served chat
    ])
    reasons = sorted(q["reason"].split(":")[0] for q in quarantined)
    assert reasons == ["bad_rating", "failed", "no_prompt", "not_json", "unknown_request"], quarantined
    assert any("response_length" in q["reason"] for q in quarantined)
    assert summary["examples"] == 6 and summary["quarantined"] == 5 and summary["not_used"] == 1 and summary["superseded"] == 1
    assert summary["examples"] + summary["quarantined"] + summary["not_used"] + summary["superseded"] == summary["feedback"] == 13
    assert summary["passed"]  # 5 of 11 judged quarantined: within max_rejection_ratio 0.5


def test_too_much_bad_feedback_fails_the_blocking_check(tmp_path: Path):
    params = feedback_params(tmp_path, max_rejection_ratio=0.2)
    store = FeedbackStore(params.path(params.feedback.store))
    done = served(store, 3)
    store.add_feedback(done[0], 5)
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "spam.jsonl").write_text("garbage\nmore garbage\n")
    summary = run_feedback_examples(params)
    assert not summary["passed"] and summary["examples"] == 1 and summary["quarantined"] == 2
    assert not run_feedback_examples(feedback_params(tmp_path / "empty"))["passed"]  # no feedback at all: nothing to train on


def test_a_champion_tuned_on_feedback_yields_only_to_a_better_pretrained_model():
    """register's rule: a feedback-tuned champion is judged by the pretrained version it was tuned from."""
    from types import SimpleNamespace

    from lmforge.registry import _promote

    base = SimpleNamespace(version="1", tags={"kind": "pretrained", "bits_per_byte": "1.10", "dvc_data_md5": "d"})
    tuned = SimpleNamespace(version="4", tags={"kind": "feedback", "base_version": "1", "dvc_data_md5": "d"})
    client = SimpleNamespace(get_model_version=lambda name, version: {"1": base}[version])
    assert not _promote(client, "m", tuned, "1", "d", 1.10)  # its own base again (a re-run): the tuned model stays
    assert not _promote(client, "m", tuned, "5", "d", 1.10)  # another model, no better than the base
    assert _promote(client, "m", tuned, "5", "d", 1.05)  # a better pretrained model
    assert _promote(client, "m", tuned, "5", "other data", 9.0)  # new data: scores do not compare
    assert _promote(client, "m", base, "5", "d", 1.10) and not _promote(client, "m", base, "5", "d", 1.2)  # the rule without feedback


def champion_version(project: Project) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri, registry_uri=project.mlflow_uri)
    return str(client.get_model_version_by_alias("lmforge", "champion").version)


@pytest.mark.slow
def test_feedback_through_the_server_starts_fine_tuning_and_moves_the_alias_only_when_better(tiny_snapshot: Project, tmp_path: Path):
    import yaml

    project = copy_project(tiny_snapshot, tmp_path / "copy")
    params = project.params()
    params["feedback"].update({"min_new_examples": 6, "epochs": 3, "lr": 0.005, "method": "full"})
    params["serve"] = {**params.get("serve", {}), "follow_seconds": 1}
    (project.path / "params.yaml").write_text(yaml.safe_dump(params))
    before = champion_version(project)

    # users ask the served champion (a tiny scratch model: plain completions) and correct its answers
    server = Server(tmp_path / "server", "models:/lmforge@champion", project=project)
    try:
        client = server.client()
        for i in range(4):
            answer = client.completions.create(model="lmforge@champion", prompt=f"words of document {i}\nSummary:", max_tokens=6, temperature=0)
            assert server.post("/v1/feedback", {"request_id": answer.id, "rating": 1, "correction": "a python package for language data"}).status_code == 200
        assert tick(project, None)["runs"] == 0  # 4 accepted examples: fewer than min_new_examples (6)
        inbox = project.path / "feedback" / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        (inbox / "reviewed.jsonl").write_text("".join(json.dumps({"prompt": f"words of page {i}\nSummary:", "correction": "a python package for language data",
                                                                  "rating": 5}) + "\n" for i in range(3)))
        first = tick(project, None)
        assert first["runs"] == 1 and first["success"], first
        assert first["checks"] == {"feedback_valid": True, "beats_current": True, "kept_benchmarks": True}
        assert first["materialized"] == ["feedback_examples", "feedback_finetune", "feedback_register"]
        tuned = project.summary("feedback_finetune")
        assert tuned["rougeL"] > tuned["current_rougeL"] and tuned["feedback_examples"] == 7 and tuned["base_version"] == before
        after = champion_version(project)
        assert after != before and project.summary("feedback_register")["version"] == after

        # the server, still running, follows @champion: the next answer comes from the new version, no restart
        deadline = time.monotonic() + 120
        while server.health()["version"] != after and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server.health()["version"] == after, server.log.read_text()[-2000:]
        answer = client.completions.create(model="lmforge@champion", prompt="words of document 9\nSummary:", max_tokens=6, temperature=0)
        with sqlite3.connect(server.store) as db:
            served_by = dict(db.execute("SELECT id, model_version FROM requests").fetchall())
        assert served_by[answer.id] == after and list(served_by.values()).count(before) == 4
    finally:
        server.stop()
    # the pipeline registers its (unchanged) champion again: the version tuned on feedback stays @champion
    registered = project.lmforge("run", "--select", "register")
    assert "tuned on users' feedback" in registered.stdout + registered.stderr and champion_version(project) == after
    assert project.summary("register")["promoted"] is False

    # the same examples again: the sensor waits; more feedback with a learning rate of 0 gives the same model,
    # which is not better than the current one: the blocking check stops the run before the registry
    assert tick(project, first["cursor"])["runs"] == 0
    params["feedback"]["lr"] = 0.0
    (project.path / "params.yaml").write_text(yaml.safe_dump(params))
    (inbox / "more.jsonl").write_text("".join(json.dumps({"prompt": f"words of file {i}\nSummary:", "correction": "a python package for language data",
                                                          "rating": 5}) + "\n" for i in range(6)))
    second = tick(project, first["cursor"])
    assert second["runs"] == 1 and second["checks"] == {"feedback_valid": True, "beats_current": False, "kept_benchmarks": True}, second
    assert "feedback_register" not in second["materialized"]
    assert project.summary("feedback_finetune")["rougeL"] == project.summary("feedback_finetune")["current_rougeL"]
    assert champion_version(project) == after
