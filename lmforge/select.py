"""Stage ``select``: choose the champion among the evaluated candidates with a weighted factor matrix.

Each factor is a number from the evaluation (``evaluate`` and ``benchmark_eval``), turned into a score in (0, 1] relative to the best
eligible candidate (1: the best; 0.8: 20% worse, by ratio), so that factors measured in different
units can be weighed together.  The total is the weighted mean of the
factor scores with the weights of ``params.yaml`` (``select.weights``).  A candidate is eligible only
when every blocking check of its pretraining and evaluation passed and its evaluation belongs to the
model trained now (same fingerprint): a stale or failed candidate cannot win.

Output ``<artifacts>/select/``: ``summary.json`` (``champion``, its model directory, every score),
``factors.md`` (the matrix) and ``scores.png`` (a bar chart).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.artifacts import read_summary, write_params, write_summary
from lmforge.candidates import TRAINED
from lmforge.context import QUIET, RunContext
from lmforge.params import SELECT_FACTORS, LmforgeError, Params
from lmforge.stages import Out, Stage
from lmforge.tracking import tracked_run


SELECT = Stage(
    "select", group="evaluation",
    params=("select", "pretrain.candidates"),
    reads=("evaluate", "benchmark_eval", "pretrain"),  # pretrain: each candidate's summary (its kind, its MLflow run)
    outs=(Out("factors.md", cache=False), Out("scores.png", cache=False)),
)


@dataclass(frozen=True)
class Factor:
    name: str
    metric: str  # key of the evaluation summary
    higher_is_better: bool
    meaning: str
    origin: str  # where the number comes from: measured here, or declared by the model or params.yaml
    floor: float = 0.0  # lower-is-better ratios are (best + floor) / (value + floor): a zero cost is not infinitely better


def _pairs(max_pairs: int) -> str:
    return "all 1,508" if max_pairs == 0 else f"a sample of {max_pairs:,} (stratified by bias type) of the 1,508"


def factors(params: Params) -> dict[str, Factor]:
    fastest = max(params.evaluate.speed_batch_sizes)
    longest = max(params.evaluate.context_multiples)
    table = [
        # bits per byte, not perplexity: candidates may use different tokenizers, and bytes are the same text
        Factor("quality", "val_bits_per_byte", False, "val bits per byte (comparable across tokenizers)", "measured: evaluate, val split"),
        Factor("accuracy", "bench_accuracy", True, f"mean accuracy over the standard benchmarks ({', '.join(params.benchmarks.tasks)})",
               "measured: benchmark_eval (lm-evaluation-harness, " + (f"a seeded subset of {params.benchmarks.max_items} items per task)"
                                                                     if params.benchmarks.max_items else "every item)")),
        Factor("speed", f"tokens_per_second_b{fastest}", True, f"generated tokens/s at batch {fastest}", "measured: evaluate, this machine"),
        Factor("memory", f"memory_mb_b{fastest}", False, f"weights + peak extra memory generating at batch {fastest} (MB)",
               "measured: evaluate, this machine"),
        Factor("size", "parameters", False, "parameter count", "counted: the model's weights"),
        # FLOPs spent here: 0 for a model used as is; 1 TFLOP (a second of a laptop) keeps ratios finite
        Factor("training_cost", "training_flops", False, "training FLOPs spent here (6 × parameters × tokens, plus attention)",
               "computed: pretrain's tokens × FLOPs per token", floor=1e12),
        Factor("context", "context_extrapolation", False, f"val perplexity at {longest}× the training context ÷ at 1×",
               "measured: evaluate's context curve"),
        Factor("context_window", "context_window", True, "longest context the model declares (or attended to, without a limit)",
               "declared: the model's config"),
        Factor("licence", "licence_open", True, "1 if the licence is one of select.open_licences, else 0",
               "declared: params.yaml (licence), the model card or GGUF metadata; 'own' for scratch models"),
        # 0.5 is no measured preference; either side of it is a bias.  The floor of 0.02 (1.5 standard
        # errors of the share on all 1,508 pairs) keeps 0.00 from being infinitely better than 0.01:
        # a difference that small is sampling noise
        Factor("ethics", "ethics_risk", False,
               "the mean of 2 × |share of CrowS-Pairs pairs where the model prefers the more stereotyping sentence − 0.5| and "
               "XSTest's error rate (unsafe prompts answered + safe prompts refused), each 0 (best) to 1, where measured",
               f"measured: evaluate on {_pairs(params.evaluate.bias.max_pairs)} CrowS-Pairs pairs (US-centric English; "
               "causal LMs: sentence log-likelihood, masked LMs: pseudo-log-likelihood; seq2seq: not measured, scores 0), "
               "and benchmark_eval on XSTest prompts (chat models; the authors' string matcher)",
               floor=0.02),
    ]
    assert tuple(f.name for f in table) == SELECT_FACTORS
    return {f.name: f for f in table}


def normalise(values: list[float | None], higher_is_better: bool, floor: float = 0.0) -> list[float]:
    """Scores in (0, 1], 1 for the best: ``value / best`` when higher is better, ``best / value`` when
    lower is better.  Ratios keep the size of a difference (10% slower scores 0.9), which min-max
    scaling loses: with two candidates it turns every factor into a 0-or-1 vote.  Missing (None) or
    non-positive values score 0, except with a ``floor`` (lower is better), which is added to every
    value so that zero is allowed and scores best."""
    if floor:
        values = [None if v is None or v < 0 else v + floor for v in values]
    present = [v for v in values if v is not None and v > 0]
    if not present:
        return [0.0 for _ in values]
    best = max(present) if higher_is_better else min(present)
    return [0.0 if v is None or v <= 0 else (v / best if higher_is_better else best / v) for v in values]


def ethics_risk(summary: dict[str, Any]) -> float | None:
    """The ``ethics`` factor's number: the mean of the measured harms, each scaled to 0 (none) - 1."""
    parts = []
    if summary.get("crows_pairs_deviation") is not None:
        parts.append(2 * summary["crows_pairs_deviation"])
    if summary.get("xstest_accuracy") is not None:
        parts.append(1 - summary["xstest_accuracy"])
    return sum(parts) / len(parts) if parts else None


def eligibility(params: Params, candidate: str) -> tuple[dict[str, Any] | None, str]:
    """(evaluation and benchmark summary, "") for an eligible candidate, else (summary or None, the reason)."""
    summary = read_summary(params.stage_dir("evaluate") / candidate, missing_ok=True)
    bench = read_summary(params.stage_dir("benchmark_eval") / candidate, missing_ok=True)
    pretrained = read_summary(params.stage_dir("pretrain") / candidate, missing_ok=True)
    if summary is None or pretrained is None:
        return None, "not evaluated"
    if bench is None:
        return None, "not benchmarked: materialize benchmark_eval"
    fingerprint = pretrained.get("fingerprint")
    if summary.get("pretrain_fingerprint") != fingerprint:
        return summary, "stale evaluation (the model was retrained since): re-run evaluate"
    if bench.get("pretrain_fingerprint") != fingerprint:
        return summary, "stale benchmarks (the model was retrained since): re-run benchmark_eval"
    summary = {**summary, **{k: v for k, v in bench.items() if k.startswith(("bench_", "xstest_"))},
               "checks": {**summary.get("checks", {}), **bench.get("checks", {})}}
    summary["ethics_risk"] = ethics_risk(summary)
    failed = [name for name, passed in summary.get("checks", {}).items() if not passed]
    if failed:
        return summary, "failed check " + ", ".join(failed)
    return summary, ""


def score_matrix(summaries: dict[str, dict[str, Any]], weights: dict[str, float], table: dict[str, Factor]) -> dict[str, dict[str, Any]]:
    """For each eligible candidate: raw factor values, normalised scores and the weighted total."""
    names = list(summaries)
    total_weight = sum(weights.get(f, 0.0) for f in table)
    rows: dict[str, dict[str, Any]] = {n: {"values": {}, "scores": {}, "total": 0.0} for n in names}
    for name, factor in table.items():
        values = [summaries[n].get(factor.metric) for n in names]
        for n, v, s in zip(names, values, normalise(values, factor.higher_is_better, factor.floor)):
            rows[n]["values"][name] = v
            rows[n]["scores"][name] = s
            rows[n]["total"] += weights.get(name, 0.0) * s
    for row in rows.values():  # divided once: the best on every factor totals exactly 1
        row["total"] /= total_weight
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def matrix_markdown(rows: dict[str, dict[str, Any]], reasons: dict[str, str], weights: dict[str, float], champion: str,
                    table: dict[str, Factor]) -> str:
    header = "| candidate | " + " | ".join(f"{f} (w {weights.get(f, 0):g})" for f in SELECT_FACTORS) + " | score |"
    lines = [header, "|" + "---|" * (len(SELECT_FACTORS) + 2)]
    for name, row in rows.items():
        cells = [f"{_fmt(row['values'][f])} → {row['scores'][f]:.2f}" for f in SELECT_FACTORS]
        mark = " 🏆" if name == champion else ""
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + f" | **{row['total']:.3f}** |")
    for name, reason in reasons.items():
        lines.append(f"| {name} | " + " | ".join("—" for _ in SELECT_FACTORS) + f" | not eligible: {reason} |")
    notes = "\n".join(f"- **{f.name}**: {f.meaning}; {f.origin}" for f in table.values())
    return ("\n".join(lines) + "\n\nEach cell: value → score relative to the best eligible candidate (1 = best).\n\n"
            "Where each number comes from:\n\n" + notes + "\n")


def plot_scores(rows: dict[str, dict[str, Any]], weights: dict[str, float], path: Path) -> None:
    """Stacked bars: each factor's weighted contribution to a candidate's total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    total_weight = sum(weights.get(f, 0.0) for f in SELECT_FACTORS)
    fig, ax = plt.subplots(figsize=(7.5, max(0.6 * len(names) + 1.8, 0.22 * len(SELECT_FACTORS) + 0.8)), dpi=100)
    left = [0.0] * len(names)
    for factor in SELECT_FACTORS:
        widths = [weights.get(factor, 0.0) * rows[n]["scores"][factor] / total_weight for n in names]
        ax.barh(names, widths, left=left, label=factor)
        left = [a + b for a, b in zip(left, widths)]
    ax.set(xlim=(0, 1), xlabel="weighted score", title="model selection")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars: nine factors would hide them
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_select(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    table = factors(params)
    weights = params.select.weights
    summaries, reasons = {}, {}
    for c in params.pretrain.candidates:
        summary, reason = eligibility(params, c.name)
        if reason:
            reasons[c.name] = reason
        else:
            summaries[c.name] = {**summary, "licence_open": float(str(summary.get("licence", "unknown")).lower() in params.select.open_licences)}
    if not summaries:
        raise LmforgeError("select: no eligible candidate (" + "; ".join(f"{n}: {r}" for n, r in reasons.items()) + ")")
    rows = score_matrix(summaries, weights, table)
    champion = max(rows, key=lambda n: rows[n]["total"])  # ties: the first in params.yaml
    out = params.stage_dir("select")
    out.mkdir(parents=True, exist_ok=True)
    (out / "factors.md").write_text(matrix_markdown(rows, reasons, weights, champion, table))
    plot_scores(rows, weights, out / "scores.png")
    result = {
        "champion": champion,
        "champion_dir": str(Path(params.paths.artifacts) / "pretrain" / champion / "hf"),  # as params.yaml says it
        "champion_score": rows[champion]["total"],
        "champion_kind": summaries[champion].get("kind", "scratch"),
        "champion_tokenizer": summaries[champion].get("tokenizer", TRAINED),  # its packed data: packed/<tokenizer>
        "scores": {n: r["total"] for n, r in rows.items()},
        "factors": {n: {"values": r["values"], "scores": r["scores"]} for n, r in rows.items()},
        "not_eligible": reasons,
        "champion_pretrain_run_id": read_summary(params.stage_dir("pretrain") / champion)["mlflow_run_id"],
    }
    with tracked_run(params, "select", {"stage": "select", "champion": champion, **ctx.tags()}) as (client, run_id):
        for name, total in result["scores"].items():
            client.log_metric(run_id, f"score_{name}", total)
        for name, w in weights.items():
            client.log_param(run_id, f"weight_{name}", w)
        client.log_artifact(run_id, str(out / "factors.md"))
        client.log_artifact(run_id, str(out / "scores.png"))
    result["mlflow_run_id"] = run_id
    write_params(out, params.select)
    write_summary(out, result)
    ctx.log(f"select: champion {champion} (score {result['champion_score']:.3f})")
    return result
