"""``lmforge run`` end to end on a tiny corpus, and its errors: one clear line, no traceback."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_params
from test_finetune import TINY_DOWNSTREAM, write_task_sets
from typer.testing import CliRunner

from dagster_project.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "demo-corpus", "summary", "generate"):
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
    assert packed["train_tokens"] > 0 and (art / "packed/trained/train.bin").exists()
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


@pytest.mark.slow
def test_pretrain_runs_per_candidate_and_is_tracked_in_mlflow(tmp_path: Path, corpus: Path, monkeypatch):
    import mlflow

    db = tmp_path / "mlflow.db"
    params = write_params(
        tmp_path,
        corpus,
        tokenizer={"vocab_size": 400, "block_size": 64},
        split={"train": 0.6, "val": 0.2, "test": 0.2},
        mlflow={"tracking_uri": f"sqlite:///{db}", "experiment": "test"},
        pretrain={
            "train": {"max_steps": 60, "batch_size": 4, "lr": 0.01, "val_every": 30, "checkpoint_every": 30, "warmup_steps": 5, "val_batches": 2},
            "candidates": [{"name": "a", "preset": "tiny", "overrides": {}}, {"name": "b", "preset": "tiny", "overrides": {"position": "alibi"}}],
        },
        **TINY_DOWNSTREAM,
    )
    write_task_sets(tmp_path / "finetune", classification=60, sft=40)
    # a process of its own, as a user runs it: partitions come from the params file at load time
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "LMFORGE_PARAMS": str(params)}
    env.pop("MLFLOW_TRACKING_URI", None)

    def lmforge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / ".venv/bin/lmforge"), *args], env=env, capture_output=True, text=True, timeout=900)

    result = lmforge("run", "--select", "key:pretrain", "--partition", "a")
    assert result.returncode == 1 and "materialize the 'packed' stage first" in result.stderr
    result = lmforge("run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded: pretrain, evaluate [a]" in result.stdout and "succeeded: pretrain, evaluate [b]" in result.stdout
    for name, family in (("a", "llama"), ("b", "bloom")):
        summary = json.loads((tmp_path / "artifacts/pretrain" / name / "summary.json").read_text())
        assert {"parameters", "tokens_seen", "tokens_per_second", "final_val_loss"} <= set(summary) and summary["family"] == family
        assert (tmp_path / "artifacts/pretrain" / name / "loss_curve.png").exists()
    # then each candidate is evaluated, the champion selected and fine-tuned, in the same `lmforge run`
    (last,) = [line for line in result.stdout.splitlines() if "succeeded" in line and "select" in line]
    assert all(name in last for name in ("task_data", "finetune_classifier", "finetune_sft", "quantize", "prune", "distil", "register"))
    registered = json.loads((tmp_path / "artifacts/register/summary.json").read_text())
    assert registered["champion_version"] == "1" and registered["candidate"] == champion_name(tmp_path)
    assert json.loads((tmp_path / "artifacts/register_quantized/summary.json").read_text())["base_version"] == "1"
    # and the rag group: index, with/without retrieval, prompts, the sweep tagged on the champion's version
    assert all(name in last for name in ("retrieval_index", "rag_eval", "prompt_eval", "sampling_sweep"))
    assert json.loads((tmp_path / "artifacts/sampling_sweep/summary.json").read_text())["tagged_version"] == "1"
    for name in ("a", "b"):
        evaluation = json.loads((tmp_path / "artifacts/evaluate" / name / "summary.json").read_text())
        assert {"perplexity", "bits_per_byte", "token_accuracy", "context_x4_perplexity", "tokens_per_second_b8"} <= set(evaluation)
        assert all(evaluation["checks"].values())
    champion = json.loads((tmp_path / "artifacts/select/summary.json").read_text())["champion"]
    assert json.loads((tmp_path / "artifacts/finetune_sft/summary.json").read_text())["champion"] == champion
    assert "macro_f1" in json.loads((tmp_path / "artifacts/finetune_classifier/summary.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    all_runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    runs = [r for r in all_runs if "stage" not in r.data.tags and "candidate" in r.data.tags]  # pretraining runs
    assert sorted(r.data.tags["candidate"] for r in runs) == ["a", "b"]
    evaluations = [r for r in all_runs if r.data.tags.get("stage") == "evaluate"]
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in evaluations) == sorted(r.info.run_id for r in runs)  # nested
    run = runs[0]
    assert {"train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "val/perplexity"} <= set(run.data.metrics)
    assert {"git_sha", "dvc_data_md5", "dagster_run_id", "candidate", "model_dir"} <= set(run.data.tags) and run.data.tags["dagster_run_id"]
    assert "arch.n_layer" in run.data.params and [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss_curve.png"]
    assert run.info.status == "FINISHED"
    result = lmforge("run", "--select", "key:pretrain", "--partition", "zzz")
    assert result.returncode == 1 and "no partition 'zzz' (partitions: a, b)" in result.stderr
    # nothing changed: nothing is recomputed, and the summary table ends the run
    assert "to compute: nothing" in result_of(lmforge("run")) and registered == json.loads((tmp_path / "artifacts/register/summary.json").read_text())
    assert "★ champion" in result_of(lmforge("summary")) and len(client.search_model_versions("name='lmforge'")) == 2
    # a changed parameter recomputes its stage and what depends on it, nothing else
    data = yaml.safe_load(params.read_text())
    data["distil"]["steps"] = 12
    params.write_text(yaml.safe_dump(data))
    out = result_of(lmforge("run"))
    assert "to compute: distil\n" in out and "succeeded: distil" in out
    # a new raw document makes everything from ingest on out of date (--dry-run only tells)
    (corpus / "arrived.txt").write_text("A new document about models and packages arrives in the raw folder today.")
    out = result_of(lmforge("run", "--dry-run"))
    assert "up to date: 2 of 21 assets" in out and "pretrain[a]" in out and "register_quantized" in out
    assert "task_data" not in out and "base_models" not in out  # neither the task sets nor the base models come from the raw documents


def result_of(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def champion_name(root: Path) -> str:
    return json.loads((root / "artifacts/select/summary.json").read_text())["champion"]
