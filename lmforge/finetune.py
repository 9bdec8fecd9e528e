"""Stages ``task_data``, ``finetune_classifier`` and ``finetune_sft``: adapt the champion to the
user's tasks.

``finetune.tasks`` lists the tasks in use: a task left out is not read, its checks pass as "not
configured" and its fine-tuning stage writes ``{"skipped": reason}`` instead of models, so a user
with only a classification set needs no summarisation file.

``task_data`` reads the task sets under ``paths.finetune`` (JSONL or CSV), validates them with
great-expectations (enough examples, no empty fields, only known labels) and splits them into
train/val/test by a hash of each example's group (the package, in the demo: all paragraphs of one
package land in the same split, so the test set holds unseen packages), so that adding examples
never moves the others.
Its output ``<artifacts>/task_data/<task>/{train,val,test}.jsonl`` and ``validation.json`` feed the
fine-tuning stages, which refuse a task set that failed validation.

The fine-tuning stages train every method of ``finetune.methods`` (full, LoRA) from the champion of
``select`` and score it on the test part against baselines: the majority class and TF-IDF + logistic
regression (classification), or the pretrained model's zero-shot answers (SFT).  An SFT-tuned model
is also scored on the standard benchmarks and gated on the champion (``benchmark_gates`` in its
summary, check ``kept_benchmarks``): what learning one task cost on the others.  Output
``<artifacts>/finetune_<task>/models/<method>/hf`` (Hugging Face format; LoRA also as ``adapter/``)
and ``summary.json``; MLflow: one run per stage, nested under the champion's pretraining run, with
one child run per method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from lmforge.artifacts import fresh_dir, read_jsonl, read_summary, write_params, write_summary
from lmforge.benchmarks import benchmark_gates
from lmforge.context import QUIET, RunContext
from lmforge.params import REPO_ROOT, LmforgeError, Params
from lmforge.stages import Out, Stage
from lmforge.tracking import log_numbers, tracked_run
from lmforge.validation import CheckOutcome, validate_frame


TASK_DATA = Stage(
    "task_data", group="finetune",
    params=("paths.finetune", "finetune.tasks", "finetune.min_examples", "finetune.val_fraction", "finetune.test_fraction",
            "finetune.classification", "finetune.sft"),
    files=("data/finetune",),
    outs=("classification", "sft", Out("params.json", cache=False)),
)
FINETUNE_CLASSIFIER = Stage(
    "finetune_classifier", group="finetune",
    params=("finetune.tasks", "finetune.methods", "finetune.train", "finetune.lora", "finetune.classification"),
    reads=("task_data/classification", "select/summary.json"),
    outs=("models", Out("params.json", cache=False)),
)
FINETUNE_SFT = Stage(
    "finetune_sft", group="finetune",
    params=("finetune.tasks", "finetune.methods", "finetune.train", "finetune.lora", "finetune.sft", "evaluate.sampling", "benchmarks"),
    reads=("task_data/sft", "select/summary.json", "benchmark_data/tasks"),
    outs=("models", Out("examples.json", cache=False), Out("params.json", cache=False)),
)


#: Task name → (params section, the standard column names ← the params fields naming them).
TASKS = {
    "classification": {"text": "text_field", "label": "label_field"},
    "sft": {"prompt": "prompt_field", "response": "response_field"},
}
SPLITS = ("train", "val", "test")


def task_params(params: Params, task: str):
    return getattr(params.finetune, task)


def not_configured(params: Params, task: str) -> str | None:
    """Why ``task`` is left out (one sentence), or None when ``finetune.tasks`` lists it."""
    tasks = params.finetune.tasks
    return None if task in tasks else f"{task} is not configured (finetune.tasks: {', '.join(tasks) or 'none'})"


def read_task_file(path: Path):
    """A task set as a pandas frame of strings.  JSONL: one object a line; CSV: with a header."""
    import pandas as pd

    if not path.is_file():
        raise LmforgeError(f"{path} not found: put the task set there (JSONL or CSV; docs/fine-tuning.md)")
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if path.suffix not in (".jsonl", ".json"):
        raise LmforgeError(f"{path}: unsupported task file type (use .jsonl or .csv)")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LmforgeError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise LmforgeError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return pd.DataFrame(rows)


def task_frame(params: Params, task: str):
    """The task set with standard columns (``text``/``label`` or ``prompt``/``response``)."""
    import pandas as pd

    p = task_params(params, task)
    path = params.path(params.paths.finetune) / p.file
    frame = read_task_file(path)
    columns = {}
    for standard, field_name in TASKS[task].items():
        column = getattr(p, field_name)
        if column not in frame.columns:
            raise LmforgeError(f"{path}: no field '{column}' (finetune.{task}.{field_name}; fields: {', '.join(map(str, frame.columns)) or 'none'})")
        columns[standard] = frame[column].map(_text)
    key = next(iter(TASKS[task]))  # without a group field, each example is its own group
    if p.group_field is not None and p.group_field not in frame.columns:
        raise LmforgeError(f"{path}: no field '{p.group_field}' (finetune.{task}.group_field; null: split example by example)")
    columns["group"] = frame[p.group_field].map(_text) if p.group_field else columns[key]
    return pd.DataFrame(columns)


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and value != value) else str(value)


#: Check name → what it guarantees (Dagster declares the blocking checks from this before any run).
CHECK_NAMES = {
    **{f"{task}_min_examples": f"the {task} task set has at least finetune.min_examples examples" for task in TASKS},
    **{f"{task}_no_empty_fields": f"no missing or empty field in the {task} task set" for task in TASKS},
    "classification_known_labels": "every label is one of finetune.classification.labels",
}


def expectations(params: Params, task: str) -> list[tuple[str, str, Any]]:
    """The great-expectations checks of a task set: (check name, description, expectation)."""
    import great_expectations as gx

    E = gx.expectations
    n = params.finetune.min_examples
    checks = [(f"{task}_min_examples", f"at least {n} examples", E.ExpectTableRowCountToBeBetween(min_value=n))]
    for column in TASKS[task]:
        checks += [
            (f"{task}_no_empty_fields", "no missing or empty field", E.ExpectColumnValuesToNotBeNull(column=column)),
            (f"{task}_no_empty_fields", "no missing or empty field", E.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1)),
        ]
    if task == "classification":
        labels = params.finetune.classification.labels
        checks.append((f"{task}_known_labels", f"every label is one of finetune.classification.labels ({', '.join(labels)})",
                       E.ExpectColumnValuesToBeInSet(column="label", value_set=labels)))
    return checks


def describe(outcome: CheckOutcome) -> str:
    """One line a user can act on, e.g. 'classification_min_examples FAILED: 10 examples, at least 50 needed'."""
    if outcome.passed:
        return f"{outcome.name}: {outcome.description}"
    if outcome.name.endswith("min_examples"):  # the row-count expectation observes the number of examples
        return f"{outcome.name} FAILED: {outcome.observed} examples, {outcome.description} needed"
    example = f", e.g. {outcome.examples[0][:80]!r}" if outcome.examples else ""
    return f"{outcome.name} FAILED: {outcome.unexpected} example(s) break '{outcome.description}'{example}"


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """train/val/test by a hash of the group: stable when examples are added or reordered."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "val" if bucket < test_fraction + val_fraction else "train"


def run_task_data(params: Params, ctx: RunContext = QUIET) -> tuple[dict[str, Any], list[str], list[CheckOutcome]]:
    """Validate and split the task sets of ``finetune.tasks``; return (summary, failure lines, an
    outcome for every check of ``CHECK_NAMES``: those of a task left out pass as not configured)."""
    out = params.stage_dir("task_data")
    summary: dict[str, Any] = {"tasks": params.finetune.tasks}
    outcomes: list[CheckOutcome] = []
    failures: list[str] = []
    for task in TASKS:
        task_dir = fresh_dir(out / task)  # no split of an earlier run survives
        reason = not_configured(params, task)
        if reason:
            # the directory stays, saying why: DVC expects every output, and load_task explains
            (task_dir / "validation.json").write_text(json.dumps({"not_configured": reason}, indent=2) + "\n")
            outcomes += [CheckOutcome(name, reason) for name in CHECK_NAMES if name.startswith(f"{task}_")]
            continue
        frame = task_frame(params, task)
        results = validate_frame(task, frame, expectations(params, task))
        outcomes += results
        failures += [describe(o) for o in results if not o.passed]
        parts = {s: [] for s in SPLITS}
        for row in frame.to_dict("records"):
            parts[split_of(row["group"] or "", params.finetune.val_fraction, params.finetune.test_fraction)].append(row)
        for split, rows in parts.items():
            (task_dir / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
            summary[f"{task}_{split}"] = len(rows)
        summary[f"{task}_examples"] = len(frame)
        (task_dir / "validation.json").write_text(json.dumps({"passed": all(o.passed for o in results),
                                                             "checks": {o.name: describe(o) for o in results}}, indent=2) + "\n")
    summary["valid"] = not failures
    write_params(out, params.finetune)
    write_summary(out, summary)
    return summary, failures, outcomes


def load_task(params: Params, task: str) -> dict[str, list[dict[str, str]]]:
    """The validated splits of a task, or a one-line error if it failed validation."""
    task_dir = params.stage_dir("task_data") / task
    if not (task_dir / "validation.json").exists():
        raise LmforgeError(f"{task_dir} not found: materialize 'task_data' first")
    validation = json.loads((task_dir / "validation.json").read_text())
    if "not_configured" in validation:
        raise LmforgeError(f"the {task} task set was not prepared ({validation['not_configured']} when task_data ran): "
                           "list it in finetune.tasks and materialize 'task_data'")
    if not validation["passed"]:
        failed = [line for line in validation["checks"].values() if "FAILED" in line]
        raise LmforgeError(f"the {task} task set failed validation: " + "; ".join(failed))
    p = params.finetune
    caps = {"train": p.max_train_examples, "val": p.max_eval_examples, "test": p.max_eval_examples}
    return {s: capped(read_jsonl(task_dir / f"{s}.jsonl"), caps[s], f"{p.train.seed}-{task}-{s}") for s in SPLITS}


def capped(rows: list[dict[str, str]], n: int, seed: str) -> list[dict[str, str]]:
    """At most ``n`` rows (0: all), a seeded sample kept in file order: the same rows every run."""
    import random

    if not n or len(rows) <= n:
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def champion(params: Params) -> tuple[str, Path, str]:
    """(name, model directory, pretraining MLflow run id) of the champion chosen by ``select``."""
    chosen = read_summary(params.stage_dir("select"))
    return chosen["champion"], params.path(chosen["champion_dir"]), chosen["champion_pretrain_run_id"]


def _log_method(client, parent_id: str, params: Params, task: str, method: str, result: dict[str, Any], history: list[dict]) -> None:
    """One child run per method: its settings, per-epoch validation and test metrics."""
    experiment = client.get_run(parent_id).info.experiment_id
    run = client.create_run(experiment, run_name=f"{task} {method}", tags={"mlflow.parentRunId": parent_id, "method": method, "stage": f"finetune_{task}"})
    for key, value in dataclasses.asdict(params.finetune.train).items():
        client.log_param(run.info.run_id, key, value)
    if method == "lora":
        for key, value in dataclasses.asdict(params.finetune.lora).items():
            client.log_param(run.info.run_id, f"lora_{key}", value)
    for row in history:
        for key, value in row.items():
            if key != "epoch":
                client.log_metric(run.info.run_id, key, value, step=int(row["epoch"]))
    for key, value in result.items():
        if key == "precision":
            client.log_param(run.info.run_id, "precision_resolved", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run.info.run_id, f"test_{key}" if key in ("accuracy", "macro_f1", "rouge1", "rouge2", "rougeL") else key, value)
    client.set_terminated(run.info.run_id, "FINISHED")


def _methods_summary(summary: dict[str, Any], results: dict[str, dict[str, Any]], metrics: tuple[str, ...], baseline: dict[str, float],
                     select_key: str, higher_is_better: bool = True) -> None:
    """Flat keys per method, the method chosen on val (never on test), and whether it beats the
    baseline on test."""
    for method, r in results.items():
        summary.update({f"{method}_{k}": v for k, v in r.items()})
    sign = 1 if higher_is_better else -1
    best = max(results, key=lambda m: sign * results[m][select_key])
    summary["best_method"] = best
    summary.update({k: results[best][k] for k in metrics})
    summary.update({f"baseline_{k}": v for k, v in baseline.items()})
    summary["beats_baseline"] = all(results[best][k] > baseline[k] for k in metrics)


def skip(params: Params, stage: str, reason: str, say) -> dict[str, Any]:
    """The outcome of a fine-tuning stage whose task is not configured: ``summary.json`` says why, and
    ``models/`` is empty (DVC tracks it like any output; no model of an earlier run survives)."""
    say(f"{stage}: skipped: {reason}")
    out = params.stage_dir(stage)
    fresh_dir(out / "models")
    summary = {"skipped": reason}
    write_params(out, params.finetune)
    write_summary(out, summary)
    return summary


def run_finetune_classifier(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.finetune import (
        classical_baseline,
        classification_metrics,
        encode_classification,
        export,
        fit,
        majority_baseline,
        predict_classes,
        trainable_parameters,
        with_lora,
    )

    say = ctx.log
    reason = not_configured(params, "classification")
    if reason:
        return skip(params, "finetune_classifier", reason, say)
    p, settings = params.finetune, params.finetune.train
    data = load_task(params, "classification")
    name, source, parent = champion(params)
    labels = p.classification.labels
    label_id = {label: i for i, label in enumerate(labels)}
    texts = {s: [r["text"] for r in rows] for s, rows in data.items()}
    targets = {s: [label_id[r["label"]] for r in rows] for s, rows in data.items()}
    if len(set(targets["train"])) < 2:
        raise LmforgeError(f"finetune_classifier: every train example has the label '{data['train'][0]['label']}' "
                           "(a classifier needs examples of at least two labels)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    pad = tokenizer.pad_token_id
    encoded = {s: encode_classification(tokenizer, texts[s], targets[s], settings.max_length) for s in SPLITS}
    baseline = majority_baseline(targets["train"], targets["test"], len(labels))
    classical = classical_baseline(texts, targets, len(labels))
    say(f"finetune_classifier: champion {name}; {len(labels)} labels; train/val/test {'/'.join(str(len(encoded[s])) for s in SPLITS)}; "
        f"majority baseline accuracy {baseline['accuracy']:.3f}, macro-F1 {baseline['macro_f1']:.3f}; "
        f"TF-IDF + logistic regression (C={classical['c']:g}) accuracy {classical['accuracy']:.3f}, macro-F1 {classical['macro_f1']:.3f}")
    out = params.stage_dir("finetune_classifier")
    fresh_dir(out / "models")  # no model of an earlier run (or a method since dropped) survives
    results: dict[str, dict[str, Any]] = {}
    with tracked_run(params, "finetune classification", {"stage": "finetune_classifier", "champion": name, **ctx.tags()}, parent_run_id=parent) as (client, run_id):
        for method in p.methods:
            torch.manual_seed(settings.seed)  # the new head's initial weights
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_id, pad_token_id=pad)
            if method == "lora":
                model = with_lora(model, p.lora, "SEQ_CLS")

            def validate(m) -> dict[str, float]:
                predictions, loss = predict_classes(m, encoded["val"], settings.batch_size, pad)
                scores = classification_metrics(predictions, targets["val"], len(labels))
                return {"val_loss": loss, "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}

            started = time.perf_counter()
            fitted = fit(model, encoded["train"], validate, settings, settings.lora_lr if method == "lora" else settings.lr, pad,
                         "val_macro_f1", desc=f"classification {method}", log=say)
            predictions, _ = predict_classes(model, encoded["test"], settings.batch_size, pad)
            results[method] = {**classification_metrics(predictions, targets["test"], len(labels)), "best_epoch": fitted.best_epoch,
                               "epochs": fitted.epochs_run, "val_macro_f1": fitted.best_score, "trainable_parameters": trainable_parameters(model),
                               "seconds": time.perf_counter() - started, "precision": fitted.precision}
            say(f"finetune_classifier {method}: test accuracy {results[method]['accuracy']:.3f}, macro-F1 {results[method]['macro_f1']:.3f}")
            export(model, tokenizer, out / "models" / method, lora=method == "lora", root=REPO_ROOT)
            _log_method(client, run_id, params, "classification", method, results[method], fitted.history)
        summary: dict[str, Any] = {"champion": name, "labels": labels, "test_examples": len(encoded["test"])}
        _methods_summary(summary, results, ("accuracy", "macro_f1"), baseline, "val_macro_f1")
        summary.update({f"classical_{k}": v for k, v in classical.items()})
        summary["beats_classical"] = all(summary[k] > classical[k] for k in ("accuracy", "macro_f1"))
        for key in ("accuracy", "macro_f1", "baseline_accuracy", "baseline_macro_f1", "classical_accuracy", "classical_macro_f1"):
            client.log_metric(run_id, key, summary[key])
        client.log_param(run_id, "classical_c", classical["c"])
    summary["mlflow_run_id"] = run_id
    write_params(out, p)
    write_summary(out, summary)
    return summary


def sft_answers(params: Params, model, tokenizer, prompts: list[str]) -> list[str]:
    """The one-line greedy answers SFT is scored on (ROUGE against the references), asked in the
    model's chat format when it has one: the same for every model compared."""
    from models.finetune import first_line
    from models.generation import generate, has_chat_template

    greedy = dataclasses.replace(params.evaluate.sampling, temperature=0.0, max_new_tokens=params.finetune.sft.max_new_tokens)
    return [first_line(t) for t in generate(model, tokenizer, prompts, greedy, batch_size=params.finetune.train.batch_size,
                                            chat=has_chat_template(tokenizer))]


@dataclasses.dataclass
class SftTask:
    """The SFT task set as the champion reads it: what the stage and a search trial both train on."""

    name: str  # the champion
    source: Path  # its model directory
    parent: str  # its pretraining MLflow run
    tokenizer: Any
    prompts: dict[str, list[str]]  # per split, as the model is asked them
    encoded: dict[str, list[dict[str, Any]]]  # per split, token ids with the loss on the response
    references: list[str]  # the test part's responses

    @property
    def chat(self) -> bool:
        """An instruct champion: trained (``encode_sft``) and asked in its chat format."""
        from models.generation import has_chat_template

        return has_chat_template(self.tokenizer)


def sft_task(params: Params) -> SftTask:
    """The validated SFT task set, prompted and encoded for the champion of ``select``."""
    from transformers import AutoConfig, AutoTokenizer

    from models.finetune import encode_sft, sft_prompt
    from models.loading import objective_of

    settings, task = params.finetune.train, params.finetune.sft
    data = load_task(params, "sft")
    name, source, parent = champion(params)
    if objective_of(AutoConfig.from_pretrained(source)) != "causal":
        raise LmforgeError(f"finetune_sft: the champion '{name}' is not a causal language model; SFT fine-tunes causal models only")
    tokenizer = AutoTokenizer.from_pretrained(source)
    prompts = {s: [sft_prompt(tokenizer, r["prompt"], task.template, task.max_prompt_tokens) for r in rows] for s, rows in data.items()}
    encoded = {s: encode_sft(tokenizer, prompts[s], [r["response"] for r in data[s]], settings.max_length) for s in SPLITS}
    return SftTask(name, source, parent, tokenizer, prompts, encoded, [r["response"] for r in data["test"]])


def train_sft(params: Params, task: SftTask, method: str, say, on_epoch=None):
    """Fine-tune the champion on the task's train part with ``method`` (full or LoRA), the epoch of
    the lowest validation loss kept: (model, ``models.finetune.FitResult``).  ``on_epoch`` sees each
    epoch's validation loss (a search trial's pruner)."""
    import torch

    from models.finetune import fit, mean_loss, with_lora
    from models.loading import load_model

    settings, pad = params.finetune.train, task.tokenizer.pad_token_id
    torch.manual_seed(settings.seed)  # LoRA's initial update: the same in the stage and in a search trial
    model = load_model(task.source, "causal")
    if method == "lora":
        model = with_lora(model, params.finetune.lora, "CAUSAL_LM")

    def validate(m) -> dict[str, float]:
        return {"val_loss": mean_loss(m, task.encoded["val"], settings.batch_size, pad)}

    fitted = fit(model, task.encoded["train"], validate, settings, settings.lora_lr if method == "lora" else settings.lr, pad,
                 "val_loss", higher_is_better=False, desc=f"sft {method}", log=say, on_epoch=on_epoch)
    return model, fitted


def run_finetune_sft(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    import torch

    from models.finetune import export, rouge, trainable_parameters
    from models.loading import load_model

    say = ctx.log
    reason = not_configured(params, "sft")
    if reason:
        summary = skip(params, "finetune_sft", reason, say)
        (params.stage_dir("finetune_sft") / "examples.json").write_text("[]\n")  # a DVC output like the models
        return summary
    p, settings = params.finetune, params.finetune.train
    task = sft_task(params)
    name, source, references = task.name, task.source, task.references

    def answers(model) -> list[str]:
        return sft_answers(params, model, task.tokenizer, task.prompts["test"])

    torch.manual_seed(settings.seed)
    zero_shot_answers = answers(load_model(source, "causal").eval())
    baseline = rouge(zero_shot_answers, references)
    say(f"finetune_sft: champion {name}{' (chat template)' if task.chat else ''}; train/val/test {'/'.join(str(len(task.encoded[s])) for s in SPLITS)}; "
        f"zero-shot ROUGE-1 {baseline['rouge1']:.3f}, ROUGE-L {baseline['rougeL']:.3f}")
    out = params.stage_dir("finetune_sft")
    fresh_dir(out / "models")
    results: dict[str, dict[str, Any]] = {}
    examples = []
    with tracked_run(params, "finetune sft", {"stage": "finetune_sft", "champion": name, **ctx.tags()}, parent_run_id=task.parent) as (client, run_id):
        for method in p.methods:
            started = time.perf_counter()
            model, fitted = train_sft(params, task, method, say)
            predicted = answers(model)
            results[method] = {**rouge(predicted, references), "best_epoch": fitted.best_epoch, "epochs": fitted.epochs_run,
                               "val_loss": fitted.best_score,
                               "trainable_parameters": trainable_parameters(model), "seconds": time.perf_counter() - started,
                               "precision": fitted.precision}
            examples += [{"method": method, "prompt": q[:300], "reference": ref, "zero_shot": z, "fine_tuned": a}
                         for q, ref, z, a in list(zip(task.prompts["test"], references, zero_shot_answers, predicted))[:5]]
            say(f"finetune_sft {method}: test ROUGE-1 {results[method]['rouge1']:.3f}, ROUGE-2 {results[method]['rouge2']:.3f}, ROUGE-L {results[method]['rougeL']:.3f}")
            export(model, task.tokenizer, out / "models" / method, lora=method == "lora", root=REPO_ROOT)
            _log_method(client, run_id, params, "sft", method, results[method], fitted.history)
        # What tuning on one task cost on everything else: each method gated on the champion.
        gates, benchmarks = benchmark_gates(params, {m: out / "models" / m / "hf" for m in results}, ("champion", source), results, say)
        summary: dict[str, Any] = {"champion": name, "chat_template": task.chat, "test_examples": len(references), "benchmark_gates": gates,
                                   "benchmarks": benchmarks}
        _methods_summary(summary, results, ("rouge1", "rouge2", "rougeL"), baseline, "val_loss", higher_is_better=False)
        (out / "examples.json").write_text(json.dumps(examples, indent=2, ensure_ascii=False) + "\n")
        client.log_artifact(run_id, str(out / "examples.json"))
        for key in ("rouge1", "rouge2", "rougeL", "baseline_rouge1", "baseline_rouge2", "baseline_rougeL"):
            client.log_metric(run_id, key, summary[key])
        for model, scores in benchmarks.items():
            log_numbers(client, run_id, {f"{model}_{k}": v for k, v in scores["summary"].items()})
    summary["mlflow_run_id"] = run_id
    write_params(out, p)
    write_summary(out, summary)
    return summary
