"""The feedback loop: users' ratings and corrections of served answers → SFT examples → fine-tuning →
a new registry version that takes the alias only if it beats the current one.

Stages (group ``feedback``, run by ``feedback_job``, which the ``feedback_arrived`` sensor starts when
``feedback.min_new_examples`` new accepted examples arrived):

- ``feedback_examples``: every feedback of the store (``POST /v1/feedback`` on ``lmforge serve``) and
  of the JSONL files in ``feedback.inbox`` (bulk), joined with the request it rates.  A feedback with a
  correction becomes the example (prompt → corrected answer); one rated ``feedback.min_rating`` or
  higher without a correction keeps the model's own answer; a lower rating without a correction
  teaches nothing and is counted, not used.  The examples are validated with great-expectations
  (text present and within ``feedback.max_chars``, rating 1–5, one example per id); a failing row
  goes to ``quarantine.jsonl`` with the expectation it broke, and the blocking check stops the loop
  when more than ``feedback.max_rejection_ratio`` of the feedback was quarantined (a broken client or
  spam should not train the model).  When a request was rated twice, the latest feedback counts.
- ``feedback_finetune``: the model behind ``models:/<registry.name>@<feedback.alias>`` fine-tuned
  (``feedback.method``) on the examples (and the sft task set's train part, ``include_task_train``),
  then both it and the current model answer the sft task set's held-out test part, scored with
  ROUGE-L as ``finetune_sft`` scores.  The blocking check ``beats_current`` passes only when the new
  model is better by more than ``feedback.min_improvement``.
- ``feedback_register``: behind that check: the new model becomes a registry version (kind
  ``feedback``, tagged with its base version and both scores) and the alias moves to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.artifacts import read_summary, write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.feedback_store import RATINGS, FeedbackStore
from lmforge.params import REPO_ROOT, LmforgeError, Params
from lmforge.stages import Stage


FEEDBACK_EXAMPLES = Stage("feedback_examples", group="feedback", params=("feedback",), in_dvc=False,
                          note="the feedback loop reads the live feedback store (`lmforge serve` writes it), which DVC cannot version: its sensor runs it")
FEEDBACK_FINETUNE = Stage("feedback_finetune", group="feedback", params=("feedback", "finetune", "registry", "evaluate.sampling", "benchmarks"),
                          reads=("feedback_examples/examples.jsonl", "task_data/sft"), in_dvc=False, note="the feedback loop reads the live feedback store (`lmforge serve` writes it), which DVC cannot version: its sensor runs it")
FEEDBACK_REGISTER = Stage("feedback_register", group="feedback", params=("feedback", "registry"), reads=("feedback_finetune",), in_dvc=False,
                          note="the feedback loop reads the live feedback store (`lmforge serve` writes it), which DVC cannot version: its sensor runs it")


#: Check name → what it guarantees (the Dagster check specs are declared from this).
CHECK_NAMES = {
    "feedback_valid": "at most feedback.max_rejection_ratio of the feedback quarantined, and at least one example",
}
COLUMNS = ("example_id", "prompt", "response", "rating")


@dataclass
class Collected:
    """What the store and the inbox hold, before validation."""

    examples: list[dict[str, Any]]  # example_id, prompt, response, rating, source, request_id
    quarantined: list[dict[str, Any]]  # record, reason
    not_used: int  # low ratings without a correction
    superseded: int  # earlier feedback on a request rated again
    feedback: int  # every feedback read

    @property
    def ids(self) -> list[str]:
        return [e["example_id"] for e in self.examples]


def _prompt_of(request: dict[str, Any]) -> str:
    """What the user asked: a completion's prompt, or a chat's last user message (the example is one turn)."""
    if request["endpoint"] != "chat.completions":
        return request["prompt"]
    messages = json.loads(request["prompt"])
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def _example(example_id: str, source: str, prompt: str, answer: str | None, rating: Any, correction: str | None, min_rating: int,
             request_id: str | None = None) -> dict[str, Any] | None:
    """The SFT example a feedback gives, or None when it teaches nothing (a low rating, no correction)."""
    if correction:
        response = correction
    elif isinstance(rating, int) and rating >= min_rating:
        response = answer
    else:
        return None
    return {"example_id": example_id, "prompt": prompt, "response": response, "rating": rating, "source": source, "request_id": request_id}


@dataclass
class FeedbackRead:
    """Every feedback of the store and the inbox, the latest per request: what the users said, not yet
    turned into examples or preference pairs."""

    items: list[dict[str, Any]]  # example_id, source, prompt, answer, rating, correction
    quarantined: list[dict[str, Any]]  # malformed inbox lines and feedback on unknown requests
    superseded: int  # earlier feedback on a request rated again
    feedback: int  # every feedback read


def read_feedback(params: Params) -> FeedbackRead:
    """The store's feedback joined with the requests it rates, and the inbox's JSONL lines.  Malformed
    inbox lines are quarantined here, with the file and line."""
    f = params.feedback
    store = FeedbackStore(params.path(f.store))
    latest: dict[str, dict[str, Any]] = {}  # request id → its latest feedback
    quarantined: list[dict[str, Any]] = []
    total = superseded = 0
    for row in store.feedback_with_requests():
        total += 1
        superseded += row["request_id"] in latest
        latest[row["request_id"]] = {"example_id": f"store:{row['feedback_id']}", "source": "api", "prompt": _prompt_of(row),
                                     "answer": row["completion"], "rating": row["rating"], "correction": row["correction"]}
    inbox_examples = []
    inbox = params.path(f.inbox)
    for path in sorted(inbox.glob("*.jsonl")) if inbox.is_dir() else []:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            total += 1
            where = f"inbox:{path.name}:{number}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                quarantined.append({"example_id": where, "record": line[:500], "reason": f"not_json: {exc}"})
                continue
            request_id = record.get("request_id")
            if request_id:
                request = store.request(str(request_id))
                if request is None:
                    quarantined.append({"example_id": where, "record": record, "reason": "unknown_request: no such request was served"})
                    continue
                superseded += request_id in latest
                latest[request_id] = {"example_id": where, "source": "inbox", "prompt": _prompt_of(request), "answer": request["completion"],
                                      "rating": record.get("rating"), "correction": record.get("correction")}
            elif "prompt" in record:
                inbox_examples.append({"example_id": where, "source": "inbox", "prompt": record.get("prompt"), "answer": record.get("answer"),
                                       "rating": record.get("rating"), "correction": record.get("correction")})
            else:
                quarantined.append({"example_id": where, "record": record, "reason": "no_prompt: needs request_id, or prompt (and answer or correction)"})
    return FeedbackRead([*latest.values(), *inbox_examples], quarantined, superseded, total)


def collect(params: Params) -> Collected:
    """Every feedback of the store and the inbox as candidate examples (the sensor counts these; the
    asset validates them)."""
    read = read_feedback(params)
    quarantined = list(read.quarantined)
    examples, not_used = [], 0
    for item in read.items:
        if item["rating"] not in RATINGS:  # also a rating that is not an integer: the example could not be judged
            quarantined.append({"example_id": item["example_id"], "record": item, "reason": f"bad_rating: {item['rating']!r} (1-5)"})
            continue
        example = _example(item["example_id"], item["source"], item["prompt"], item["answer"], item["rating"], item["correction"],
                           params.feedback.min_rating)
        if example is None:
            not_used += 1
        else:
            examples.append(example)
    return Collected(examples, quarantined, not_used, read.superseded, read.feedback)


def expectations(params: Params) -> list[tuple[str, str, Any]]:
    """The great-expectations checks each example must pass (a failing row is quarantined)."""
    import great_expectations as gx

    E = gx.expectations
    n = params.feedback.max_chars
    checks = []
    for column in ("prompt", "response"):
        checks += [(f"{column}_present", f"a {column}", E.ExpectColumnValuesToNotBeNull(column=column)),
                   (f"{column}_length", f"a {column} of 1 to {n} characters", E.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1, max_value=n))]
    checks += [("rating_range", "a rating from 1 to 5", E.ExpectColumnValuesToBeBetween(column="rating", min_value=1, max_value=5)),
               ("unique_id", "one example per id", E.ExpectColumnValuesToBeUnique(column="example_id"))]
    return checks


def run_feedback_examples(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Collect, validate (quarantining failing rows) and write the examples; the summary says whether
    the blocking check passed."""
    collected = collect(params)
    kept, failed = validate_rows("feedback", collected.examples, COLUMNS, ("prompt", "response"), expectations(params))
    quarantined = collected.quarantined + [{"example_id": e["example_id"], "record": e, "reason": reason} for e, reason in failed]
    judged = len(kept) + len(quarantined)
    ratio = len(quarantined) / judged if judged else 0.0
    limit = params.feedback.max_rejection_ratio
    passed = bool(kept) and ratio <= limit
    out = params.stage_dir("feedback_examples")
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "examples.jsonl", kept)
    _write_jsonl(out / "quarantine.jsonl", quarantined)
    summary = {"feedback": collected.feedback, "examples": len(kept), "quarantined": len(quarantined), "not_used": collected.not_used,
               "superseded": collected.superseded, "rejection_ratio": ratio, "passed": passed,
               "from_api": sum(e["source"] == "api" for e in kept), "from_inbox": sum(e["source"] == "inbox" for e in kept),
               "examples_sha256": hashlib.sha256("\n".join(sorted(e["example_id"] for e in kept)).encode()).hexdigest(),
               "check": f"{len(kept)} examples, {len(quarantined)} quarantined ({ratio:.0%}, at most {limit:.0%})" if kept
               else "no accepted example"}
    # every feedback read is accounted for: used, quarantined, a low rating without correction, or superseded
    assert summary["examples"] + summary["quarantined"] + summary["not_used"] + summary["superseded"] == summary["feedback"], summary
    write_params(out, params.feedback)
    write_summary(out, summary)
    ctx.log(f"feedback_examples: {summary['check']}")
    return summary


def validate_rows(name: str, rows: list[dict[str, Any]], columns: tuple[str, ...], texts: tuple[str, ...],
                  checks: list[tuple[str, str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Run great-expectations ``checks`` over ``rows`` (their ``columns``; blank or non-string ``texts``
    read as missing): the rows that pass every check, and each failing row with the checks it broke."""
    import pandas as pd

    from lmforge.validation import validate_frame

    frame = pd.DataFrame([{k: r[k] for k in columns} for r in rows], columns=list(columns))
    for column in texts:
        frame[column] = frame[column].map(lambda v: v if isinstance(v, str) and v.strip() else None)
    failing: dict[int, list[str]] = {}
    for outcome in validate_frame(name, frame, checks, result_format="COMPLETE") if len(frame) else []:
        for i in outcome.rows:
            failing.setdefault(i, []).append(outcome.name)
    return ([r for i, r in enumerate(rows) if i not in failing],
            [(r, "failed: " + ", ".join(failing[i])) for i, r in enumerate(rows) if i in failing])


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in rows), encoding="utf-8")


def _base_ref(params: Params) -> str:
    return f"models:/{params.registry.name}@{params.feedback.alias}"


def run_feedback_finetune(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Fine-tune the aliased model on the feedback examples; score it and the current model on the
    sft task set's test part (``beats_current`` in the summary) and on the benchmarks, item by item
    (``kept_benchmarks``: no task lost more than ``benchmarks.max_regression`` points)."""
    from mlflow import MlflowClient

    from lmforge.artifacts import fresh_dir, read_jsonl
    from lmforge.finetune import load_task, sft_answers
    from lmforge.registry import current
    from lmforge.tracking import tracked_run, tracking_uri
    from models.finetune import encode_sft, export, fit, mean_loss, rouge, sft_prompt, with_lora
    from models.generation import resolve
    from models.loading import load_dir

    say = ctx.log
    f, settings, task = params.feedback, params.finetune.train, params.finetune.sft
    examples = read_jsonl(params.stage_dir("feedback_examples") / "examples.jsonl")
    if "sft" not in params.finetune.tasks:
        raise LmforgeError("feedback_finetune: the sft task set is the held-out set the new model is judged on: list it in finetune.tasks")
    data = load_task(params, "sft")
    uri = tracking_uri(params)
    base = current(MlflowClient(uri, registry_uri=uri), params.registry.name, f.alias)
    if base is None:
        raise LmforgeError(f"feedback_finetune: no registered model {_base_ref(params)}: materialize 'register' first")
    source = resolve(_base_ref(params), uri)
    model, tokenizer, objective = load_dir(source)
    if objective != "causal":
        raise LmforgeError(f"feedback_finetune: {_base_ref(params)} is a {objective} model; SFT fine-tunes causal models")
    task_prompts = {s: [sft_prompt(tokenizer, r["prompt"], task.template, task.max_prompt_tokens) for r in rows] for s, rows in data.items()}
    references = [r["response"] for r in data["test"]]
    train_pairs = [(e["prompt"], e["response"]) for e in examples]
    if f.include_task_train:
        train_pairs += list(zip(task_prompts["train"], (r["response"] for r in data["train"])))
    train = encode_sft(tokenizer, [p for p, _ in train_pairs], [r for _, r in train_pairs], settings.max_length)
    val = encode_sft(tokenizer, task_prompts["val"], [r["response"] for r in data["val"]], settings.max_length)
    current_score = rouge(sft_answers(params, model, tokenizer, task_prompts["test"]), references)["rougeL"]
    say(f"feedback_finetune: {_base_ref(params)} (version {base.version}) scores ROUGE-L {current_score:.3f} on {len(references)} held-out examples; "
        f"training on {len(examples)} feedback examples" + (f" + {len(data['train'])} task examples" if f.include_task_train else ""))
    if f.method == "lora":  # the model just scored trains on (fit puts it in train mode)
        model = with_lora(model, params.finetune.lora, "CAUSAL_LM")
    started = time.perf_counter()
    run_settings = dataclasses.replace(settings, epochs=f.epochs)
    fitted = fit(model, train, lambda m: {"val_loss": mean_loss(m, val, settings.batch_size, tokenizer.pad_token_id)}, run_settings, f.lr,
                 tokenizer.pad_token_id, "val_loss", higher_is_better=False, desc=f"feedback {f.method}", log=say)
    new_score = rouge(sft_answers(params, model, tokenizer, task_prompts["test"]), references)["rougeL"]
    beats = new_score > current_score + f.min_improvement
    out = params.stage_dir("feedback_finetune")
    fresh_dir(out / "model")
    export(model, tokenizer, out / "model", lora=f.method == "lora", root=REPO_ROOT)
    from lmforge.benchmarks import score_and_gate, score_model

    report_as = lambda msg: say(f"feedback_finetune: {msg}")  # noqa: E731
    verdict = score_and_gate(params, out / "model" / "hf", score_model(params, source, report_as), report_as)["gate"]
    summary = {"base": _base_ref(params), "base_version": str(base.version), "method": f.method, "feedback_examples": len(examples),
               "train_examples": len(train), "test_examples": len(references), "current_rougeL": current_score, "rougeL": new_score,
               "improvement": new_score - current_score, "min_improvement": f.min_improvement, "beats_current": beats,
               "best_epoch": fitted.best_epoch, "seconds": time.perf_counter() - started,
               "examples_sha256": read_summary(params.stage_dir("feedback_examples"))["examples_sha256"],
               "kept_benchmarks": verdict["passed"], "benchmark_gate": verdict}
    with tracked_run(params, "feedback finetune", {"stage": "feedback_finetune", "base_version": str(base.version),
                                                   **ctx.tags()}) as (client, run_id):
        for key in ("current_rougeL", "rougeL", "improvement", "feedback_examples", "train_examples"):
            client.log_metric(run_id, key, float(summary[key]))
        client.log_param(run_id, "method", f.method)
        client.log_param(run_id, "lr", f.lr)
        client.log_param(run_id, "epochs", f.epochs)
    summary["mlflow_run_id"] = run_id
    say(f"feedback_finetune: ROUGE-L {new_score:.3f} vs {current_score:.3f} now: " + ("better" if beats else "not better: the alias stays"))
    write_params(out, f)
    write_summary(out, summary)
    return summary


def run_feedback_register(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Register the fine-tuned model and move the alias to it (only reached when ``beats_current`` passed)."""
    tuned = gated_summary(params, "feedback_finetune", "feedback_register", "the fine-tuned model is not better than the current one")
    tags = {"kind": "feedback", "rougeL": str(tuned["rougeL"]), "base_rougeL": str(tuned["current_rougeL"]),
            "feedback_examples": str(tuned["feedback_examples"]), "feedback_examples_sha256": tuned["examples_sha256"]}
    return register_tuned(params, tuned, "feedback_finetune", "feedback_register", tags, f"ROUGE-L {tuned['rougeL']:.3f} vs {tuned['current_rougeL']:.3f}",
                          ctx)


def gated_summary(params: Params, tuned_stage: str, stage: str, not_better: str) -> dict[str, Any]:
    """The tuning stage's summary, or the reason its model is not registered: not better than the current
    one, or failed its benchmark gate (the blocking checks stop the job; this stops a direct call)."""
    tuned = read_summary(params.stage_dir(tuned_stage))
    if not tuned["beats_current"]:
        raise LmforgeError(f"{stage}: {not_better} ({tuned_stage}'s beats_current)")
    if not tuned["kept_benchmarks"]:
        raise LmforgeError(f"{stage}: the tuned model failed its benchmark gate ({tuned['benchmark_gate']['reason']}): the alias stays")
    return tuned


def register_tuned(params: Params, tuned: dict[str, Any], tuned_stage: str, stage: str, tags: dict[str, str], why: str,
                   ctx: RunContext = QUIET) -> dict[str, Any]:
    """Register ``<tuned_stage>/model/hf`` (``tuned``: its ``gated_summary``) as a new version (tagged with its
    base version) and move ``feedback.alias`` to it: the last step of both loops, behind their blocking checks.
    Refused when the alias moved since tuning started (the other loop, or a new champion, got there first:
    tune again from the new version rather than undo it)."""
    from mlflow import MlflowClient

    from lmforge.registry import current, register_once
    from lmforge.tracking import lineage_tags, tracking_uri

    say = ctx.log
    uri, name, alias = tracking_uri(params), params.registry.name, params.feedback.alias
    client = MlflowClient(uri, registry_uri=uri)
    now = current(client, name, alias)
    if now is not None and str(now.version) != tuned["base_version"]:
        raise LmforgeError(f"{stage}: @{alias} moved to version {now.version} since {tuned_stage} started from version {tuned['base_version']}: "
                           f"materialize {tuned_stage} again to tune the new version")
    tags = {**lineage_tags(), **ctx.tags(), "base_version": tuned["base_version"], **tags}
    version, run_id, _new = register_once(params, params.stage_dir(tuned_stage) / "model" / "hf", tags, f"register {tags['kind']} model",
                                          {"stage": stage, **ctx.tags()}, tuned["mlflow_run_id"])
    client.set_registered_model_alias(name, alias, version)
    say(f"{stage}: {name} version {version} is now @{alias} ({why} of version {tuned['base_version']})")
    summary = {"registered_model": name, "version": version, "alias": alias, "replaced_version": tuned["base_version"], "mlflow_run_id": run_id}
    out = params.stage_dir(stage)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, summary)
    return summary
