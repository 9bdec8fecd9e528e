"""Fine-tuning: metrics against known values, task-set validation, and a tiny task learned."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import HALF, TINY_BENCHMARKS, WORDS, classification_rows, sentence, sft_rows, tiny_champion, write_params

from lmforge.benchdata import run_benchmark_data
from lmforge.finetune import load_task, read_task_file, run_finetune_classifier, run_finetune_sft, run_task_data, split_of
from lmforge.params import LmforgeError, load_params
from models.finetune import classification_metrics, encode_sft, majority_baseline, rouge


def test_accuracy_and_macro_f1_match_known_values():
    got = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 2], num_classes=3)
    # per-class F1: 0 → 2/3 (P 1/2, R 1), 1 → 4/5 (P 1, R 2/3), 2 → 1
    assert math.isclose(got["accuracy"], 0.8, rel_tol=1e-6)
    assert math.isclose(got["macro_f1"], (2 / 3 + 4 / 5 + 1) / 3, rel_tol=1e-6)
    assert majority_baseline([1, 1, 0], [1, 0, 1, 1], num_classes=2)["accuracy"] == 0.75


def test_rouge_matches_known_values():
    got = rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert math.isclose(got["rouge1"], 5 / 6, rel_tol=1e-5)  # 5 of 6 unigrams shared
    assert math.isclose(got["rouge2"], 3 / 5, rel_tol=1e-5)  # the cat, on the, the mat
    assert math.isclose(got["rougeL"], 5 / 6, rel_tol=1e-5)  # LCS: the cat on the mat
    assert rouge(["completely different"], ["the cat"])["rouge1"] == 0.0


def test_sft_examples_are_scored_on_the_response_only(tmp_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_champion(tmp_path))
    (example,) = encode_sft(tok, ["a prompt\nSummary:"], ["the answer"], max_length=64)
    n_prompt = len(tok("a prompt\nSummary:", add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:] and example["labels"][-1] == tok.eos_token_id


# --------------------------------------------------------------------------------------------------
# Task sets
# --------------------------------------------------------------------------------------------------


def task_params(tmp_path: Path, classification_set: list[dict], sft_set: list[dict], **finetune):
    finetune_dir = tmp_path / "finetune"
    finetune_dir.mkdir(exist_ok=True)
    for name, rows in (("classification.jsonl", classification_set), ("summarisation.jsonl", sft_set)):
        (finetune_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = {"min_examples": 20, "classification": {"labels": ["first", "second"]}, **finetune}
    return load_params(write_params(tmp_path, finetune=section, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                                    benchmarks=TINY_BENCHMARKS))


def test_valid_task_sets_are_split_by_group(tmp_path: Path):
    params = task_params(tmp_path, classification_rows(90), sft_rows(40))
    summary, failures, _ = run_task_data(params)
    assert failures == [] and summary["valid"] and summary["classification_examples"] == 90
    assert sum(summary[f"classification_{s}"] for s in ("train", "val", "test")) == 90
    splits = load_task(params, "classification")
    where = {row["group"]: s for s, rows in splits.items() for row in rows}
    for s, rows in splits.items():
        assert all(where[row["group"]] == s for row in rows)  # both examples of a source document together
    assert split_of("doc1", 0.2, 0.2) == split_of("doc1", 0.2, 0.2)


@pytest.mark.parametrize(
    "rows, message",
    [
        (classification_rows(10), "classification_min_examples FAILED: 10 examples, at least 20 examples needed"),
        (classification_rows(30) + [{"text": "some text here", "label": "third", "source": "x"}],
         "classification_known_labels FAILED: 1 example(s) break 'every label is one of finetune.classification.labels (first, second)', e.g. 'third'"),
        (classification_rows(30) + [{"text": "", "label": "first", "source": "y"}], "classification_no_empty_fields FAILED: 1 example(s)"),
    ],
)
def test_a_bad_task_set_is_refused_with_a_clear_message(tmp_path: Path, rows: list[dict], message: str):
    params = task_params(tmp_path, rows, sft_rows(40))
    summary, failures, _ = run_task_data(params)
    assert not summary["valid"] and any(f.startswith(message) for f in failures), failures
    with pytest.raises(LmforgeError, match="the classification task set failed validation"):
        load_task(params, "classification")


def test_task_file_errors(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "first"}\n{not json}\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: not valid JSON"):
        read_task_file(bad)
    with pytest.raises(LmforgeError, match="not found: put the task set there"):
        read_task_file(tmp_path / "missing.jsonl")
    csv = tmp_path / "tasks.csv"
    csv.write_text("text,label\nhello world,first\n")
    assert read_task_file(csv).to_dict("records") == [{"text": "hello world", "label": "first"}]
    params = task_params(tmp_path, [{"body": "x", "label": "first", "source": "s"}], sft_rows(5))
    with pytest.raises(LmforgeError, match="no field 'text' .*finetune.classification.text_field"):
        run_task_data(params)


def test_a_blocking_task_check_stops_fine_tuning_in_dagster(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from dagster_project.cli import app

    task_params(tmp_path, classification_rows(10), sft_rows(40))
    monkeypatch.setenv("LMFORGE_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["run", "--select", "key:task_data+"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "check failed: task_data/classification_min_examples: classification_min_examples FAILED: 10 examples" in result.output
    assert not (tmp_path / "artifacts/finetune_classifier").exists()


# --------------------------------------------------------------------------------------------------
# Fine-tuning a tiny champion
# --------------------------------------------------------------------------------------------------


def test_fine_tuning_beats_the_baselines_on_a_tiny_task(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = task_params(tmp_path, classification_rows(120), sft_rows(80),
                         train={"epochs": 6, "lr": 0.01, "lora_lr": 0.03, "batch_size": 8, "max_length": 64, "patience": 0, "precision": "32"},
                         sft={"max_prompt_tokens": 40, "max_new_tokens": 10})
    run_task_data(params)
    tiny_champion(tmp_path)
    classifier = run_finetune_classifier(params)
    assert classifier["beats_baseline"], classifier
    for method in ("full", "lora"):
        assert classifier[f"{method}_accuracy"] > classifier["baseline_accuracy"], classifier
        assert (tmp_path / f"artifacts/finetune_classifier/models/{method}/hf/config.json").exists()
    assert classifier["lora_trainable_parameters"] < classifier["full_trainable_parameters"] / 5
    assert (tmp_path / "artifacts/finetune_classifier/models/lora/adapter/adapter_config.json").exists()
    run_benchmark_data(params, require_split=False)  # the items an SFT-tuned model is gated on
    sft = run_finetune_sft(params)
    assert sft["beats_baseline"] and sft["rougeL"] > sft["baseline_rougeL"], sft
    assert set(sft["benchmark_gates"]) == {"full", "lora"} and set(sft["benchmarks"]) == {"champion", "full", "lora"}
    assert all(g["tasks"] for g in sft["benchmark_gates"].values()) and "lora_bench_accuracy" in sft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "artifacts/finetune_classifier/models/lora/hf")  # merged LoRA
    AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts/finetune_sft/models/full/hf")
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    parents = {r.info.run_id: r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = sorted((parents[r.data.tags["mlflow.parentRunId"]], r.info.run_name) for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert children == [("finetune classification", "classification full"), ("finetune classification", "classification lora"),
                        ("finetune sft", "sft full"), ("finetune sft", "sft lora")]


# --------------------------------------------------------------------------------------------------
# The classical baseline, a user's own classification-only task set, chat templates
# --------------------------------------------------------------------------------------------------


def test_the_classical_baseline_separates_separable_words():
    from models.finetune import CLASSICAL_C_GRID, classical_baseline

    rng = random.Random(0)
    part = {s: [i % 2 for i in range(n)] for s, n in (("train", 40), ("val", 10), ("test", 12))}
    texts = {s: [sentence(rng, WORDS[:HALF] if y == 0 else WORDS[HALF:], 8) for y in ys] for s, ys in part.items()}
    got = classical_baseline(texts, part, num_classes=2)
    assert got["accuracy"] == 1.0 and got["macro_f1"] == 1.0 and got["c"] == CLASSICAL_C_GRID[0]  # every C is perfect: the smallest wins
    # words that say nothing about the label leave it at chance: 'first'/'second' texts drawn from one vocabulary
    noise = {s: [sentence(rng, WORDS, 8) for _ in ys] for s, ys in part.items()}
    assert classical_baseline(noise, part, num_classes=2)["macro_f1"] < 0.9


def test_finetune_tasks_are_validated(tmp_path: Path):
    from lmforge.params import ParamsError

    for tasks, message in ((["sft", "sft"], "finetune: tasks: sft listed more than once"),
                           (["summarisation"], r"finetune.tasks\[0\]: 'summarisation' is not one of 'classification', 'sft'")):
        with pytest.raises(ParamsError, match=message):
            load_params(write_params(tmp_path, finetune={"tasks": tasks}))
    assert load_params(write_params(tmp_path)).finetune.tasks == ["classification", "sft"]  # the default


def test_a_classification_only_task_set_with_its_own_fields_and_labels(tmp_path: Path, monkeypatch):
    """A user's reviews (sentence → sentiment pos/neg), no summarisation file: task_data and the
    classifier run, SFT is skipped, and every check of the sft task passes as not configured."""
    import dagster as dg

    from assets.finetune import finetune_classifier, finetune_sft, task_data
    from assets.resources import ParamsResource
    from lmforge.report import rows as report_rows

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = [{"sentence": r["text"], "sentiment": "pos" if r["label"] == "first" else "neg"} for r in classification_rows(60)]
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune/reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reviews = {"file": "reviews.jsonl", "text_field": "sentence", "label_field": "sentiment", "group_field": None, "labels": ["pos", "neg"]}
    params_path = write_params(tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, finetune={
        "tasks": ["classification"], "methods": ["lora"], "min_examples": 20, "train": {"epochs": 1, "max_length": 64}, "classification": reviews})
    monkeypatch.setenv("LMFORGE_PARAMS", str(params_path))
    tiny_champion(tmp_path)
    result = dg.materialize([task_data, finetune_classifier, finetune_sft], resources={"lmforge_params": ParamsResource()})
    assert result.success
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert all(e.passed for name, e in checks.items() if name.startswith(("classification_", "sft_")))
    assert not checks["beats_classical_baseline"].passed  # a warning: separable words, TF-IDF is perfect
    assert checks["sft_min_examples"].description == "sft_min_examples: sft is not configured (finetune.tasks: classification)"
    assert checks["beats_zero_shot"].description == "sft is not configured (finetune.tasks: classification)"
    assert set(checks) >= {"classification_known_labels", "beats_majority_baseline", "beats_classical_baseline"}

    params = load_params()
    prepared = json.loads((tmp_path / "artifacts/task_data/summary.json").read_text())
    assert prepared["valid"] and prepared["classification_examples"] == 60 and not any(k.startswith("sft_") for k in prepared)
    with pytest.raises(LmforgeError, match=r"the sft task set was not prepared \(sft is not configured .*\): list it in finetune.tasks"):
        load_task(params, "sft")
    classifier = json.loads((tmp_path / "artifacts/finetune_classifier/summary.json").read_text())
    assert classifier["labels"] == ["pos", "neg"] and classifier["best_method"] == "lora"
    assert classifier["classical_macro_f1"] == 1.0 and classifier["beats_classical"] is False  # separable words: TF-IDF is perfect
    sft = json.loads((tmp_path / "artifacts/finetune_sft/summary.json").read_text())
    assert sft == {"skipped": "sft is not configured (finetune.tasks: classification)"}
    assert list((tmp_path / "artifacts/finetune_sft/models").iterdir()) == []
    table = {stage: text for stage, _item, text in report_rows(params)}
    assert table["finetune_sft"] == "skipped: sft is not configured (finetune.tasks: classification)"
    assert "TF-IDF+LR 1.000" in table["finetune_classifier"]


#: A simple chat template (roles as markers), for tokenizers trained here that have none.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_champion(tmp_path: Path) -> Path:
    """The tiny champion's model with a chat template on its tokenizer (an 'instruct' model)."""
    import shutil

    from transformers import AutoTokenizer

    chat_dir = tmp_path / "chat"
    shutil.copytree(tiny_champion(tmp_path), chat_dir)
    tok = AutoTokenizer.from_pretrained(chat_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat_dir)
    return chat_dir


def test_sft_with_a_chat_template_learns_the_assistant_turn_only(tmp_path: Path):
    from transformers import AutoTokenizer

    from models.finetune import sft_prompt
    from models.generation import chat_prompt

    tok = AutoTokenizer.from_pretrained(chat_champion(tmp_path))
    question = sft_prompt(tok, "the model reads documents", "{prompt}\nSummary:", max_prompt_tokens=40)
    assert chat_prompt(tok, question) == "<|user|>the model reads documents\nSummary:\n<|assistant|>"
    (example,) = encode_sft(tok, [question], ["the answer"], max_length=128)
    text = tok.decode(example["input_ids"])
    assert "<|user|>" in text and "<|assistant|>" in text
    n_prompt = len(tok(chat_prompt(tok, question), add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    response = tok("the answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # the assistant's words (no leading space) + eos
    assert example["labels"][n_prompt:] == response == example["input_ids"][n_prompt:]


def test_sft_of_an_instruct_champion_trains_and_scores_in_its_chat_format(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = task_params(tmp_path, classification_rows(30), sft_rows(40), tasks=["sft"], methods=["lora"],
                         train={"epochs": 1, "max_length": 128}, sft={"max_prompt_tokens": 20, "max_new_tokens": 4})
    run_task_data(params)
    chat_dir = chat_champion(tmp_path)
    select = tmp_path / "artifacts/select/summary.json"
    select.write_text(json.dumps({**json.loads(select.read_text()), "champion_dir": str(chat_dir)}))
    run_benchmark_data(params, require_split=False)
    sft = run_finetune_sft(params)
    assert sft["chat_template"] is True and sft["best_method"] == "lora" and 0 <= sft["rougeL"] <= 1
    assert run_finetune_classifier(params) == {"skipped": "classification is not configured (finetune.tasks: sft)"}


def test_generate_chat_uses_the_template_and_batches(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from dagster_project.cli import app
    from lmforge.params import SamplingParams
    from models.generation import chat_prompt, generate, load

    monkeypatch.setenv("LMFORGE_PARAMS", str(write_params(tmp_path)))
    chat_dir = chat_champion(tmp_path)
    model, tok, _ = load(chat_dir)
    prompts = ["the model reads", "engineers want lineage from each weight back to the file"]
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    batched = generate(model, tok, prompts, greedy, batch_size=2, chat=True)  # left-padded conversations
    assert batched == [generate(model, tok, [p], greedy, chat=True)[0] for p in prompts]
    assert batched == generate(model, tok, [chat_prompt(tok, p) for p in prompts], greedy)  # the same tokens as the template's text

    def cli(*args: str):
        return CliRunner().invoke(app, ["generate", "--json", "--temperature", "0", "--max-new-tokens", "5", *args, *prompts])

    def completions(result) -> list[str]:
        assert result.exit_code == 0, result.output
        return [json.loads(line)["completion"] for line in result.output.strip().splitlines()]

    assert completions(cli("-m", str(chat_dir))) == completions(cli("-m", str(chat_dir), "--chat")) == batched  # on by default
    assert completions(cli("-m", str(chat_dir), "--no-chat")) == generate(model, tok, prompts, greedy)
    plain = tiny_champion(tmp_path)
    refused = cli("-m", str(plain), "--chat")
    assert refused.exit_code == 1 and "--chat:" in refused.output and "has no chat template" in refused.output
    assert "--no-chat" in CliRunner().invoke(app, ["generate", "--help"]).output


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_training_steps_run_in_the_asked_precision_and_validation_in_fp32(precision: str):
    """bf16-mixed: the forward passes of training steps under bf16 autocast (weights stay fp32, so the
    optimiser's updates do too); validation, the yardstick, in fp32; the run records what ran."""
    from types import SimpleNamespace

    from models.finetune import fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    seen: dict[str, set] = {"train": set(), "validate": set()}
    phase = ["train"]
    model.register_forward_hook(lambda _m, _i, out: seen[phase[0]].add(out.dtype))

    class Regressor(torch.nn.Module):  # what fit expects of a Hugging Face model: .device and .loss
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, labels, **_):
            return SimpleNamespace(loss=(self.inner(input_ids.float()).float().squeeze(-1) - labels.float()).pow(2).mean())

    def validate(m):
        phase[0] = "validate"
        with torch.no_grad():
            loss = m(input_ids=torch.ones(2, 4), labels=torch.zeros(2)).loss.item()
        phase[0] = "train"
        return {"val_loss": loss}

    examples = [{"input_ids": [1, 2, 3, 4], "labels": 0} for _ in range(4)]
    settings = SimpleNamespace(seed=0, weight_decay=0.0, epochs=1, batch_size=2, warmup_ratio=0.0, patience=0, precision=precision)
    result = fit(Regressor(), examples, validate, settings, 1e-2, pad_id=0, score_key="val_loss", higher_is_better=False)
    assert result.precision == precision
    assert seen["train"] == {torch.bfloat16 if precision == "bf16-mixed" else torch.float32}
    assert seen["validate"] == {torch.float32} and model.weight.dtype == torch.float32


def test_auto_precision_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    import models.precision as precision

    assert precision.resolve("32", "cpu") == "32" and precision.resolve("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.setattr(precision, "native_bf16", lambda _device: False)
    assert precision.resolve("auto", "cpu") == "32"
    monkeypatch.setattr(precision, "native_bf16", lambda _device: True)
    assert precision.resolve("auto", "cpu") == "bf16-mixed"
