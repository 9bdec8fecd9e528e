"""Batch inference: a file of prompts → one completion per prompt, batched, resumable.

The asset ``batch_inference`` (``<artifacts>/batch_inference/``) and ``lmforge generate --file
PROMPTS.jsonl --output OUT.jsonl`` both call ``run_batch``; what they write:

- ``completions.jsonl`` (or ``OUT.jsonl``): one JSON object per prompt: ``id``, ``prompt``,
  ``completion``, ``prompt_tokens``, ``completion_tokens``, ``model`` (the reference as given) and
  ``model_version`` (what it resolved to).  Appended and fsync'ed after every batch, so a killed run
  loses at most the batch in flight;
- ``state.json`` (``OUT.state.json``): the fingerprint of what the completions depend on (the prompt
  file's bytes, the resolved model version, the sampling settings, chat or not, the field names).
  A run with the same fingerprint resumes: it reads the completions there (a torn last line, what a
  kill leaves mid-write, is dropped and its prompt redone) and generates only the ids missing.
  Another fingerprint starts over, and says what changed.  ``batch_size`` is not part of it: a run
  killed for memory can resume with smaller batches;
- ``quarantine.jsonl`` (``OUT.quarantine.jsonl``): every input row that cannot be a prompt (not JSON,
  no prompt, a bad or duplicate id, chat messages for a model without a chat template), with the
  reason; rows in = completed + quarantined, always.

Input: JSONL (one object a line: ``id_field``, ``prompt_field`` or ``messages_field``, a list of
``{"role", "content"}``), CSV (a header row naming the columns) or any other file as plain text, one
prompt a line.  Blank lines are not rows.  A row without an id gets its line number (CSV: its record
number).  Each batch is seeded with ``sampling.seed`` plus the index of its first prompt, so a resumed
run samples what an uninterrupted one would have.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.artifacts import QuarantineWriter, write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.params import REPO_ROOT, BatchInferenceParams, LmforgeError, Params
from lmforge.stages import Out, Stage


BATCH_INFERENCE = Stage(
    "batch_inference", group="deploy",
    params=("batch_inference", "registry"),
    reads=("register/summary.json",),
    files=("data/prompts/prompts.jsonl",),
    outs=(Out("completions.jsonl", persist=True), Out("state.json", cache=False, persist=True), "quarantine.jsonl",
          Out("params.json", cache=False)),
    note="completions.jsonl and state.json persist (DVC does not delete them before the run): a killed run\n"
         "resumes from them; a changed prompt file, model or sampling setting starts over (state.json says);\n"
         "tokens/s is measured on the machine at hand: it varies from run to run",
)


STAGE = "batch_inference"
COMPLETIONS = "completions.jsonl"
STATE = "state.json"
#: Parts of the fingerprint, in the order a "starting over" message names them.
FINGERPRINT_KEYS = ("prompts_sha256", "model_version", "sampling", "chat", "fields")


@dataclass
class Prompt:
    """One valid input row: its id (as written, or its line number), its prompt (text, or a chat
    conversation) and where it is in the file."""

    id: str | int
    prompt: str | list[dict[str, str]]
    line: int
    raw: str = ""

    @property
    def key(self) -> str:
        return str(self.id)


@dataclass
class Outputs:
    """Where a batch writes: the completions, the rejected rows, the fingerprint."""

    completions: Path
    quarantine: Path
    state: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Outputs:
        """The asset's layout: ``completions.jsonl``, ``quarantine.jsonl``, ``state.json``."""
        return cls(directory / COMPLETIONS, directory / "quarantine.jsonl", directory / STATE)

    @classmethod
    def beside(cls, output: Path) -> Outputs:
        """``OUT.jsonl`` with ``OUT.quarantine.jsonl`` and ``OUT.state.json`` next to it (the CLI)."""
        stem = output.name[: -len(output.suffix)] if output.suffix else output.name
        return cls(output, output.with_name(f"{stem}.quarantine.jsonl"), output.with_name(f"{stem}.state.json"))


# --------------------------------------------------------------------------------------------------
# Reading prompts
# --------------------------------------------------------------------------------------------------


def _records(path: Path, text: str, settings: BatchInferenceParams) -> list[tuple[int, str, dict[str, Any] | None, str]]:
    """(line, raw text, parsed object or None, why not) for every non-blank row of the file ``path`` holding ``text``."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise LmforgeError(f"{path}: give prompts as JSONL (.jsonl: one JSON object a line), CSV (.csv) or plain text (one prompt a line)")
    rows = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if settings.prompt_field not in columns:
            raise LmforgeError(f"{path}: no column '{settings.prompt_field}' (batch_inference.prompt_field) in the header "
                               f"(columns: {', '.join(columns) or 'none'})")
        for number, row in enumerate(reader, 1):
            values = {k: v for k, v in row.items() if k is not None}
            if not any((v or "").strip() for v in values.values()):
                continue
            if settings.id_field in values and not (values[settings.id_field] or "").strip():
                del values[settings.id_field]  # an empty id cell: the row has no id
            rows.append((number, json.dumps(values, ensure_ascii=False), values, ""))
        return rows
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        if suffix not in (".jsonl", ".ndjson"):
            rows.append((number, line, {settings.prompt_field: line}, ""))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append((number, line, None, f"not JSON: {exc.msg} at column {exc.colno}"))
            continue
        rows.append((number, line, obj, "") if isinstance(obj, dict) else (number, line, None, f"a JSON {type(obj).__name__}, not an object"))
    return rows


def _lines(text: str) -> list[str]:
    """Lines ended by a line feed (or CR LF) only: ``str.splitlines`` would also cut at U+2028 and other
    separators that JSON strings may hold as they are."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _messages(value: Any) -> list[dict[str, str]] | None:
    """A chat conversation, or None if ``value`` is not one (a non-empty list of {role, content} strings)."""
    if not isinstance(value, list) or not value:
        return None
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_prompts(path: Path, settings: BatchInferenceParams, data: bytes | None = None) -> tuple[list[Prompt], list[dict[str, Any]]]:
    """(valid prompts in file order, rejected rows as quarantine records) of the file ``path`` (its bytes
    ``data`` when already read).  The first row with an id keeps it; a later one is a duplicate."""
    if data is None:
        if not path.is_file():
            raise LmforgeError(f"prompt file not found: {path}")
        data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts: list[Prompt] = []
    rejected: list[dict[str, Any]] = []
    seen: dict[str, int] = {}

    def reject(line: int, raw: str, reason: str, detail: str) -> None:
        rejected.append({"line": line, "reason": reason, "detail": detail, "text": raw})

    for line, raw, obj, why in _records(path, text, settings):
        if obj is None:
            reject(line, raw, "not_json", why)
            continue
        if settings.id_field in obj:
            row_id = obj[settings.id_field]
            if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or (isinstance(row_id, str) and not row_id.strip()):
                reject(line, raw, "bad_id", f"'{settings.id_field}' must be a non-empty string or an integer, got {json.dumps(row_id)}")
                continue
        else:
            row_id = line
        prompt = obj.get(settings.prompt_field)
        if isinstance(prompt, str) and prompt.strip():
            value: str | list[dict[str, str]] = prompt
        elif settings.messages_field in obj:
            messages = _messages(obj[settings.messages_field])
            if messages is None:
                reject(line, raw, "bad_messages", f"'{settings.messages_field}' must be a non-empty list of {{\"role\", \"content\"}} strings")
                continue
            value = messages
        else:
            got = "" if prompt is None else f" (got {json.dumps(prompt, ensure_ascii=False)[:40]})"
            reject(line, raw, "no_prompt", f"no text in '{settings.prompt_field}'{got} and no '{settings.messages_field}'")
            continue
        key = str(row_id)
        if key in seen:
            reject(line, raw, "duplicate_id", f"id {json.dumps(row_id)} is already the id of line {seen[key]}")
            continue
        seen[key] = line
        prompts.append(Prompt(row_id, value, line, raw))
    return prompts, rejected


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def default_model(registry_name: str) -> str:
    return f"models:/{registry_name}@champion"


def load_model(ref: str, tracking_uri: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, resolved version) for a model directory or MLflow URI; a clear error for a
    missing registry entry or a masked LM (it cannot generate)."""
    from models.checksums import weights_sha256
    from lmforge.registry import model_directory
    from models.generation import load

    directory, version = model_directory(ref, tracking_uri)
    model, tokenizer, objective = load(directory)
    if objective == "mlm":
        raise LmforgeError(f"{ref} is a masked language model: it fills in blanks and cannot generate text")
    if not ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        version = "sha256:" + weights_sha256(directory)[:16]
    return model, tokenizer, version


def chat_mode(setting: Any, tokenizer, ref: str, option: str = "batch_inference.chat") -> bool:
    """``batch_inference.chat`` or ``lmforge generate --chat`` (``option``: auto, true, false; run config
    may pass it as a string) for this tokenizer: auto is on for an instruct model (a chat template)."""
    from models.generation import has_chat_template

    text = str(setting).lower()
    if text not in ("auto", "true", "false"):
        raise LmforgeError(f"{option}: expected auto, true or false, got {setting!r}")
    if text == "auto":
        return has_chat_template(tokenizer)
    if text == "true" and not has_chat_template(tokenizer):
        raise LmforgeError(f"{option}: {ref} has no chat template (tokenizer.chat_template): it completes text, so {option} cannot be on")
    return text == "true"


def complete_prompts(model, tokenizer, prompts: list[str], sampling, batch_size: int = 8, chat: bool = False,
                     on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Completions of a few prompts held in memory (``lmforge generate``), streamed through ``on_text(i, piece)``
    if given; a file of prompts goes through ``run_batch`` (resumable, quarantined)."""
    from models.generation import generate

    return generate(model, tokenizer, prompts, sampling, batch_size, on_text=on_text, chat=chat)


def _fingerprint(details: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(details, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _changed(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if old is None:
        return "no state file records what they were made with"
    names = {"prompts_sha256": "the prompt file", "model_version": "the model", "sampling": "the sampling settings",
             "chat": "chat or not", "fields": "the field names"}
    changed = [names[k] for k in FINGERPRINT_KEYS if old.get(k) != new.get(k)]
    return (", ".join(changed) or "the fingerprint") + " changed"


def _completed(out: Outputs, wanted: set[str], say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The completions already in ``out.completions``, by id.  A torn last line (a kill mid-write), an
    unreadable line or an id not among the prompts is dropped, and the file rewritten without it."""
    if not out.completions.exists():
        return {}
    data = out.completions.read_bytes()
    done: dict[str, dict[str, Any]] = {}
    *complete, tail = data.split(b"\n")  # ``tail``: what follows the last newline, a torn line if anything
    dropped = 1 if tail.strip() else 0
    rewrite = bool(tail)
    for raw in complete:
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            record = None
        key = str(record["id"]) if isinstance(record, dict) and "id" in record else None
        if key is None or key not in wanted or key in done:
            dropped += 1 if raw.strip() else 0
            continue
        done[key] = record
    if dropped or rewrite:
        say(f"{out.completions.name}: {dropped} torn or unreadable line(s) dropped; their prompts are generated again")
        _write_atomic(out.completions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
    return done


def _start(out: Outputs, details: dict[str, Any], say: Callable[[str], None]) -> str:
    """Compare the fingerprint with the state file; on a change remove the old completions (before the
    new state is written: a kill in between must not pair old completions with a new fingerprint).
    Returns why the run started over ("" when it did not)."""
    try:
        old = json.loads(out.state.read_text(encoding="utf-8")) if out.state.exists() else None
    except json.JSONDecodeError:  # written atomically, so only a hand edit gets here: trust nothing then
        old = None
    why = ""
    if out.completions.exists() and (old is None or old.get("fingerprint") != details["fingerprint"]):
        why = _changed(old, details)
        say(f"starting over: {why} since {out.completions.name} was written; its completions are not reused")
        out.completions.unlink()
    if old != details:
        _write_atomic(out.state, json.dumps(details, indent=2, sort_keys=True) + "\n")
    return why


# --------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------


def run_batch(
    settings: BatchInferenceParams,
    file: Path,
    out: Outputs,
    *,
    registry_name: str,
    tracking_uri: str | None = None,
    report: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Complete every prompt of ``file`` with ``settings.model`` (default: the registry's champion),
    ``settings.batch_size`` at a time, appending to ``out.completions``; resume what a previous run
    with the same fingerprint left.  ``on_batch(completed)`` is called after each batch is on disk.
    Returns the summary: prompts (rows in), completed, resumed, quarantined (+ by_reason), generated
    tokens, seconds and tokens/s of this run's generation, batch size, model and version."""
    from tqdm.auto import tqdm

    from models.generation import complete

    say = report or (lambda _msg: None)
    if not file.is_file():
        raise LmforgeError(f"prompt file not found: {file}")
    data = file.read_bytes()  # read once: the fingerprint is of the very bytes the prompts come from
    prompts, rejected = read_prompts(file, settings, data)
    ref = settings.model or default_model(registry_name)
    model, tokenizer, version = load_model(ref, tracking_uri)
    chat = chat_mode(settings.chat, tokenizer, ref)
    if not chat:  # a conversation needs a chat template
        for p in [p for p in prompts if not isinstance(p.prompt, str)]:
            rejected.append({"line": p.line, "reason": "needs_chat", "detail": f"chat messages, but chat is off for {ref}", "text": p.raw})
        prompts = [p for p in prompts if isinstance(p.prompt, str)]
    out.completions.parent.mkdir(parents=True, exist_ok=True)
    with QuarantineWriter(out.quarantine) as quarantine:
        for r in sorted(rejected, key=lambda r: r["line"]):
            quarantine.write(source=str(file), **r)
    details = {
        "prompts_sha256": hashlib.sha256(data).hexdigest(),
        "model_version": version,
        "sampling": dataclasses.asdict(settings.sampling),
        "chat": chat,
        "fields": {"prompt": settings.prompt_field, "id": settings.id_field, "messages": settings.messages_field},
    }
    details = {**details, "fingerprint": _fingerprint(details)}
    started_over = _start(out, details, say)
    done = _completed(out, {p.key for p in prompts}, say)
    resumed = len(done)
    pending = [(i, p) for i, p in enumerate(prompts) if p.key not in done]
    if resumed:
        say(f"resuming: {resumed} of {len(prompts)} prompts already completed in {out.completions.name}")
    say(f"batch_inference: {len(pending)} prompts to complete with {ref} ({version}), batches of {settings.batch_size}, chat {'on' if chat else 'off'}")
    generated = prompt_tokens = 0
    seconds = 0.0
    with open(out.completions, "a", encoding="utf-8") as fh, tqdm(total=len(pending), desc=STAGE, unit="prompt", disable=not progress or None) as bar:
        _fsync_dir(out.completions.parent)
        for start in range(0, len(pending), settings.batch_size):
            batch = pending[start : start + settings.batch_size]
            began = time.perf_counter()
            results = complete(model, tokenizer, [p.prompt for _, p in batch], settings.sampling, chat=chat, offset=batch[0][0])
            seconds += time.perf_counter() - began
            lines = []
            for (_, p), g in zip(batch, results):
                record = {"id": p.id, "prompt": p.prompt, "completion": g.text, "prompt_tokens": g.prompt_tokens,
                          "completion_tokens": g.completion_tokens, "model": ref, "model_version": version}
                done[p.key] = record
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                generated += g.completion_tokens
                prompt_tokens += g.prompt_tokens
            fh.write("".join(lines))  # one write per batch, then on disk before the next batch starts
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(len(done))
    rows_in = len(prompts) + len(rejected)
    if rows_in != len(done) + len(rejected):  # every row is completed or quarantined: a bug otherwise
        raise RuntimeError(f"batch_inference: {rows_in} rows in, {len(done)} completed + {len(rejected)} quarantined")
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    summary = {
        "prompts": rows_in, "completed": len(done), "resumed": resumed, "quarantined": len(rejected), "by_reason": dict(sorted(by_reason.items())),
        "generated_tokens": generated, "prompt_tokens": prompt_tokens, "seconds": round(seconds, 3),
        "tokens_per_second": round(generated / seconds, 2) if seconds > 0 else 0.0, "batch_size": settings.batch_size,
        "model": ref, "model_version": version, "chat": chat, "started_over": started_over,
    }
    say(f"batch_inference: {len(done)} of {rows_in} completed ({resumed} resumed, {len(rejected)} quarantined); "
        f"{generated} tokens in {seconds:.1f} s = {summary['tokens_per_second']} tokens/s")
    return summary


def prompt_file(params: Params) -> Path:
    return params.path(params.batch_inference.file)


def run_batch_inference(params: Params, ctx: RunContext = QUIET,
                        on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The ``batch_inference`` stage: ``batch_inference.file`` → ``<artifacts>/batch_inference/``.  The
    directory is kept between runs (it is what a killed run resumes from).  Without a prompt file there is
    nothing to do: the summary says so."""
    from lmforge.tracking import tracking_uri

    say = ctx.log
    settings = params.batch_inference
    out_dir = params.stage_dir(STAGE)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_params(out_dir, settings)
    file = prompt_file(params)
    if not file.is_file():
        shown = file.relative_to(REPO_ROOT) if file.is_relative_to(REPO_ROOT) else file
        summary = {"skipped": f"no prompt file {shown} (batch_inference.file): `lmforge demo-corpus --force` writes the demo's, "
                              "or put a JSONL or CSV of prompts there"}
        say(f"batch_inference: {summary['skipped']}")
        write_summary(out_dir, summary)
        return summary
    summary = run_batch(settings, file, Outputs.in_dir(out_dir), registry_name=params.registry.name, tracking_uri=tracking_uri(params),
                        report=say, on_batch=on_batch)
    write_summary(out_dir, summary)
    return summary


def samples(out_dir: Path, n: int = 5) -> list[dict[str, Any]]:
    """The first ``n`` completions (for the asset's metadata)."""
    path = out_dir / COMPLETIONS
    rows = [json.loads(line) for line in _lines(path.read_text(encoding="utf-8"))[:n]] if path.exists() else []
    return [{"id": r["id"], "prompt": r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"],
             "completion": r["completion"], "tokens": r["completion_tokens"]} for r in rows]
