"""``lmforge run`` end to end on a tiny corpus, and its errors: one clear line, no traceback."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_params
from dagster_project.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "demo-corpus", "summary"):
        assert command in result.output
    assert "--select" in invoke("run", "--help").output


def test_run_materializes_the_data_stages_with_checks(params_file: Path, tmp_path: Path):
    result = invoke("run", "--select", "group:data")
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output and "files=15" in result.output
    art = tmp_path / "artifacts"
    ingest = json.loads((art / "ingest/summary.json").read_text())
    clean = json.loads((art / "clean/summary.json").read_text())
    split = json.loads((art / "split/summary.json").read_text())
    assert {"files", "documents", "quarantined", "bytes"} <= set(ingest)
    assert {"documents_in", "kept", "quarantined", "by_reason"} <= set(clean)
    assert {"train", "val", "test"} <= set(split)
    assert clean["documents_in"] == ingest["documents"] == clean["kept"] + clean["quarantined"]
    assert split["train"] + split["val"] + split["test"] == clean["kept"]
    assert (art / "clean/data_docs/index.html").exists()
    # the vocabulary group on the same splits
    result = invoke("run", "--select", "group:tokenizer")
    assert result.exit_code == 0, result.output
    tokenizer = json.loads((art / "tokenizer/summary.json").read_text())
    assert {"vocab_size", "fertility", "unk_rate"} <= set(tokenizer) and tokenizer["round_trip_rate"] == 1.0
    packed = json.loads((art / "packed/summary.json").read_text())
    assert packed["train_tokens"] > 0 and (art / "packed/train.bin").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(art / "tokenizer/hf")).eos_token == "<eos>"
    # run config overrides one value for one run, recorded in the stage's params.json
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  clean:\n    config:\n      filters:\n        min_words: 500\n")
    result = invoke("run", "--select", "clean", "--config", str(config))
    assert result.exit_code == 1
    assert "check failed: clean/min_rows" in result.output
    assert json.loads((art / "clean/params.json").read_text())["filters"]["min_words"] == 500


def test_failing_blocking_check_stops_downstream(tmp_path: Path, corpus: Path, monkeypatch):
    params = write_params(tmp_path, corpus, clean={"validation": {"min_rows": 1000}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    result = invoke("run", "--params", str(params))
    assert result.exit_code == 1
    assert "check failed: clean/min_rows: at least 1000 documents kept FAILED" in result.output
    assert not (tmp_path / "artifacts" / "split").exists()


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"clean": {"filtres": {}}}, "error: unknown key 'clean.filtres' (did you mean 'filters'?)"),
        ({"paths": {"raw": "/nonexistent/raw"}}, "error in ingest: ingest source 'raw': directory not found: /nonexistent/raw"),
        ({"clean": {"steps": ["strip_html"]}}, "error in clean: clean.steps: unknown step(s) ['strip_html']"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path: Path, corpus: Path, monkeypatch, sections, message):
    params = write_params(tmp_path, corpus, **sections)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    result = runner.invoke(app, ["run", "--params", str(params)])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_selection(params_file: Path):
    result = runner.invoke(app, ["run", "--select", "key:nothing"])
    assert result.exit_code == 1 and "matches no asset" in result.output


def test_demo_corpus_command_writes_once(tmp_path: Path):
    result = invoke("demo-corpus", "--data", str(tmp_path))
    assert result.exit_code == 0 and "demo corpus written" in result.output
    assert (tmp_path / "raw" / "packages").is_dir() and (tmp_path / "finetune" / "classification.jsonl").exists()
    again = invoke("demo-corpus", "--data", str(tmp_path))
    assert again.exit_code == 0 and "leaving it as it is" in again.output


def test_failing_tokenizer_check_stops_packing(tmp_path: Path, corpus: Path, monkeypatch):
    params = write_params(tmp_path, corpus, tokenizer={"algorithm": "char", "vocab_size": 12, "min_frequency": 1})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    result = invoke("run", "--params", str(params))
    assert result.exit_code == 1
    assert "check failed: tokenizer/unk_rate_below_threshold" in result.output and "raise vocab_size" in result.output
    assert not (tmp_path / "artifacts" / "packed").exists()
