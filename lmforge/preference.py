"""Preference tuning: what users prefer → chosen/rejected pairs → DPO → a new registry version that
takes the alias only if it ranks held-out pairs better and keeps its benchmarks.

A rating says an answer was good or bad; a correction says which of two answers is *better*, which
is what preference tuning learns from (SmolLM2-Instruct itself was tuned with DPO).  Stages (group
``preference``, run by ``preference_job``, which the ``feedback_arrived`` sensor starts when
``preference.min_new_pairs`` new pairs arrived):

- ``feedback_preferences``: pairs from the feedback store and inbox (as ``feedback_examples`` reads
  them: the latest feedback per request) and from your own files (``preference.files``):
  a correction is preferred to the answer it corrects; for one prompt, an answer rated
  ``feedback.min_rating`` or higher is preferred to one rated ``preference.max_rejected_rating`` or
  lower (paired in the order they came; the rest wait for a counterpart); a file row gives
  ``prompt, chosen, rejected`` or chat messages.  Validated with great-expectations (texts present and
  within ``feedback.max_chars``, chosen ≠ rejected, one pair per id); failing rows are quarantined
  with the reason.  Every row read is accounted for: in a pair, quarantined, not used, or superseded.
  A hash of each prompt keeps ``preference.heldout_fraction`` of the pairs out of training.
- ``preference_tune``: DPO (``models.preference``, TRL) from ``models:/<registry.name>@<feedback.alias>``;
  its blocking checks: the held-out preference accuracy rose by more than ``min_improvement``, and
  no benchmark task regressed beyond ``benchmarks.max_regression``.
- ``preference_register``: behind both checks, a registry version of kind ``preference`` (its base
  version and the pairs' hash in its tags), and the alias moves to it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.artifacts import fresh_dir, read_jsonl, read_summary, write_jsonl, write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.feedback import gated_summary, read_feedback, register_tuned, validate_rows
from lmforge.feedback_store import RATINGS
from lmforge.params import REPO_ROOT, LmforgeError, Params
from lmforge.stages import Stage


FEEDBACK_PREFERENCES = Stage("feedback_preferences", group="preference", params=("feedback", "preference"), in_dvc=False, note="the preference loop reads the live feedback store (`lmforge serve` writes it), which DVC cannot version: its sensor runs it")
PREFERENCE_TUNE = Stage("preference_tune", group="preference", params=("feedback", "preference", "finetune", "registry", "benchmarks"),
                        reads=("feedback_preferences",), in_dvc=False, note="the preference loop reads the live feedback store (`lmforge serve` writes it), which DVC cannot version: its sensor runs it")
PREFERENCE_REGISTER = Stage("preference_register", group="preference", params=("feedback", "preference", "registry"), reads=("preference_tune",),
                            in_dvc=False, note="the preference loop reads the live feedback store (`lmforge serve` writes it), which DVC cannot version: its sensor runs it")


#: Check name → what it guarantees (the Dagster check specs are declared from this).
CHECK_NAMES = {
    "preferences_valid": "at most feedback.max_rejection_ratio of the rows quarantined, at least preference.min_pairs "
                         "training pairs and one held-out pair",
}
COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "differs")
TEXTS = ("prompt", "chosen", "rejected")


@dataclass
class Collected:
    """The pairs every source gives, before validation, and what became of every row read."""

    pairs: list[dict[str, Any]]  # pair_id, prompt, chosen, rejected, source, rows (rows read that made it: 1 or 2)
    quarantined: list[dict[str, Any]]  # pair_id, record, reason, rows
    not_used: int  # rows that give no pair: a middling rating, a rating without a counterpart, a correction of nothing
    superseded: int  # earlier feedback on a request rated again
    rows: int  # every row read

    @property
    def ids(self) -> list[str]:
        return [p["pair_id"] for p in self.pairs]


def _pair(pair_id: str, source: str, prompt: Any, chosen: Any, rejected: Any, rows: int = 1) -> dict[str, Any]:
    return {"pair_id": pair_id, "source": source, "prompt": prompt, "chosen": chosen, "rejected": rejected, "rows": rows,
            "differs": not (isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() == rejected.strip())}


def _from_feedback(params: Params) -> Collected:
    """Corrections against the answers they correct; well- against poorly-rated answers to one prompt."""
    read = read_feedback(params)
    quarantined = [{**q, "pair_id": q["example_id"], "rows": 1} for q in read.quarantined]
    pairs: list[dict[str, Any]] = []
    good: dict[str, list[dict]] = defaultdict(list)
    poor: dict[str, list[dict]] = defaultdict(list)
    not_used = 0
    for item in read.items:
        if item["rating"] not in RATINGS:
            quarantined.append({"pair_id": item["example_id"], "record": item, "reason": f"bad_rating: {item['rating']!r} (1-5)", "rows": 1})
        elif item["correction"]:
            if isinstance(item["answer"], str) and item["answer"].strip():
                pairs.append(_pair(item["example_id"], "correction", item["prompt"], item["correction"], item["answer"]))
            else:
                not_used += 1  # a correction of no recorded answer: an SFT example, not a preference
        elif item["rating"] >= params.feedback.min_rating:
            good[str(item["prompt"])].append(item)
        elif item["rating"] <= params.preference.max_rejected_rating:
            poor[str(item["prompt"])].append(item)
        else:
            not_used += 1
    for prompt in dict.fromkeys([*good, *poor]):  # first-seen order
        matched = min(len(good[prompt]), len(poor[prompt]))
        for better, worse in zip(good[prompt], poor[prompt]):
            pairs.append(_pair(f"{better['example_id']}>{worse['example_id']}", "ratings", better["prompt"], better["answer"], worse["answer"], rows=2))
        not_used += len(good[prompt]) + len(poor[prompt]) - 2 * matched
    return Collected(pairs, quarantined, not_used, read.superseded, read.feedback)


def _text(value: Any, role: str) -> tuple[Any, list[dict] | None]:
    """A pair field as (text, conversation before it): plain text, or chat messages whose last turn has ``role``."""
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
            raise ValueError("messages must be a non-empty list of {role, content}")
        if value[-1].get("role") != role:
            raise ValueError(f"the last message must be the {role}'s")
        return value[-1]["content"], value[:-1]
    return value, None


def parse_pair(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a file row: ``{prompt, chosen, rejected}`` as text, or TRL's
    conversational form (``chosen``/``rejected`` message lists ending in the assistant's answer, the
    prompt as messages or as the turns they share).  A conversation's prompt is its last user turn
    (lmforge tunes single-turn answers, as the feedback loop does)."""
    if "chosen" not in record or "rejected" not in record:
        raise ValueError("needs chosen and rejected (and prompt, unless they are conversations)")
    chosen, chosen_context = _text(record["chosen"], "assistant")
    rejected, rejected_context = _text(record["rejected"], "assistant")
    prompt = record.get("prompt")
    if prompt is None:
        prompt = chosen_context
        if not prompt or prompt != rejected_context:
            raise ValueError("no prompt: give one, or conversations that share their turns before the answer")
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError("the prompt's messages hold no user turn")
        prompt = users[-1]
    return prompt, chosen, rejected


def _from_files(params: Params) -> tuple[Collected, list[str]]:
    """The rows of ``preference.files``, and the patterns that matched no file."""
    pairs, quarantined, rows, unmatched = [], [], 0, []
    for pattern in params.preference.files:
        paths = sorted(glob.glob(str(params.path(pattern)), recursive=True))
        if not paths:
            unmatched.append(pattern)
        for path in map(Path, paths):
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                rows += 1
                where = f"file:{path.name}:{number}"
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    quarantined.append({"pair_id": where, "record": line[:500], "reason": f"not_json: {exc}", "rows": 1})
                    continue
                try:
                    pairs.append(_pair(where, "file", *parse_pair(record)))
                except ValueError as exc:
                    quarantined.append({"pair_id": where, "record": record, "reason": f"not_a_pair: {exc}", "rows": 1})
    return Collected(pairs, quarantined, 0, 0, rows), unmatched


def collect(params: Params) -> tuple[Collected, list[str]]:
    """Every candidate pair of the feedback and the files (the sensor counts these; the asset
    validates them), and the file patterns that matched nothing."""
    feedback, (files, unmatched) = _from_feedback(params), _from_files(params)
    return Collected(feedback.pairs + files.pairs, feedback.quarantined + files.quarantined, feedback.not_used,
                     feedback.superseded, feedback.rows + files.rows), unmatched


def expectations(params: Params) -> list[tuple[str, str, Any]]:
    """The great-expectations checks each pair must pass (a failing row is quarantined)."""
    import great_expectations as gx

    E = gx.expectations
    n = params.feedback.max_chars
    checks = []
    for column in TEXTS:
        checks += [(f"{column}_present", f"a {column}", E.ExpectColumnValuesToNotBeNull(column=column)),
                   (f"{column}_length", f"a {column} of 1 to {n} characters", E.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1, max_value=n))]
    checks += [("answers_differ", "chosen and rejected differ", E.ExpectColumnValuesToBeInSet(column="differs", value_set=[True])),
               ("unique_id", "one pair per id", E.ExpectColumnValuesToBeUnique(column="pair_id"))]
    return checks


def is_heldout(prompt: str, fraction: float) -> bool:
    """Whether a prompt's pairs are held out: a hash of the prompt, stable when pairs are added."""
    from lmforge.finetune import split_of

    return split_of(prompt, 0.0, fraction) == "test"


def pairs_sha256(pairs: list[dict[str, Any]]) -> str:
    """The content of the pairs (not their ids): the same pairs from another source hash the same."""
    lines = sorted(json.dumps([p["prompt"], p["chosen"], p["rejected"]], ensure_ascii=False) for p in pairs)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def run_feedback_preferences(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Collect, validate (quarantining failing rows), split and write the pairs; the summary says
    whether the blocking check passed."""
    collected, unmatched = collect(params)
    kept, failed = validate_rows("preferences", collected.pairs, COLUMNS, TEXTS, expectations(params))
    quarantined = collected.quarantined + [{"pair_id": p["pair_id"], "record": p, "reason": reason, "rows": p["rows"]} for p, reason in failed]
    records = [{k: p[k] for k in ("pair_id", "source", "prompt", "chosen", "rejected")} for p in kept]
    held = [is_heldout(p["prompt"], params.preference.heldout_fraction) for p in records]
    heldout = [p for p, h in zip(records, held) if h]
    train = [p for p, h in zip(records, held) if not h]
    rows_in_pairs, rows_quarantined = sum(p["rows"] for p in kept), sum(q["rows"] for q in quarantined)
    judged = rows_in_pairs + rows_quarantined
    ratio = rows_quarantined / judged if judged else 0.0
    limit, needed = params.feedback.max_rejection_ratio, params.preference.min_pairs
    problems = ([f"{ratio:.0%} of the rows quarantined (at most {limit:.0%})"] if ratio > limit else []) + \
               ([f"{len(train)} training pairs (at least {needed})"] if len(train) < needed else []) + \
               (["no held-out pair (raise preference.heldout_fraction or add pairs)"] if not heldout else [])
    out = params.stage_dir("feedback_preferences")
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("pairs.jsonl", train), ("heldout.jsonl", heldout), ("quarantine.jsonl", quarantined)):
        write_jsonl(out / name, part)
    summary = {"rows": collected.rows, "pairs": len(records), "train_pairs": len(train), "heldout_pairs": len(heldout),
               "rows_in_pairs": rows_in_pairs, "quarantined": len(quarantined), "rows_quarantined": rows_quarantined,
               "not_used": collected.not_used, "superseded": collected.superseded, "rejection_ratio": ratio,
               **{f"from_{s}": sum(p["source"] == s for p in records) for s in ("correction", "ratings", "file")},
               "unmatched_files": unmatched, "pairs_sha256": pairs_sha256(records), "passed": not problems,
               "check": "; ".join(problems) if problems else f"{len(train)} training and {len(heldout)} held-out pairs, "
               f"{len(quarantined)} quarantined ({ratio:.0%}, at most {limit:.0%})"}
    # every row read is accounted for: in a pair, quarantined, not used, or superseded by a later rating
    assert rows_in_pairs + rows_quarantined + collected.not_used + collected.superseded == collected.rows, summary
    write_params(out, params.preference)
    write_summary(out, summary)
    ctx.log(f"feedback_preferences: {summary['check']}")
    return summary


def _base_ref(params: Params) -> str:
    return f"models:/{params.registry.name}@{params.feedback.alias}"


def run_preference_tune(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """DPO from the aliased model on the training pairs; its held-out preference accuracy against the
    current model's (``beats_current``) and its benchmarks against the current model's
    (``kept_benchmarks``)."""
    import torch
    from mlflow import MlflowClient

    from lmforge.benchmarks import score_and_gate, score_model
    from lmforge.registry import current
    from lmforge.tracking import log_numbers, tracked_run, tracking_uri
    from models.finetune import export
    from models.generation import resolve
    from models.loading import load_dir
    from models.precision import resolve as resolve_precision
    from models.preference import DpoSettings, dpo, preference_accuracy

    say = ctx.log
    p = params.preference
    pairs_dir = params.stage_dir("feedback_preferences")
    if not (pairs_dir / "summary.json").exists():
        raise LmforgeError("preference_tune: no pairs yet: materialize 'feedback_preferences' first")
    train, heldout = read_jsonl(pairs_dir / "pairs.jsonl"), read_jsonl(pairs_dir / "heldout.jsonl")
    if not train or not heldout:
        raise LmforgeError(f"preference_tune: {len(train)} training and {len(heldout)} held-out pairs: both are needed "
                           "(feedback_preferences' check preferences_valid says why)")
    uri = tracking_uri(params)
    base = current(MlflowClient(uri, registry_uri=uri), params.registry.name, params.feedback.alias)
    if base is None:
        raise LmforgeError(f"preference_tune: no registered model {_base_ref(params)}: materialize 'register' first")
    source = resolve(_base_ref(params), uri)
    model, tokenizer, objective = load_dir(source)
    if objective != "causal" or not isinstance(model, torch.nn.Module):
        raise LmforgeError(f"preference_tune: {_base_ref(params)} is a {objective} {type(model).__name__}; DPO tunes causal PyTorch models")
    reference = None
    if p.reference:
        reference = load_dir(resolve(p.reference, uri))[0]
    before = preference_accuracy(model, tokenizer, heldout, p.max_length)
    say(f"preference_tune: {_base_ref(params)} (version {base.version}) prefers the chosen answer of {before['accuracy']:.0%} of "
        f"{len(heldout)} held-out pairs; DPO ({p.loss_type}, beta {p.beta}, {p.method}) on {len(train)} pairs")
    out = params.stage_dir("preference_tune")
    fresh_dir(out)
    started = time.perf_counter()
    settings = DpoSettings(beta=p.beta, loss_type=p.loss_type, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, max_length=p.max_length,
                           seed=p.seed, precision=resolve_precision(params.finetune.train.precision, model.device))
    model, history = dpo(model, tokenizer, train, settings, out / "trainer", lora=params.finetune.lora if p.method == "lora" else None,
                         ref_model=reference, log=say)
    seconds = time.perf_counter() - started
    after = preference_accuracy(model, tokenizer, heldout, p.max_length)
    export(model, tokenizer, out / "model", lora=p.method == "lora", root=REPO_ROOT)
    shutil.rmtree(out / "trainer", ignore_errors=True)  # TRL's scratch files: nothing in them is read again
    report_as = lambda msg: say(f"preference_tune: {msg}")  # noqa: E731
    verdict = score_and_gate(params, out / "model" / "hf", score_model(params, source, report_as), report_as)["gate"]
    beats = after["accuracy"] > before["accuracy"] + p.min_improvement
    summary = {"base": _base_ref(params), "base_version": str(base.version), "method": p.method, "loss_type": p.loss_type, "beta": p.beta,
               "reference": p.reference or "the base model", "train_pairs": len(train), "heldout_pairs": len(heldout),
               "current_accuracy": before["accuracy"], "accuracy": after["accuracy"], "current_margin": before["mean_margin"],
               "margin": after["mean_margin"], "improvement": after["accuracy"] - before["accuracy"], "min_improvement": p.min_improvement,
               "beats_current": beats, "steps": len(history), "final_loss": history[-1]["loss"] if history else None,
               "precision": settings.precision, "seconds": seconds, "pairs_sha256": read_summary(pairs_dir)["pairs_sha256"],
               "kept_benchmarks": verdict["passed"], "benchmark_gate": verdict}
    with tracked_run(params, "preference tune", {"stage": "preference_tune", "base_version": str(base.version),
                                                 **ctx.tags(), "pairs_sha256": summary["pairs_sha256"]}) as (client, run_id):
        for row in history:  # the DPO curve: loss, reward margin and accuracy per step
            for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
                if key in row:
                    client.log_metric(run_id, key.replace("/", "_"), float(row[key]), step=int(row["step"]))
        log_numbers(client, run_id, {k: summary[k] for k in ("current_accuracy", "accuracy", "current_margin", "margin", "improvement",
                                                             "train_pairs", "heldout_pairs")})
        for key in ("method", "loss_type", "beta", "reference"):
            client.log_param(run_id, key, summary[key])
        for key in ("lr", "epochs", "batch_size", "max_length", "seed"):
            client.log_param(run_id, key, getattr(p, key))
    summary["mlflow_run_id"] = run_id
    say(f"preference_tune: held-out preference accuracy {after['accuracy']:.0%} vs {before['accuracy']:.0%} now: "
        + ("better" if beats else "not better: the alias stays"))
    write_params(out, p)
    write_summary(out, summary)
    return summary


def run_preference_register(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Register the preference-tuned model and move the alias to it (only reached when ``beats_current`` passed)."""
    tuned = gated_summary(params, "preference_tune", "preference_register",
                          "the tuned model does not rank held-out pairs better than the current one")
    tags = {"kind": "preference", "preference_accuracy": str(tuned["accuracy"]), "base_preference_accuracy": str(tuned["current_accuracy"]),
            "preference_pairs": str(tuned["train_pairs"]), "preference_pairs_sha256": tuned["pairs_sha256"], "dpo_loss": tuned["loss_type"],
            "dpo_beta": str(tuned["beta"])}
    why = f"held-out preference accuracy {tuned['accuracy']:.0%} vs {tuned['current_accuracy']:.0%}"
    return register_tuned(params, tuned, "preference_tune", "preference_register", tags, why, ctx)
