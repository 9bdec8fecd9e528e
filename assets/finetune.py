"""Assets ``task_data`` (validated task sets), ``finetune_classifier`` and ``finetune_sft``."""

import json

import dagster as dg

import lmforge.finetune
from assets.common import declared, materialized, md_table, stage_params, summary_metadata
from assets.factory import run_config, run_context, stage_asset
from assets.gates import kept_benchmarks
from assets.resources import ParamsResource


@dg.asset(
    **declared("task_data"),
    kinds={"python", "great_expectations"},
    check_specs=[dg.AssetCheckSpec(name, asset="task_data", blocking=True, description=d) for name, d in lmforge.finetune.CHECK_NAMES.items()],
    description="The fine-tuning task sets of finetune.tasks under paths.finetune (JSONL/CSV), validated with "
    "great-expectations (blocking: enough examples, no empty field, known labels) and split train/val/test by group.",
)
def task_data(context: dg.AssetExecutionContext, config: run_config("finetune"), lmforge_params: ParamsResource):
    """Not ``stage_asset``: its checks are great-expectations' outcomes, one per expectation of every task."""
    params = stage_params(lmforge_params.load(), "finetune", config)
    summary, failures, outcomes = lmforge.finetune.run_task_data(params, run_context(context))
    for line in failures:
        context.log.error(line)
    counts = [{"task": t, **{s: summary[f"{t}_{s}"] for s in lmforge.finetune.SPLITS}} for t in params.finetune.tasks]
    yield materialized("task_data", params, {**summary_metadata(summary), "tasks": ", ".join(params.finetune.tasks) or "none",
                                             "splits": dg.MetadataValue.md(md_table(counts))})
    # Dagster needs a result for every declared check; a task left out of finetune.tasks passes its
    # checks with "not configured" as the description, which the UI shows beside the green mark
    # (an unreported check would fail the step, and a skipped one reads like a run that broke off).
    for outcome in outcomes:
        yield dg.AssetCheckResult(check_name=outcome.name, passed=outcome.passed, description=lmforge.finetune.describe(outcome),
                                  metadata={"unexpected": outcome.unexpected})


def _results_table(summary: dict, metrics: tuple[str, ...], models: dict[str, str]) -> dg.MetadataValue:
    """One row per model: ``models`` maps its label to its key prefix in summary.json."""
    return dg.MetadataValue.md(md_table([{"model": label, **{m: f"{summary[f'{prefix}_{m}']:.3f}" for m in metrics}}
                                         for label, prefix in models.items()]))


def _classifier_results(summary: dict, params, out) -> dict:
    models = {"majority class": "baseline", "tf-idf + logistic regression": "classical", **{m: m for m in params.finetune.methods}}
    return {"results": _results_table(summary, ("accuracy", "macro_f1"), models)}


def _classifier_checks(summary: dict, params, out) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(
        check_name=check, passed=summary[f"beats_{prefix}"], severity=dg.AssetCheckSeverity.WARN,
        description=f"{summary['best_method']}: accuracy {summary['accuracy']:.3f} vs {summary[f'{prefix}_accuracy']:.3f}, "
        f"macro-F1 {summary['macro_f1']:.3f} vs {summary[f'{prefix}_macro_f1']:.3f}")
        for check, prefix in (("beats_majority_baseline", "baseline"), ("beats_classical_baseline", "classical"))]


def _sft_results(summary: dict, params, out) -> dict:
    examples = json.loads((out / "examples.json").read_text())
    models = {"zero-shot": "baseline", **{m: m for m in params.finetune.methods}}
    return {"results": _results_table(summary, ("rouge1", "rouge2", "rougeL"), models),
            "examples": dg.MetadataValue.md(md_table([{k: e[k] for k in ("method", "reference", "zero_shot", "fine_tuned")} for e in examples]))}


def _sft_checks(summary: dict, params, out) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(check_name="beats_zero_shot", passed=summary["beats_baseline"], severity=dg.AssetCheckSeverity.WARN,
                                description=f"{summary['best_method']}: ROUGE-L {summary['rougeL']:.3f} vs zero-shot {summary['baseline_rougeL']:.3f}"),
            kept_benchmarks(summary["benchmark_gates"])]


finetune_classifier = stage_asset(
    "finetune_classifier", lmforge.finetune.run_finetune_classifier, section="finetune", show=_classifier_results, checks=_classifier_checks,
    kinds={"python", "pytorch", "peft", "mlflow"},
    pool="training",
    check_specs=[
        dg.AssetCheckSpec("beats_majority_baseline", asset="finetune_classifier",
                          description="Test accuracy and macro-F1 above the majority class's."),
        dg.AssetCheckSpec("beats_classical_baseline", asset="finetune_classifier",
                          description="Test accuracy and macro-F1 above TF-IDF + logistic regression trained on the same train part."),
    ],
    description="The champion with a classification head, fine-tuned (full and LoRA); accuracy and macro-F1 "
    "on the test part against the majority class and TF-IDF + logistic regression.",
)

finetune_sft = stage_asset(
    "finetune_sft", lmforge.finetune.run_finetune_sft, section="finetune", show=_sft_results, checks=_sft_checks,
    kinds={"python", "pytorch", "peft", "mlflow"},
    pool="training",
    check_specs=[dg.AssetCheckSpec("beats_zero_shot", asset="finetune_sft", description="Test ROUGE-1/2/L above the pretrained model's zero-shot answers."),
                 dg.AssetCheckSpec("kept_benchmarks", asset="finetune_sft",
                                   description="Each tuned model's benchmark gate against the champion (benchmarks.max_regression, paired).")],
    description="Supervised fine-tuning of the (causal) champion on prompt/response pairs (full and LoRA), as chats "
    "when its tokenizer has a chat template; ROUGE-1/2/L on the test part against the pretrained model's zero-shot answers.",
)
