"""The pipeline at a glance: one table built from every stage's summary.json (``lmforge summary``,
the end of ``lmforge run`` and ``make demo``)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from lmforge import stages
from lmforge.artifacts import read_summary
from lmforge.params import Params

UI_COMMANDS = "make ui  →  Dagster http://127.0.0.1:3000 · MLflow http://127.0.0.1:5000"
SERVE_COMMAND = "lmforge serve  →  http://127.0.0.1:8000/v1 (docs/serving.md)"



def _reasons(by_reason: dict[str, int]) -> str:
    top = sorted(by_reason.items(), key=lambda kv: -kv[1])[:3]
    return f" ({', '.join(f'{k} {v}' for k, v in top)})" if top else ""


def rows(params: Params) -> list[tuple[str, str, str]]:
    """(stage, item, value) rows; a stage not materialized yet says so."""

    @functools.cache
    def summary_of(stage: str) -> dict[str, Any] | None:
        return read_summary(params.stage_dir(stage), missing_ok=True)

    out: list[tuple[str, str, str]] = []

    def add(stage: str, item: str, render) -> None:
        summary = summary_of(stage)
        text = "not materialized" if not summary else f"skipped: {summary['skipped']}" if "skipped" in summary else render(summary)
        out.append((stage, item, text))

    add("ingest", "documents", lambda d: f"{d['documents']} read, {d['quarantined']} quarantined{_reasons(d['by_reason'])}")
    add("clean", "documents", lambda d: f"{d['kept']} kept, {d['quarantined']} quarantined{_reasons(d['by_reason'])}")
    add("split", "documents", lambda d: f"train {d['train']} · val {d['val']} · test {d['test']}")
    add("base_models", "sources", lambda d: " · ".join(f"{n} ({i['kind']}, {i['licence']})" for n, i in d["sources"].items()) or "none")
    add("tokenizer", "vocabulary", lambda d: f"{d['algorithm']} {d['vocab_size']:,} · {d['bytes_per_token']:.2f} bytes/token · unk {d['unk_rate']:.2%}")
    add("packed", "tokens", lambda d: " · ".join(f"{name}: {t['train_tokens']:,} train tokens" for name, t in d.get("by_tokenizer", {}).items())
        + f" (blocks of {d['block_size']})")
    add("benchmark_data", "items", lambda d: f"{d['items']} over {len(d['tasks'])} task(s) · {d['contaminated']} contaminated by the training split"
        + f" · {d['quarantined']} row(s) quarantined · {d['xstest_prompts']} XSTest prompts")
    champion = (summary_of("select") or {}).get("champion")
    scores = (summary_of("select") or {}).get("scores", {})
    for c in params.pretrain.candidates:
        pre = read_summary(params.stage_dir("pretrain") / c.name, missing_ok=True)
        ev = read_summary(params.stage_dir("evaluate") / c.name, missing_ok=True)
        if not pre:
            out.append(("pretrain", c.name, "not materialized"))
            continue
        trained = f"{pre['tokens_per_second']:,.0f} tokens/s" if pre.get("tokens_per_second") else "not trained"
        text = f"{pre.get('kind', 'scratch')} · {pre['parameters'] / 1e6:.2f} M params · {trained}"
        if ev:  # bits per byte first: the one number comparable across tokenizers
            text += f" · test {ev['bits_per_byte']:.3f} bits/byte · ppl {ev['perplexity']:.1f} ({ev.get('tokenizer', 'trained')} tokens)"
            if ev.get("crows_pairs_bias") is not None:  # 50%: no measured preference for the stereotyping sentence
                text += f" · stereotype preference {ev['crows_pairs_bias']:.0%} ± {ev['crows_pairs_bias_se']:.0%}"
        bench = read_summary(params.stage_dir("benchmark_eval") / c.name, missing_ok=True)
        if bench and bench.get("bench_accuracy") is not None:
            text += f" · benchmarks {100 * bench['bench_accuracy']:.1f}% mean (" + ", ".join(
                f"{t} {100 * r['value']:.0f}" for t, r in bench["tasks"].items()) + ")"
            if bench.get("gate"):
                text += " · base-model gate " + ("passed" if bench["gate"]["passed"] else "FAILED")
        if c.name in scores:
            text += f" · score {scores[c.name]:.3f}" + ("  ★ champion" if c.name == champion else "")
        out.append(("candidate", c.name, text))
    add("select", "champion", lambda d: f"{d['champion']} (score {d['champion_score']:.3f})")
    add("finetune_classifier", "macro-F1", lambda d: f"{d['macro_f1']:.3f} ({d['best_method']}) vs majority baseline {d['baseline_macro_f1']:.3f} "
        f"· TF-IDF+LR {d['classical_macro_f1']:.3f} · accuracy {d['accuracy']:.3f}")
    add("finetune_sft", "ROUGE-L", lambda d: f"{d['rougeL']:.3f} ({d['best_method']}) vs zero-shot {d['baseline_rougeL']:.3f} · ROUGE-1 {d['rouge1']:.3f}"
        + _gates(d))
    add("quantize", "chosen variant", lambda d: (
        f"{d['chosen']}: {d['linear_size_ratio']:.2f}× smaller linear weights ({d['disk_size_ratio']:.2f}× on disk) · "
        "speedup " + " / ".join(f"{v:.2f}× {k.split('_')[1]}" + (" ({:.2f}–{:.2f})".format(*d[f"speedup_spread_{k.split('_')[1]}"])
                                if f"speedup_spread_{k.split('_')[1]}" in d else "") for k, v in sorted(d.items()) if k.startswith("speedup_b"))
        + f" · perplexity {d['perplexity_increase']:+.2%}"
    ) if d.get("chosen") else "no variant within the perplexity threshold and its benchmark gate")
    add("quantize", "benchmarks", _quantized_benchmarks)
    add("distil", "student", lambda d: f"{d['student_parameters'] / 1e6:.2f} M params · ppl {d['distilled_perplexity']:.0f} distilled vs {d['from_scratch_perplexity']:.0f} from scratch"
        + _gates(d))
    add("register", "registry", lambda d: f"models:/{d['registered_model']}@candidate (v{d['candidate_version']})"
        + (f" · @champion (v{d['champion_version']})" if d.get("champion_version") else ""))
    add("register_quantized", "registry", lambda d: f"models:/{d['registered_model']}@quantized (v{d['quantized_version']}, {d['variant']})")
    add("export", "GGUF, ONNX", _export)
    add("batch_inference", "completions", lambda d: f"{d['completed']} of {d['prompts']} prompts ({d['quarantined']} quarantined"
        + (f", {d['resumed']} kept from an earlier run" if d["resumed"] else "") + ")"
        + (f" · {d['generated_tokens']:,} tokens at {d['tokens_per_second']:.1f} tokens/s, batches of {d['batch_size']}" if d["generated_tokens"] else ""))
    add("retrieval_index", "known items", _retrieval)
    add("rag_eval", "with retrieval", lambda d: f"continuation ppl {d['perplexity_without']:.1f} → {d['perplexity_with']:.1f} · "
        + (f"summaries ROUGE-L {d['rougeL_without']:.3f} → {d['rougeL_with']:.3f}" if "rougeL_without" in d else d["summaries_skipped"]))
    add("prompt_eval", "best prompts", _prompts)
    add("sampling_sweep", "best sampling", lambda d: f"{d['best']} (score {d['best_score']:.3f}) on {d['registered_model']} v{d['tagged_version']}")
    for stage, item, render in (("preference_tune", "held-out pairs", _preference), ("hpsearch", "best trial", _hpsearch)):
        if summary_of(stage):  # off the default run: a row once it ran
            add(stage, item, render)
    shown = {row[0] for row in out} | {"pretrain", "evaluate", "benchmark_eval"}  # the candidate rows
    for name, spec in stages.stages().items():  # a pipeline stage without a line of its own above (a new one): its numbers
        if name not in shown and spec.in_dvc and not spec.per_candidate:
            add(name, "figures", _figures)
    failures = params.artifacts / "run_failures.jsonl"
    if failures.exists() and failures.read_text().strip():
        last = json.loads(failures.read_text().strip().splitlines()[-1])
        out.append(("failures", "last failed run", f"{last['time']} {last['job']} {last['run_id'][:8]}: {last['error'][:80]} ({failures})"))
    out.append(("UIs", "open", UI_COMMANDS))
    out.append(("serve", "OpenAI API", SERVE_COMMAND))
    return out


def _figures(d: dict[str, Any]) -> str:
    """The numbers of a summary (a new stage's row until it gets a line of its own)."""
    numbers = [f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v:,}" for k, v in d.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " · ".join(numbers[:8]) or "done"


def _preference(d: dict[str, Any]) -> str:
    return (f"DPO ({d['loss_type']}, beta {d['beta']:g}, {d['method']}) on {d['train_pairs']} pairs: preference accuracy "
            f"{d['current_accuracy']:.0%} → {d['accuracy']:.0%} on {d['heldout_pairs']} held out · benchmark gate "
            + ("passed" if d["kept_benchmarks"] else "FAILED") + (" · alias moves" if d["beats_current"] and d["kept_benchmarks"] else " · alias stays"))


def _hpsearch(d: dict[str, Any]) -> str:
    values = ", ".join(f"{k.rsplit('.', 1)[-1]} {v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]} {v}" for k, v in d["best_params"].items())
    return (f"{d['target']}: trial {d['best_trial']} of {d['trials']} ({d['pruned']} pruned): val loss {d['best_value']:.3f} with {values} "
            f"→ lmforge run --params {Path(d['overlay']).name}")


def _export(d: dict[str, Any]) -> str:
    from lmforge.export import describe

    return describe(d)


def _gates(d: dict[str, Any]) -> str:
    """`` · benchmark gates: <model> passed, ...`` of a stage that gates its models on their parent."""
    gates = d.get("benchmark_gates") or {}
    return " · benchmark gates: " + ", ".join(f"{m} {'passed' if g['passed'] else 'FAILED'}" for m, g in gates.items()) if gates else ""


def _quantized_benchmarks(d: dict[str, Any]) -> str:
    """Per-task accuracy of the champion (fp32) and the chosen variant, and every variant's gate."""
    bench = d.get("benchmarks", {})
    gates = _gates(d)
    if not d.get("chosen") or d["chosen"] not in bench:
        return gates.lstrip(" ·")
    ref, ours = bench["fp32"]["tasks"], bench[d["chosen"]]["tasks"]
    return (f"champion → {d['chosen']}: " + ", ".join(f"{t} {100 * ref[t]['value']:.0f}→{100 * ours[t]['value']:.0f}" for t in ref if t in ours)
            + f" (± ~{100 * max(r['stderr'] for r in ref.values()):.0f} each, far less paired)" + gates)


def _retrieval(d: dict[str, Any]) -> str:
    k = max(int(key.rsplit("_", 1)[1]) for key in d if key.startswith("bm25_recall_at_"))
    methods = [m for m in ("bm25", "dense", "hybrid") if f"{m}_mrr" in d]
    return f"{d['chunks']:,} chunks · " + " · ".join(f"{m} recall@{k} {d[f'{m}_recall_at_{k}']:.2f} MRR {d[f'{m}_mrr']:.2f}" for m in methods)


def _prompts(d: dict[str, Any]) -> str:
    """The best prompt of each task set; a task left out of finetune.tasks says so."""
    cls, sft = d.get("classification_best_mode"), d.get("sft_best_mode")
    return (f"classification {cls} (F1 {d[f'classification_{cls}_macro_f1']:.3f})" if cls else d["classification_skipped"]) + " · " + (
        f"summaries {sft} (ROUGE-L {d[f'sft_{sft}_rougeL']:.3f})" if sft else d["sft_skipped"])


def render(table: list[tuple[str, str, str]]) -> str:
    """A plain-text table (no terminal codes: it reads the same in a CI log)."""
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    line = "─" * (widths[0] + widths[1] + 4 + max(len(r[2]) for r in table))
    body = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in table]
    return "\n".join([line, *body, line])
