"""Assets of the group ``feedback``: ``feedback_examples``, ``feedback_finetune`` and ``feedback_register``
(the feedback loop, lmforge/feedback.py).  ``feedback_job`` runs them; the ``feedback_arrived`` sensor
starts it when enough new accepted feedback arrived."""

import dagster as dg

import lmforge.feedback
from assets.common import md_table
from assets.factory import stage_asset
from assets.gates import tuned_checks, tuned_results


def _finetuned(summary: dict, params, out) -> dict:
    rows = [{"model": f"current (version {summary['base_version']})", "ROUGE-L": f"{summary['current_rougeL']:.3f}"},
            {"model": "fine-tuned on feedback", "ROUGE-L": f"{summary['rougeL']:.3f}"}]
    return {"results": dg.MetadataValue.md(md_table(rows))}


feedback_examples = stage_asset(
    "feedback_examples", lmforge.feedback.run_feedback_examples,
    show=lambda summary, params, out: {"path": dg.MetadataValue.path(str(out / "examples.jsonl"))},
    checks=lambda summary, params, out: [dg.AssetCheckResult(check_name="feedback_valid", passed=summary["passed"], description=summary["check"])],
    kinds={"python", "sqlite", "great_expectations"},
    check_specs=[dg.AssetCheckSpec(name, asset="feedback_examples", blocking=True, description=d)
                 for name, d in lmforge.feedback.CHECK_NAMES.items()],
    description="Users' feedback on served answers (POST /v1/feedback, and JSONL files in feedback.inbox) as SFT examples: "
    "corrections, and answers rated at least feedback.min_rating; validated with great-expectations, failing rows quarantined.",
)

feedback_finetune = stage_asset(
    "feedback_finetune", lmforge.feedback.run_feedback_finetune, show=_finetuned,
    checks=lambda summary, params, out: tuned_results(
        summary, f"ROUGE-L {summary['rougeL']:.3f} vs {summary['current_rougeL']:.3f} (needs more than +{summary['min_improvement']:g})"),
    kinds={"python", "pytorch", "peft", "mlflow"},
    pool="training",
    check_specs=tuned_checks("feedback_finetune", "On the sft task set's held-out test part, ROUGE-L above the current aliased model's "
                             "by more than feedback.min_improvement."),
    description="The model behind models:/<registry.name>@<feedback.alias>, fine-tuned on the feedback examples, "
    "and scored against it on the sft task set's test part.",
)

feedback_register = stage_asset(
    "feedback_register", lmforge.feedback.run_feedback_register,
    show=lambda summary, params, out: {"uri": f"models:/{params.registry.name}@{summary['alias']}"},
    kinds={"python", "mlflow"},
    description="The model fine-tuned on feedback as a new registry version; the alias feedback.alias moves to it "
    "(only runs when feedback_finetune's blocking check beats_current passed).",
)
