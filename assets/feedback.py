"""Assets of the group ``feedback``: ``feedback_examples``, ``feedback_finetune`` and ``feedback_register``
(the feedback loop, lmforge/feedback.py).  ``feedback_job`` runs them; the ``feedback_arrived`` sensor
starts it when enough new accepted feedback arrived."""

import dagster as dg

import lmforge.feedback
from assets.common import declared, materialized, md_table, summary_metadata
from assets.gates import tuned_checks, tuned_results
from assets.resources import ParamsResource


@dg.asset(
    **declared("feedback_examples"),
    kinds={"python", "sqlite", "great_expectations"},
    check_specs=[dg.AssetCheckSpec(name, asset="feedback_examples", blocking=True, description=d)
                 for name, d in lmforge.feedback.CHECK_NAMES.items()],
    description="Users' feedback on served answers (POST /v1/feedback, and JSONL files in feedback.inbox) as SFT examples: "
    "corrections, and answers rated at least feedback.min_rating; validated with great-expectations, failing rows quarantined.",
)
def feedback_examples(context: dg.AssetExecutionContext, lmforge_params: ParamsResource):
    params = lmforge_params.load()
    summary = lmforge.feedback.run_feedback_examples(params)
    context.log.info(f"feedback_examples: {summary['check']}")
    yield materialized("feedback_examples", params, {
        **summary_metadata(summary),
        "path": dg.MetadataValue.path(str(params.stage_dir("feedback_examples") / "examples.jsonl")),
    })
    yield dg.AssetCheckResult(check_name="feedback_valid", passed=summary["passed"], description=summary["check"])


@dg.asset(
    **declared("feedback_finetune"),
    kinds={"python", "pytorch", "peft", "mlflow"},
    pool="training",
    check_specs=tuned_checks("feedback_finetune", "On the sft task set's held-out test part, ROUGE-L above the current aliased model's "
                             "by more than feedback.min_improvement."),
    description="The model behind models:/<registry.name>@<feedback.alias>, fine-tuned on the feedback examples, "
    "and scored against it on the sft task set's test part.",
)
def feedback_finetune(context: dg.AssetExecutionContext, lmforge_params: ParamsResource):
    params = lmforge_params.load()
    summary = lmforge.feedback.run_feedback_finetune(params, dagster_run_id=context.run_id, report=context.log.info)
    rows = [{"model": f"current (version {summary['base_version']})", "ROUGE-L": f"{summary['current_rougeL']:.3f}"},
            {"model": "fine-tuned on feedback", "ROUGE-L": f"{summary['rougeL']:.3f}"}]
    yield materialized("feedback_finetune", params, {**summary_metadata(summary), "results": dg.MetadataValue.md(md_table(rows)),
                                                     "mlflow_run_id": summary["mlflow_run_id"]})
    yield from tuned_results(summary, f"ROUGE-L {summary['rougeL']:.3f} vs {summary['current_rougeL']:.3f} (needs more than +{summary['min_improvement']:g})")


@dg.asset(
    **declared("feedback_register"),
    kinds={"python", "mlflow"},
    description="The model fine-tuned on feedback as a new registry version; the alias feedback.alias moves to it "
    "(only runs when feedback_finetune's blocking check beats_current passed).",
)
def feedback_register(context: dg.AssetExecutionContext, lmforge_params: ParamsResource) -> dg.MaterializeResult:
    params = lmforge_params.load()
    summary = lmforge.feedback.run_feedback_register(params, dagster_run_id=context.run_id, report=context.log.info)
    return materialized("feedback_register", params, {**summary_metadata(summary),
                                                      "uri": f"models:/{params.registry.name}@{summary['alias']}"})
