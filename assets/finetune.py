"""Assets ``task_data`` (validated task sets), ``finetune_classifier`` and ``finetune_sft``."""

import json

import dagster as dg

import lmforge.finetune
from assets.common import code_version, md_table, overrides_config, stage_params, summary_metadata
from dagster_project.resources import ParamsResource
from lmforge.params import FinetuneParams

FinetuneConfig = overrides_config(FinetuneParams, "FinetuneConfig")
FinetuneConfig.__doc__ = "Overrides of params.yaml `finetune` for one run. Used by: task_data, finetune_classifier, finetune_sft."


@dg.asset(
    group_name="finetune",
    kinds={"python", "great_expectations"},
    code_version=code_version("task_data"),
    check_specs=[dg.AssetCheckSpec(name, asset="task_data", blocking=True, description=d) for name, d in lmforge.finetune.CHECK_NAMES.items()],
    description="The fine-tuning task sets under paths.finetune (JSONL/CSV), validated with great-expectations "
    "(blocking: enough examples, no empty field, known labels) and split train/val/test by group.",
)
def task_data(context: dg.AssetExecutionContext, config: FinetuneConfig, lmforge_params: ParamsResource):
    params = stage_params(lmforge_params.load(), "finetune", config)
    summary, failures, outcomes = lmforge.finetune.run_task_data(params)
    for line in failures:
        context.log.error(line)
    counts = [{"task": t, **{s: summary[f"{t}_{s}"] for s in lmforge.finetune.SPLITS}} for t in lmforge.finetune.TASKS]
    yield dg.MaterializeResult(metadata={**summary_metadata(summary), "splits": dg.MetadataValue.md(md_table(counts))})
    for outcome in outcomes:
        rows = summary[f"{outcome.name.split('_')[0]}_examples"]
        yield dg.AssetCheckResult(check_name=outcome.name, passed=outcome.passed, description=lmforge.finetune.describe(outcome, rows),
                                  metadata={"unexpected": outcome.unexpected})


def _results_table(summary: dict, metrics: tuple[str, ...], methods: list[str]) -> str:
    rows = [{"model": "baseline", **{m: f"{summary[f'baseline_{m}']:.3f}" for m in metrics}}]
    rows += [{"model": method, **{m: f"{summary[f'{method}_{m}']:.3f}" for m in metrics}} for method in methods]
    return md_table(rows)


@dg.asset(
    group_name="finetune",
    kinds={"python", "pytorch", "peft", "mlflow"},
    deps=["task_data", "select"],
    pool="training",
    code_version=code_version("finetune_classifier"),
    check_specs=[dg.AssetCheckSpec("beats_majority_baseline", asset="finetune_classifier", description="Test accuracy and macro-F1 above the majority class's.")],
    description="The champion with a classification head, fine-tuned (full and LoRA); accuracy and macro-F1 "
    "on the test part against the majority-class baseline.",
)
def finetune_classifier(context: dg.AssetExecutionContext, config: FinetuneConfig, lmforge_params: ParamsResource):
    params = stage_params(lmforge_params.load(), "finetune", config)
    summary = lmforge.finetune.run_finetune_classifier(params, dagster_run_id=context.run_id, report=context.log.info)
    yield dg.MaterializeResult(metadata={
        **summary_metadata(summary),
        "results": dg.MetadataValue.md(_results_table(summary, ("accuracy", "macro_f1"), params.finetune.methods)),
        "path": dg.MetadataValue.path(str(params.stage_dir("finetune_classifier"))),
        "mlflow_run_id": summary["mlflow_run_id"],
    })
    yield dg.AssetCheckResult(check_name="beats_majority_baseline", passed=summary["beats_baseline"], severity=dg.AssetCheckSeverity.WARN,
                              description=f"{summary['best_method']}: accuracy {summary['accuracy']:.3f} vs {summary['baseline_accuracy']:.3f}, "
                              f"macro-F1 {summary['macro_f1']:.3f} vs {summary['baseline_macro_f1']:.3f}")


@dg.asset(
    group_name="finetune",
    kinds={"python", "pytorch", "peft", "mlflow"},
    deps=["task_data", "select"],
    pool="training",
    code_version=code_version("finetune_sft"),
    check_specs=[dg.AssetCheckSpec("beats_zero_shot", asset="finetune_sft", description="Test ROUGE-1/2/L above the pretrained model's zero-shot answers.")],
    description="Supervised fine-tuning of the (causal) champion on prompt/response pairs (full and LoRA); "
    "ROUGE-1/2/L on the test part against the pretrained model's zero-shot answers.",
)
def finetune_sft(context: dg.AssetExecutionContext, config: FinetuneConfig, lmforge_params: ParamsResource):
    params = stage_params(lmforge_params.load(), "finetune", config)
    summary = lmforge.finetune.run_finetune_sft(params, dagster_run_id=context.run_id, report=context.log.info)
    out = params.stage_dir("finetune_sft")
    examples = json.loads((out / "examples.json").read_text())
    yield dg.MaterializeResult(metadata={
        **summary_metadata(summary),
        "results": dg.MetadataValue.md(_results_table(summary, ("rouge1", "rouge2", "rougeL"), params.finetune.methods)),
        "examples": dg.MetadataValue.md(md_table([{k: e[k] for k in ("method", "reference", "zero_shot", "fine_tuned")} for e in examples])),
        "path": dg.MetadataValue.path(str(out)),
        "mlflow_run_id": summary["mlflow_run_id"],
    })
    yield dg.AssetCheckResult(check_name="beats_zero_shot", passed=summary["beats_baseline"], severity=dg.AssetCheckSeverity.WARN,
                              description=f"{summary['best_method']}: ROUGE-L {summary['rougeL']:.3f} vs zero-shot {summary['baseline_rougeL']:.3f}")
