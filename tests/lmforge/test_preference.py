"""Preference tuning: ratings, corrections and files → validated pairs (every row accounted for) → DPO through the
sensor's run → the gates → a new registry version at the alias, or the alias kept when the tuned model is no better."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Project, Server, copy_project, tick, write_params

from lmforge.feedback_store import FeedbackStore
from lmforge.params import load_params
from lmforge.preference import parse_pair, run_feedback_preferences


def preference_params(tmp_path: Path, files: list[str], **preference):
    return load_params(write_params(tmp_path, feedback={"store": str(tmp_path / "feedback.db"), "inbox": str(tmp_path / "inbox"), "max_chars": 60},
                                    preference={"files": files, "heldout_fraction": 0.5, "min_pairs": 1, **preference}))


def test_pairs_from_ratings_corrections_and_files_with_every_row_accounted_for(tmp_path: Path):
    params = preference_params(tmp_path, [str(tmp_path / "pairs" / "*.jsonl"), str(tmp_path / "missing" / "*.jsonl")])
    store = FeedbackStore(params.path(params.feedback.store))
    for request, prompt, answer in [("a", "p1", "a good answer"), ("b", "p1", "a bad answer"), ("c", "p2", "wrong"), ("d", "p3", "so so"),
                                    ("e", "p4", "fine"), ("f", "p5", "x" * 80)]:
        store.log_request(request, "completions", "m", "3", prompt, answer, "stop", 3, 2)
    store.add_feedback("a", 2)
    store.add_feedback("a", 5)  # rated again: the first rating is superseded
    store.add_feedback("b", 1)  # with a: one pair of answers to p1 (well-rated over poorly rated)
    store.add_feedback("c", 2, correction="right")  # the correction over the answer it corrects
    store.add_feedback("d", 3)  # a middling rating: no preference
    store.add_feedback("e", 5)  # well rated, no poorly rated answer to the same prompt: waits for one
    store.add_feedback("f", 1, correction="short")  # the rejected answer is longer than feedback.max_chars: quarantined
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "bulk.jsonl").write_text('{"request_id": "nope", "rating": 5}\nnot json\n'
                                                   '{"prompt": "p6", "answer": "old", "correction": "new", "rating": 1}\n')
    (tmp_path / "pairs").mkdir()
    rows = [{"prompt": "q1", "chosen": "yes", "rejected": "no"},
            {"chosen": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "bad"}]},
            {"prompt": "q3", "chosen": "same", "rejected": "same "},  # no preference: quarantined
            {"prompt": "q4", "chosen": "only one answer"},  # not a pair: quarantined
            {"prompt": "", "chosen": "a", "rejected": "b"}]  # no prompt: quarantined
    (tmp_path / "pairs" / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")

    summary = run_feedback_preferences(params)
    out = params.stage_dir("feedback_preferences")
    pairs = [json.loads(line) for name in ("pairs.jsonl", "heldout.jsonl") for line in (out / name).read_text().splitlines()]
    by_prompt = {p["prompt"]: (p["chosen"], p["rejected"], p["source"]) for p in pairs}
    assert by_prompt == {"p1": ("a good answer", "a bad answer", "ratings"), "p2": ("right", "wrong", "correction"),
                         "p6": ("new", "old", "correction"), "q1": ("yes", "no", "file"), "q2": ("good", "bad", "file")}
    reasons = {q["pair_id"]: q["reason"] for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())}
    assert reasons == {"inbox:bulk.jsonl:1": "unknown_request: no such request was served",
                       "inbox:bulk.jsonl:2": reasons["inbox:bulk.jsonl:2"], "store:7": "failed: rejected_length",
                       "file:mine.jsonl:3": "failed: answers_differ", "file:mine.jsonl:4": reasons["file:mine.jsonl:4"],
                       "file:mine.jsonl:5": "failed: prompt_present"}
    assert reasons["inbox:bulk.jsonl:2"].startswith("not_json") and reasons["file:mine.jsonl:4"].startswith("not_a_pair: needs chosen and rejected")
    # 7 feedback + 3 inbox lines + 5 file rows = 15 rows: 6 in 5 pairs, 6 quarantined, 2 not used (d, e), 1 superseded
    assert (summary["rows"], summary["rows_in_pairs"], summary["rows_quarantined"], summary["not_used"], summary["superseded"]) == (15, 6, 6, 2, 1)
    assert summary["train_pairs"] + summary["heldout_pairs"] == 5 and summary["heldout_pairs"] >= 1
    assert summary["unmatched_files"] == [str(tmp_path / "missing" / "*.jsonl")]
    assert summary["passed"] is True  # 6 of 12 judged rows quarantined: feedback.max_rejection_ratio (0.5) allows it
    files_only = run_feedback_preferences(preference_params(tmp_path / "files", [str(tmp_path / "pairs" / "*.jsonl")]))
    assert files_only["passed"] is False and "60% of the rows quarantined" in files_only["check"]  # 3 of 5: a broken exporter stops the loop


def test_a_pair_is_text_or_a_conversation_with_one_prompt():
    chat = {"chosen": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    assert parse_pair(chat) == ("hi", "hello", "go away")
    assert parse_pair({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "assistant", "content": "b"}]}) == ("hi", "a", "b")
    for bad in ({**chat, "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]},  # different prompts
                {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},  # no prompt at all
                {"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}):  # the answer is not the assistant's
        with pytest.raises(ValueError):
            parse_pair(bad)


def champion(project: Project):
    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri, registry_uri=project.mlflow_uri)
    return client.get_model_version_by_alias("lmforge", "champion")


@pytest.mark.slow
def test_preferences_through_the_server_tune_with_dpo_and_move_the_alias_only_when_better(tiny_snapshot: Project, tmp_path: Path):
    import yaml

    project = copy_project(tiny_snapshot, tmp_path / "copy")
    params = project.params()
    params["feedback"]["min_new_examples"] = 1000  # only the preference loop starts here
    # a tiny model's own answers are a token or two: a correction starts ~50 nats less likely; beta 0.02 lets DPO go that far
    params["preference"].update({"files": [], "min_new_pairs": 10, "min_pairs": 3, "heldout_fraction": 0.3, "lr": 0.01, "epochs": 4,
                                 "batch_size": 4, "beta": 0.02, "max_length": 64})
    (project.path / "params.yaml").write_text(yaml.safe_dump(params))
    before = str(champion(project).version)

    # users correct the served champion's answers (a tiny scratch model: plain completions) and rate two answers to one prompt
    server = Server(tmp_path / "server", "models:/lmforge@champion", project=project)
    try:
        client = server.client()
        for i in range(16):
            answer = client.completions.create(model="lmforge@champion", prompt=f"words of document {i}\nSummary:", max_tokens=6, temperature=0)
            assert server.post("/v1/feedback", {"request_id": answer.id, "rating": 1, "correction": "a python package for language data"}).status_code == 200
        rated = [client.completions.create(model="lmforge@champion", prompt="words of page 1\nSummary:", max_tokens=6, temperature=1.0, seed=s)
                 for s in (1, 2)]
        assert rated[0].choices[0].text != rated[1].choices[0].text
        for answer, rating in zip(rated, (5, 1)):
            assert server.post("/v1/feedback", {"request_id": answer.id, "rating": rating}).status_code == 200
    finally:
        server.stop()

    first = tick(project, None)
    assert first["runs"] == 1 and first["jobs"] == ["preference_job"] and first["success"], first
    assert first["checks"] == {"preferences_valid": True, "beats_current": True, "kept_benchmarks": True}
    assert first["materialized"] == ["feedback_preferences", "preference_register", "preference_tune"]
    pairs, tuned = project.summary("feedback_preferences"), project.summary("preference_tune")
    assert (pairs["from_correction"], pairs["from_ratings"], pairs["rows_in_pairs"]) == (16, 1, 18)
    assert tuned["accuracy"] > tuned["current_accuracy"] and tuned["base_version"] == before and tuned["steps"] > 0
    version = champion(project)
    assert str(version.version) != before and str(version.version) == project.summary("preference_register")["version"]
    assert version.tags["kind"] == "preference" and version.tags["base_version"] == before
    assert version.tags["preference_pairs_sha256"] == pairs["pairs_sha256"] == tuned["pairs_sha256"]

    # the same pairs again: the sensor waits; more corrections, tuned with a learning rate of 0, teach nothing: the
    # held-out accuracy does not rise, the blocking check stops the run before the registry and the alias stays
    assert tick(project, first["cursor"])["runs"] == 0
    params["preference"]["lr"] = 0.0
    (project.path / "params.yaml").write_text(yaml.safe_dump(params))
    inbox = project.path / "feedback" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "reviewed.jsonl").write_text("".join(json.dumps({"prompt": f"words of file {i}\nSummary:", "answer": "words words words",
                                                              "correction": "a python package for language data", "rating": 1}) + "\n"
                                                  for i in range(10)))
    second = tick(project, first["cursor"])
    assert second["runs"] == 1 and second["checks"]["beats_current"] is False, second
    assert "preference_register" not in second["materialized"]
    again = project.summary("preference_tune")
    assert again["accuracy"] == again["current_accuracy"] and again["base_version"] == str(version.version)
    assert champion(project).version == version.version
