"""Assets of the group ``preference``: ``feedback_preferences``, ``preference_tune`` and
``preference_register`` (preference tuning, lmforge/preference.py).  ``preference_job`` runs them; the
``feedback_arrived`` sensor starts it when enough new preference pairs arrived."""

import dagster as dg

import lmforge.preference
from assets.common import md_table
from assets.factory import stage_asset
from assets.gates import tuned_checks, tuned_results


def _tuned(summary: dict, params, out) -> dict:
    rows = [{"model": f"current (version {summary['base_version']})", "held-out preference accuracy": f"{summary['current_accuracy']:.0%}",
             "mean log-prob margin": f"{summary['current_margin']:.2f}"},
            {"model": f"DPO ({summary['loss_type']}, beta {summary['beta']:g})", "held-out preference accuracy": f"{summary['accuracy']:.0%}",
             "mean log-prob margin": f"{summary['margin']:.2f}"}]
    return {"results": dg.MetadataValue.md(md_table(rows))}


feedback_preferences = stage_asset(
    "feedback_preferences", lmforge.preference.run_feedback_preferences,
    show=lambda summary, params, out: {"path": dg.MetadataValue.path(str(out / "pairs.jsonl"))},
    checks=lambda summary, params, out: [dg.AssetCheckResult(check_name="preferences_valid", passed=summary["passed"], description=summary["check"])],
    kinds={"python", "sqlite", "great_expectations"},
    check_specs=[dg.AssetCheckSpec(name, asset="feedback_preferences", blocking=True, description=d)
                 for name, d in lmforge.preference.CHECK_NAMES.items()],
    description="Chosen/rejected answer pairs: a correction over the answer it corrects, a well- over a poorly-rated answer to one "
    "prompt (lmforge serve's feedback store and feedback.inbox), and your own files (preference.files); validated with "
    "great-expectations, failing rows quarantined, a hashed share of the prompts held out.",
)

preference_tune = stage_asset(
    "preference_tune", lmforge.preference.run_preference_tune, show=_tuned,
    checks=lambda summary, params, out: tuned_results(
        summary, f"held-out preference accuracy {summary['accuracy']:.0%} vs {summary['current_accuracy']:.0%} "
        f"(needs more than +{summary['min_improvement']:g})"),
    kinds={"python", "pytorch", "trl", "mlflow"},
    pool="training",
    check_specs=tuned_checks("preference_tune", "On the held-out pairs, the tuned model prefers the chosen answer more often than the "
                             "current aliased model does, by more than preference.min_improvement."),
    description="The model behind models:/<registry.name>@<feedback.alias>, tuned with DPO (TRL) on the preference pairs, "
    "and its held-out preference accuracy against that model's.",
)

preference_register = stage_asset(
    "preference_register", lmforge.preference.run_preference_register,
    show=lambda summary, params, out: {"uri": f"models:/{params.registry.name}@{summary['alias']}"},
    kinds={"python", "mlflow"},
    description="The preference-tuned model as a new registry version (kind preference, its base version and the pairs' hash "
    "in its tags); the alias feedback.alias moves to it (only after preference_tune's blocking checks passed).",
)
