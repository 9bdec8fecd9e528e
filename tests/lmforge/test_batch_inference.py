"""Batch inference (``lmforge.batch_inference``, the ``batch_inference`` asset, ``lmforge generate --output``):
every prompt completed once, a killed run resumed without duplicates or losses, bad rows quarantined,
a changed fingerprint starting over.  A tiny random Llama with a tokenizer of its own, in one thread."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, save_tiny_llama, write_params
from typer.testing import CliRunner

from dagster_project.cli import app
from lmforge.artifacts import read_summary
from lmforge.batch_inference import Outputs, read_prompts, run_batch, run_batch_inference
from lmforge.params import BatchInferenceParams, LmforgeError, SamplingParams, load_params

PROMPTS = [f"the model reads documents number {i}" if i % 2 else f"python packages describe {i}" for i in range(10)]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


class Killed(Exception):
    """What a kill looks like to the code under test: the run stops between two batches."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("bi") / "tiny-llama")


@pytest.fixture(scope="module")
def chat_model_dir(model_dir: Path, tmp_path_factory) -> Path:
    """The same model, its tokenizer with a chat template: an "instruct" model."""
    from transformers import AutoTokenizer

    out = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("bi-chat") / "chat"))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    return out


def settings(model: Path | None, **changes) -> BatchInferenceParams:
    """Greedy, 6 new tokens, batches of 4; ``model`` None: the registry's champion."""
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0)
    return dataclasses.replace(BatchInferenceParams(model=str(model) if model else None, batch_size=4, sampling=sampling), **changes)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def run(s: BatchInferenceParams, file: Path, out: Path, **kw) -> dict:
    return run_batch(s, file, Outputs.beside(out), registry_name="none", progress=False, **kw)


def test_every_prompt_is_completed_once_with_its_token_counts(tmp_path: Path, model_dir: Path):
    file = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    summary = run(settings(model_dir), file, tmp_path / "out.jsonl")
    rows = records(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(10)] and [r["prompt"] for r in rows] == PROMPTS
    assert all(r["model"] == str(model_dir) and r["model_version"].startswith("sha256:") for r in rows)
    assert all(r["prompt_tokens"] > 0 and 1 <= r["completion_tokens"] <= 6 for r in rows)
    assert summary["prompts"] == summary["completed"] == 10 and summary["quarantined"] == summary["resumed"] == 0
    assert summary["generated_tokens"] == sum(r["completion_tokens"] for r in rows) and summary["tokens_per_second"] > 0
    assert summary["batch_size"] == 4 and summary["chat"] is False
    assert (tmp_path / "out.quarantine.jsonl").read_text() == ""
    again = run(settings(model_dir), file, tmp_path / "out.jsonl")  # nothing left to do
    assert again["resumed"] == again["completed"] == 10 and again["generated_tokens"] == 0
    assert records(tmp_path / "out.jsonl") == rows


def test_a_killed_run_resumes_without_duplicates_or_losses(tmp_path: Path, model_dir: Path):
    file = write_jsonl(tmp_path / "prompts.jsonl", [{"id": i * 7, "prompt": p} for i, p in enumerate(PROMPTS)])
    run(settings(model_dir), file, tmp_path / "whole.jsonl")
    whole = {r["id"]: r for r in records(tmp_path / "whole.jsonl")}

    def kill_after_first_batch(completed: int) -> None:
        raise Killed(completed)

    out = tmp_path / "out.jsonl"
    with pytest.raises(Killed):
        run(settings(model_dir), file, out, on_batch=kill_after_first_batch)
    assert len(records(out)) == 4  # the first batch was on disk before the kill
    summary = run(settings(model_dir), file, out)
    assert summary["resumed"] == 4 and summary["completed"] == 10 and summary["started_over"] == ""
    rows = records(out)
    assert [r["id"] for r in rows] == list(whole)  # every id once, in file order
    assert rows == list(whole.values())  # greedy: the same completions as the uninterrupted run

    # a kill in the middle of a write: the torn last line is dropped and its prompt generated again
    text = out.read_text()
    out.write_text(text[: len(text) - 25])
    summary = run(settings(model_dir), file, out)
    assert summary["resumed"] == 9 and summary["completed"] == 10
    rows = records(out)
    assert [r["id"] for r in rows] == list(whole) and rows[-1]["completion"] == whole[rows[-1]["id"]]["completion"]


def test_bad_rows_are_quarantined_with_a_reason_and_every_row_is_accounted_for(tmp_path: Path, model_dir: Path):
    file = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "a", "prompt": "the model reads"},
        "{not json",
        {"id": "b"},                                   # no prompt
        {"id": "c", "prompt": "   "},                  # an empty one
        {"id": "a", "prompt": "a second a"},           # duplicate id
        {"id": ["x"], "prompt": "a list as id"},       # bad id
        '["an", "array"]',
        {"prompt": "no id: its line number"},          # line 8 → id 8
        "",                                            # blank: not a row
        {"id": 8, "prompt": "8 is line 8's id already"},
        {"id": "m", "messages": [{"role": "user"}]},   # a message without content
    ])
    summary = run(settings(model_dir), file, tmp_path / "out.jsonl")
    assert summary["prompts"] == 10 and summary["completed"] == 2 and summary["quarantined"] == 8
    assert summary["prompts"] == summary["completed"] + summary["quarantined"]
    assert summary["by_reason"] == {"bad_id": 1, "bad_messages": 1, "duplicate_id": 2, "no_prompt": 2, "not_json": 2}
    assert [r["id"] for r in records(tmp_path / "out.jsonl")] == ["a", 8]
    quarantined = records(tmp_path / "out.quarantine.jsonl")
    assert [(q["line"], q["reason"]) for q in quarantined] == [
        (2, "not_json"), (3, "no_prompt"), (4, "no_prompt"), (5, "duplicate_id"), (6, "bad_id"), (7, "not_json"), (10, "duplicate_id"), (11, "bad_messages")]
    assert all(q["text"] and q["detail"] and q["source"] == str(file) for q in quarantined)
    assert "line 1" in quarantined[3]["detail"]


def test_line_separators_inside_a_prompt_stay_in_its_row(tmp_path: Path, model_dir: Path):
    """JSON may hold U+2028 and U+0085 unescaped (``ensure_ascii=False`` writes them so): rows end at \\n only."""
    rows = [{"id": "u", "prompt": "the model\u2028reads\x85documents"}, {"id": "v", "prompt": "python is"}]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    prompts, rejected = read_prompts(file, settings(model_dir))
    assert [p.prompt for p in prompts] == [r["prompt"] for r in rows] and rejected == []
    run(settings(model_dir), file, tmp_path / "out.jsonl")
    assert run(settings(model_dir), file, tmp_path / "out.jsonl")["resumed"] == 2
    assert [r["prompt"] for r in records(tmp_path / "out.jsonl")] == [r["prompt"] for r in rows]


def test_csv_prompts_and_their_mistakes(tmp_path: Path, model_dir: Path):
    file = tmp_path / "prompts.csv"
    with open(file, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerows([["id", "prompt", "note"], ["x1", "python packages, with a comma", ""], ["", "no id: record 2", "n"],
                          ["x3", "a prompt\nover two lines", ""], ["x4", "", "no prompt"]])
    summary = run(settings(model_dir, batch_size=2), file, tmp_path / "out.jsonl")
    assert (summary["prompts"], summary["completed"], summary["quarantined"]) == (4, 3, 1)
    rows = records(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ["x1", 2, "x3"] and rows[2]["prompt"] == "a prompt\nover two lines"
    assert records(tmp_path / "out.quarantine.jsonl")[0]["reason"] == "no_prompt"
    file.write_text("id,text\n1,hello\n")
    with pytest.raises(LmforgeError, match=r"no column 'prompt' .*columns: id, text"):
        read_prompts(file, settings(model_dir))


def test_a_changed_setting_model_or_prompt_file_starts_over(tmp_path: Path, model_dir: Path):
    file = write_jsonl(tmp_path / "prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:5])])
    out = tmp_path / "out.jsonl"
    run(settings(model_dir), file, out)
    messages = []
    longer = settings(model_dir, sampling=SamplingParams(max_new_tokens=3, temperature=0.0))
    summary = run(longer, file, out, report=messages.append)
    assert summary["resumed"] == 0 and summary["completed"] == 5 and summary["started_over"] == "the sampling settings changed"
    assert any(m.startswith("starting over: the sampling settings changed") for m in messages)
    assert all(r["completion_tokens"] <= 3 for r in records(out)) and len(records(out)) == 5
    state = json.loads((tmp_path / "out.state.json").read_text())
    assert state["sampling"]["max_new_tokens"] == 3 and state["fingerprint"]
    # the same settings again resume; an edited prompt file does not
    assert run(longer, file, out)["resumed"] == 5
    write_jsonl(file, [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:6])])
    summary = run(longer, file, out)
    assert summary["resumed"] == 0 and summary["completed"] == 6 and summary["started_over"] == "the prompt file changed"
    # batch size is not part of the fingerprint: a run killed for memory resumes with smaller batches
    assert run(dataclasses.replace(longer, batch_size=1), file, out)["resumed"] == 6


def test_chat_messages_need_a_chat_template(tmp_path: Path, chat_model_dir: Path):
    file = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "q", "prompt": "what does the model read"},
        {"id": "conv", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "python packages"}]},
    ])
    summary = run(settings(chat_model_dir), file, tmp_path / "chat.jsonl")  # chat: auto → on
    assert summary["chat"] is True and summary["completed"] == 2
    rows = records(tmp_path / "chat.jsonl")
    assert rows[1]["prompt"][1]["content"] == "python packages"
    assert rows[0]["prompt_tokens"] > len(rows[0]["prompt"].split())  # the template's words were read too
    summary = run(settings(chat_model_dir, chat=False), file, tmp_path / "plain.jsonl")
    assert (summary["completed"], summary["by_reason"]) == (1, {"needs_chat": 1})
    assert records(tmp_path / "plain.quarantine.jsonl")[0]["line"] == 2


def test_the_registry_default_without_a_registered_model_says_to_register(tmp_path: Path):
    file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the model"}])
    with pytest.raises(LmforgeError, match=r"models:/nothing@champion: no registered model .*lmforge run --select register"):
        run_batch(settings(None), file, Outputs.beside(tmp_path / "out.jsonl"), registry_name="nothing",
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)


def test_the_stage_writes_its_directory_and_skips_without_a_prompt_file(tmp_path: Path, model_dir: Path, monkeypatch):
    params_path = write_params(tmp_path, batch_inference={"file": str(tmp_path / "prompts.jsonl"), "model": str(model_dir), "batch_size": 3,
                                                          "sampling": {"max_new_tokens": 4, "temperature": 0.0}})
    params = load_params(params_path)
    assert "no prompt file" in run_batch_inference(params)["skipped"]
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:4])])
    summary = run_batch_inference(params)
    out = params.stage_dir("batch_inference")
    assert summary["completed"] == 4 and read_summary(out) == summary
    assert "tokens_per_second" in json.loads((out / "timings.json").read_text())  # measured here: out of what DVC hashes
    assert "tokens_per_second" not in json.loads((out / "summary.json").read_text())
    assert {p.name for p in out.iterdir()} == {"completions.jsonl", "quarantine.jsonl", "state.json", "summary.json", "timings.json", "params.json"}
    assert json.loads((out / "params.json").read_text())["batch_size"] == 3


def test_generate_with_output_is_the_same_resumable_batch(tmp_path: Path, model_dir: Path):
    params_path = write_params(tmp_path)
    file = write_jsonl(tmp_path / "prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:5])])
    args = ["generate", "--file", str(file), "--output", str(tmp_path / "out.jsonl"), "--model", str(model_dir),
            "--max-new-tokens", "4", "--temperature", "0", "--batch-size", "2", "--params", str(params_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "5 of 5 prompts completed (0 resumed, 0 quarantined)" in result.stdout
    rows = records(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4] and all(r["completion_tokens"] <= 4 for r in rows)
    direct = run(settings(model_dir, batch_size=2, sampling=SamplingParams(max_new_tokens=4, temperature=0.0)), file, tmp_path / "direct.jsonl")
    assert [r["completion"] for r in records(tmp_path / "direct.jsonl")] == [r["completion"] for r in rows] and direct["completed"] == 5
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout.splitlines()[-1])["resumed"] == 5
    # plain text with --output: one prompt a line; JSONL without --output: an error that says what to add
    (tmp_path / "prompts.txt").write_text("the model\n\npython is\n")
    result = CliRunner().invoke(app, [*args[:2], str(tmp_path / "prompts.txt"), *args[3:]])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in records(tmp_path / "out.jsonl")] == [1, 3]
    result = CliRunner().invoke(app, ["generate", "--file", str(file), "--model", str(model_dir), "--params", str(params_path)])
    assert result.exit_code == 1 and "add --output OUT.jsonl" in result.output


def test_the_demo_prompts_are_a_stable_choice_with_unique_ids():
    from lmforge.demo_corpus import PROMPT_MODULES, PROMPT_PACKAGES, demo_prompts

    packages, modules = [f"pkg{i}" for i in range(40)], [f"mod{i}" for i in range(30)]
    rows = demo_prompts(packages, modules)
    assert len(rows) == PROMPT_PACKAGES + PROMPT_MODULES and len({r["id"] for r in rows}) == len(rows)
    assert rows == demo_prompts(list(reversed(packages)), modules)  # the order packages are found in does not matter
    kept = {r["id"] for r in rows}
    assert len(kept - {r["id"] for r in demo_prompts(packages + ["newcomer"], modules)}) <= 1  # a new package displaces one at most
    assert all(r["prompt"].endswith(("?", ".")) and r["source"].split("/")[1] in r["prompt"] for r in rows)


def test_the_params_section_is_in_params_yaml():
    data = yaml.safe_load((REPO / "params.yaml").read_text())["batch_inference"]
    assert data["sampling"]["temperature"] == 0.0 and data["file"] == "data/prompts/prompts.jsonl" and data["chat"] == "auto"
