"""Stages ``quantize``, ``prune`` and ``distil``: smaller, faster versions of the champion, each
measured side by side with its reference in one run (machines are noisy; ratios are what count).

- ``quantize``: every variant of ``quantize.variants`` (``models.quantization``), with its size on
  disk, linear-weight bytes, CPU tokens/s and latency at each speed batch size, and the perplexity and
  bits-per-byte change on the test split against the full-precision model.  The smallest variant
  whose perplexity rises by at most ``quantize.max_perplexity_increase`` becomes ``quantized``.
- ``prune``: magnitude pruning (unstructured and structured) at ``prune.sparsity``, scored the same way.
- ``distil``: a smaller student trained on the champion's logits, against the same student trained
  from scratch for the same steps on the same blocks.

Every model made here is also scored on the standard benchmarks and gated on the champion, item by
item (``lmforge.benchmarks.gate``): a quantized variant that fails its gate is never chosen, and the
verdicts of pruned and distilled models are in their summaries (``benchmark_gates``).

Outputs ``<artifacts>/<stage>/`` with ``summary.json``, a markdown table and the models (Hugging Face
format, loadable by ``lmforge generate``); each stage is an MLflow run nested under the champion's
pretraining run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from lmforge.artifacts import fresh_dir, write_params, write_summary
from lmforge.benchmarks import benchmark_gates
from lmforge.candidates import champion_packed_dir
from lmforge.context import QUIET, RunContext
from lmforge.finetune import champion
from lmforge.params import LmforgeError, Params
from lmforge.stages import Out, Stage
from lmforge.tracking import log_numbers, tracked_run


QUANTIZE = Stage(
    "quantize", group="deploy",
    params=("benchmarks", "quantize", "evaluate.batch_size", "evaluate.max_blocks", "evaluate.speed_batch_sizes", "evaluate.speed_new_tokens",
            "evaluate.speed_rounds"),
    reads=("benchmark_data/tasks", "select/summary.json", "packed"),
    outs=("models", Out("params.json", cache=False)),  # variants.md: timings, kept out of DVC like timings.json
    note="speed is measured on the machine at hand: the summary's speed-ups vary from run to run",
)
PRUNE = Stage(
    "prune", group="deploy",
    params=("benchmarks", "prune", "evaluate.batch_size", "evaluate.max_blocks", "evaluate.speed_batch_sizes", "evaluate.speed_new_tokens",
            "evaluate.speed_rounds"),
    reads=("benchmark_data/tasks", "select/summary.json", "packed"),
    outs=("models", Out("params.json", cache=False)),  # variants.md: timings, kept out of DVC like timings.json
)
DISTIL = Stage(
    "distil", group="deploy",
    params=("benchmarks", "distil"),
    reads=("benchmark_data/tasks", "select/summary.json", "packed"),
    outs=("models", Out("params.json", cache=False)),
)


def _scorer(params: Params, source: Path):
    """A function scoring a model on the test split the way ``evaluate`` does (same blocks)."""
    from models.data import PackedBlocks
    from models.evaluation import lm_scores
    from models.generation import load
    from models.metrics import token_byte_lengths
    from models.objectives import CausalCollator

    _, tokenizer, objective = load(source)
    if objective != "causal":
        raise LmforgeError(f"the champion at {source} is not a causal language model: compression measures causal models only")
    blocks = PackedBlocks(champion_packed_dir(params), "test")
    lengths = token_byte_lengths(tokenizer)
    collate = CausalCollator(blocks.pad_id)

    def scores(model):
        return lm_scores(model, blocks, collate, lengths, "causal", params.evaluate.batch_size, params.evaluate.max_blocks)

    return scores, blocks


def _speeds(params: Params, models: dict[str, Any], blocks) -> dict[str, dict[int, dict[str, Any]]]:
    """Every model's generation speed at each ``evaluate.speed_batch_sizes``, in ``evaluate.speed_rounds``
    alternating rounds (``models.evaluation.speed_side_by_side``)."""
    import numpy as np
    import torch

    from models.evaluation import speed_side_by_side

    prompt = torch.from_numpy(np.asarray(blocks.data[:32]).astype(np.int64))[None]
    return speed_side_by_side(models, prompt, params.evaluate.speed_batch_sizes, params.evaluate.speed_new_tokens, params.evaluate.speed_rounds)


def measure(model, scores, path: Path | None) -> dict[str, Any]:
    """Quality and size of one model (its speed: ``_speeds``, all models side by side)."""
    from models.quantization import disk_bytes, linear_weight_bytes

    s = scores(model)
    row = {"perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte, "linear_weight_bytes": linear_weight_bytes(model)}
    if path is not None:
        row["disk_bytes"] = disk_bytes(path)
    return row


def _relative(rows: dict[str, dict[str, Any]], reference: str, timings: dict[str, dict[int, dict[str, Any]]]) -> None:
    """Sizes and perplexity against the reference row; speed as the median over rounds of each round's
    ratio to the reference, with the lowest and highest round (the spread a choice must hold beyond)."""
    import statistics

    ref = rows[reference]
    for name, row in rows.items():
        row["perplexity_increase"] = row["perplexity"] / ref["perplexity"] - 1
        row["bits_per_byte_delta"] = row["bits_per_byte"] - ref["bits_per_byte"]
        row["linear_size_ratio"] = ref["linear_weight_bytes"] / row["linear_weight_bytes"]
        if "disk_bytes" in row and "disk_bytes" in ref:
            row["disk_size_ratio"] = ref["disk_bytes"] / row["disk_bytes"]
        for b, timing in timings[name].items():
            ratios = [t / r for t, r in zip(timing["tokens_per_second"], timings[reference][b]["tokens_per_second"])]
            row[f"tokens_per_second_b{b}"] = statistics.median(timing["tokens_per_second"])
            row[f"latency_ms_b{b}"] = statistics.median(timing["latency_ms"])
            row[f"peak_memory_mb_b{b}"] = timing["peak_memory_mb"]
            row[f"speedup_b{b}"] = statistics.median(ratios)
            row[f"speedup_b{b}_min"], row[f"speedup_b{b}_max"] = min(ratios), max(ratios)


def choose(rows: dict[str, dict[str, Any]], eligible: list[str], batch_sizes: list[int]) -> tuple[str | None, str]:
    """The variant ``quantized`` points at, among ``eligible`` ones (within the perplexity threshold and
    their benchmark gate), and why: the fastest whose speed-up holds beyond the rounds' spread (its
    slowest round beats the reference at every batch size), ranked by its smallest median speed-up
    over the batch sizes; when no variant is faster beyond the spread, the smallest one."""
    faster = [v for v in eligible if all(rows[v][f"speedup_b{b}_min"] > 1 for b in batch_sizes)]
    if faster:
        return max(faster, key=lambda v: min(rows[v][f"speedup_b{b}"] for b in batch_sizes)), "fastest beyond the spread"
    smallest = min(eligible, key=lambda v: (rows[v]["linear_weight_bytes"], -rows[v][f"speedup_b{max(batch_sizes)}"]), default=None)
    return smallest, "smallest (none faster beyond the spread)" if smallest else "none eligible"


def table(rows: dict[str, dict[str, Any]], batch_sizes: list[int], unsupported: dict[str, str] | None = None) -> str:
    cols = (["perplexity", "perplexity_increase", "bits_per_byte_delta", "linear_size_ratio", "disk_size_ratio"] + [f"speedup_b{b}" for b in batch_sizes]
            + ["bench_accuracy", "benchmark_gate_passed"])
    lines = ["| variant | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, row in rows.items():
        cells = []
        for c in cols:
            v = row.get(c)
            if c.startswith("speedup_b") and v is not None and f"{c}_min" in row:
                cells.append(f"{v:.2f} ({row[f'{c}_min']:.2f}–{row[f'{c}_max']:.2f})")
                continue
            cells.append("—" if v is None else f"{v:+.2%}" if c == "perplexity_increase" else f"{v:+.4f}" if c.endswith("delta")
                         else f"{100 * v:.1f}" if c == "bench_accuracy" else ("kept" if v else "**regressed**") if c == "benchmark_gate_passed"
                         else f"{v:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, reason in (unsupported or {}).items():
        lines.append(f"| {name} | unsupported here: {reason} |" + " |" * (len(cols) - 1))
    return "\n".join(lines) + "\n"


def _finish(params: Params, stage: str, summary: dict[str, Any], parent: str | None, tags: dict[str, str]) -> dict[str, Any]:
    """Log every variant's numbers and the table to an MLflow run; write params and summary."""
    out = params.stage_dir(stage)
    with tracked_run(params, stage, {"stage": stage, "champion": summary["champion"], **tags}, parent_run_id=parent) as (client, run_id):
        for variant, row in summary["variants"].items():
            for key, value in row.items():
                client.log_metric(run_id, f"{variant}_{key}", value)
        client.log_artifact(run_id, str(out / "variants.md"))
    summary["mlflow_run_id"] = run_id
    write_params(out, getattr(params, stage))
    write_summary(out, summary)
    return summary


def run_quantize(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    from models.generation import load
    from models.quantization import UnsupportedVariant, quantize

    say = ctx.log
    name, source, parent = champion(params)
    scores, blocks = _scorer(params, source)
    out = params.stage_dir("quantize")
    fresh_dir(out / "models")
    reference, _, _ = load(source, device="cpu")
    models = {"fp32": reference}
    rows = {"fp32": measure(reference, scores, source)}
    unsupported = {}
    for variant in params.quantize.variants:
        started = time.perf_counter()
        try:
            quantize(source, variant, out / "models" / variant, tuple(params.quantize.keep_full_precision))
        except UnsupportedVariant as exc:
            unsupported[variant] = str(exc).split(": ", 1)[-1]
            say(f"quantize {variant}: unsupported here ({unsupported[variant]})")
            continue
        # measure the model as a user loads it from disk, not the object in memory
        models[variant], _, _ = load(out / "models" / variant, device="cpu")
        rows[variant] = measure(models[variant], scores, out / "models" / variant)
        rows[variant]["seconds"] = time.perf_counter() - started
        say(f"quantize {variant}: perplexity {rows[variant]['perplexity']:.2f} (fp32 {rows['fp32']['perplexity']:.2f})")
    say(f"quantize: timing {', '.join(models)} side by side, {params.evaluate.speed_rounds} alternating rounds")
    _relative(rows, "fp32", _speeds(params, models, blocks))
    del models
    gates, benchmarks = benchmark_gates(params, {v: out / "models" / v for v in rows if v != "fp32"}, ("fp32", source), rows, say)
    threshold = params.quantize.max_perplexity_increase
    batch_sizes = params.evaluate.speed_batch_sizes
    within = [v for v in rows if v != "fp32" and rows[v]["perplexity_increase"] <= threshold and gates[v]["passed"]]
    chosen, reason = choose(rows, within, batch_sizes)
    (out / "variants.md").write_text(table(rows, batch_sizes, unsupported))
    summary = {"champion": name, "chosen": chosen, "chosen_because": reason,
               "chosen_dir": str(Path(params.paths.artifacts) / "quantize" / "models" / chosen) if chosen else None,
               "max_perplexity_increase": threshold, "speed_rounds": params.evaluate.speed_rounds, "variants": rows,
               "unsupported": unsupported, "benchmark_gates": gates, "benchmarks": {k: benchmarks[k] for k in ("fp32", chosen) if k}}
    if chosen:
        summary.update({k: rows[chosen][k] for k in ("perplexity_increase", "linear_size_ratio", "disk_size_ratio") if k in rows[chosen]})
        summary.update({f"speedup_b{b}": rows[chosen][f"speedup_b{b}"] for b in batch_sizes})
        summary.update({f"speedup_spread_b{b}": [rows[chosen][f"speedup_b{b}_min"], rows[chosen][f"speedup_b{b}_max"]] for b in batch_sizes})
        summary["speed_goal_met"] = all(rows[chosen][f"speedup_b{b}_min"] >= params.quantize.speedup_goal for b in batch_sizes)
        say(f"quantize: chosen {chosen} ({reason}); speed-up " + ", ".join(
            f"b{b} {rows[chosen][f'speedup_b{b}']:.2f}× ({rows[chosen][f'speedup_b{b}_min']:.2f}–{rows[chosen][f'speedup_b{b}_max']:.2f})" for b in batch_sizes))
    return _finish(params, "quantize", summary, parent, {"chosen": str(chosen), **ctx.tags()})


def run_prune(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    from models.generation import load
    from models.quantization import prune

    say = ctx.log
    name, source, parent = champion(params)
    scores, blocks = _scorer(params, source)
    out = params.stage_dir("prune")
    fresh_dir(out / "models")
    reference, tokenizer, _ = load(source, device="cpu")
    models = {"dense": reference}
    rows = {"dense": measure(reference, scores, source)}
    for method in params.prune.methods:
        models[method], _, _ = load(source, device="cpu")
        sparsity = prune(models[method], params.prune.sparsity, structured=method == "structured")
        models[method].save_pretrained(str(out / "models" / method))
        tokenizer.save_pretrained(str(out / "models" / method))
        rows[method] = {**measure(models[method], scores, out / "models" / method), "sparsity": sparsity}
        say(f"prune {method} at {sparsity:.0%}: perplexity {rows[method]['perplexity']:.2f} (dense {rows['dense']['perplexity']:.2f})")
    _relative(rows, "dense", _speeds(params, models, blocks))
    del models
    gates, _ = benchmark_gates(params, {m: out / "models" / m for m in params.prune.methods}, ("dense", source), rows, say)
    (out / "variants.md").write_text(table(rows, params.evaluate.speed_batch_sizes))
    summary = {"champion": name, "sparsity": params.prune.sparsity, "variants": rows, "benchmark_gates": gates,
               **{f"{m}_perplexity_increase": rows[m]["perplexity_increase"] for m in params.prune.methods}}
    return _finish(params, "prune", summary, parent, ctx.tags())


def run_distil(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    import torch

    from models.architectures import ArchConfigError, build_model, from_name, parameter_count
    from models.data import PackedBlocks
    from models.distillation import train_student
    from models.generation import load
    from models.precision import resolve
    from models.training import special_ids

    say = ctx.log
    p = params.distil
    name, source, parent = champion(params)
    scores, _ = _scorer(params, source)
    teacher, tokenizer, _ = load(source)
    train = PackedBlocks(champion_packed_dir(params), "train")
    try:
        arch = from_name(p.student_preset, **{"max_context": train.block_size, **p.student_overrides, "vocab_size": len(tokenizer)})
    except (ArchConfigError, TypeError) as exc:
        raise LmforgeError(f"distil.student_preset/student_overrides: {exc}") from None
    if arch.objective != "causal":
        raise LmforgeError("distil: the student must be a decoder (arch: decoder)")
    out = params.stage_dir("distil")
    fresh_dir(out / "models")
    results = {}
    for kind, teacher_model in (("distilled", teacher), ("from_scratch", None)):
        torch.manual_seed(p.seed)  # the same initial student for both
        student = build_model(arch, special_ids(tokenizer)).to(teacher.device)
        started = time.perf_counter()
        losses = train_student(student, train, train.pad_id, dataclasses.replace(p, alpha=p.alpha if teacher_model else 0.0),
                               teacher=teacher_model, desc=f"distil {kind}")
        s = scores(student)
        results[kind] = {"perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte, "final_train_loss": losses[-1],
                         "seconds": time.perf_counter() - started}
        student.save_pretrained(str(out / "models" / kind))
        tokenizer.save_pretrained(str(out / "models" / kind))
        say(f"distil {kind}: test perplexity {s.perplexity:.2f}")
    teacher_scores = scores(teacher)
    gates, _ = benchmark_gates(params, {"distilled": out / "models" / "distilled"}, ("teacher", source), results, say)
    summary = {"benchmark_gates": gates, "champion": name, "student_preset": p.student_preset, "student_parameters": parameter_count(arch),
               "teacher_precision": resolve(p.teacher_precision, teacher.device),
               "teacher_parameters": sum(t.numel() for t in teacher.parameters()), "teacher_perplexity": teacher_scores.perplexity,
               **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
               "beats_from_scratch": results["distilled"]["perplexity"] < results["from_scratch"]["perplexity"]}
    with tracked_run(params, "distil", {"stage": "distil", "champion": name, **ctx.tags()}, parent_run_id=parent) as (client, run_id):
        log_numbers(client, run_id, summary)
        for key, value in dataclasses.asdict(p).items():
            client.log_param(run_id, key, value)
    summary["mlflow_run_id"] = run_id
    write_params(out, p)
    write_summary(out, summary)
    return summary

