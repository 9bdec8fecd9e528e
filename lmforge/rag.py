"""Retrieval-augmented generation and prompt workflows over the cleaned corpus (the `rag` group).

- ``run_retrieval_index``: chunks of every split of the cleaned corpus, a BM25 index and a dense index
  (the champion's embeddings), scored on known items: a sentence of a held-out chunk must find it.
- ``run_rag_eval``: the same model with and without retrieved chunks: perplexity of held-out
  continuations and ROUGE on the summarisation set.
- ``run_prompt_eval``: prompt templates, zero-shot and few-shot (fixed or retrieved examples), on the
  fine-tuning task sets.
- ``run_sampling_sweep``: temperature × top-k × top-p on the task sets' val parts; the best setting is
  recorded on the champion's registry version.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import string
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.artifacts import fresh_dir, load_dataset_dir, read_jsonl, read_summary, write_jsonl, write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.finetune import TASKS, champion, load_task, not_configured
from lmforge.params import LmforgeError, Params
from lmforge.stages import Out, Stage
from lmforge.tracking import log_numbers, tracked_run, tracking_uri
from models.retrieval import (
    LexicalIndex,
    chunk_words,
    continuation_loss,
    continuation_perplexity,
    dense_search,
    distinct_n,
    embed,
    known_item_metrics,
    reciprocal_rank_fusion,
    repetition_rate,
    sentences,
    truncate_left,
)


RETRIEVAL_INDEX = Stage(
    "retrieval_index", group="rag",
    params=("rag.chunk_words", "rag.overlap_words", "rag.encoder", "rag.encoder_max_tokens", "rag.queries", "rag.recall_at", "rag.seed"),
    reads=("split/train", "split/val", "split/test", "select/summary.json"),
    outs=("chunks.jsonl", "bm25", "embeddings.npy", "known_items.jsonl", Out("meta.json", cache=False), Out("params.json", cache=False)),
)
RAG_EVAL = Stage(
    "rag_eval", group="rag",
    params=("rag", "finetune.tasks", "finetune.sft"),
    reads=("retrieval_index/chunks.jsonl", "retrieval_index/bm25", "retrieval_index/embeddings.npy", "finetune_sft/models",
           "finetune_sft/summary.json", "select/summary.json", "task_data/classification", "task_data/sft"),
    files=("prompts/rag.txt",),
    outs=(Out("examples.json", cache=False), Out("comparison.md", cache=False), Out("params.json", cache=False)),
)
PROMPT_EVAL = Stage(
    "prompt_eval", group="rag",
    params=("rag.templates", "rag.few_shot", "rag.eval_examples", "finetune.tasks", "finetune.classification.labels", "finetune.sft.max_new_tokens"),
    reads=("select/summary.json", "task_data/classification", "task_data/sft"),
    files=("prompts",),
    outs=(Out("examples.json", cache=False), Out("params.json", cache=False)),
)
SAMPLING_SWEEP = Stage(
    "sampling_sweep", group="rag",
    params=("rag.sweep", "rag.few_shot", "rag.templates", "finetune.tasks"),
    reads=("register/summary.json", "select/summary.json", "task_data/classification", "task_data/sft"),
    files=("prompts",),
    outs=(Out("sweep.md", cache=False), Out("params.json", cache=False)),
)


#: The placeholders each template must hold (and may only hold).
TEMPLATE_FIELDS = {"rag": {"context", "prompt"}, "summarise": {"document"}, "classify": {"text"}}
METHODS = ("bm25", "dense", "hybrid")


def load_templates(params: Params) -> dict[str, str]:
    """The prompt templates (``rag.templates``/<name>.txt), checked for their placeholders."""
    root = params.path(params.rag.templates)
    templates = {}
    for name, fields in TEMPLATE_FIELDS.items():
        path = root / f"{name}.txt"
        if not path.exists():
            raise LmforgeError(f"prompt template {path} not found (rag.templates: {params.rag.templates})")
        text = path.read_text(encoding="utf-8").rstrip("\n")
        found = {f for _, f, _, _ in string.Formatter().parse(text) if f}
        if found != fields:
            raise LmforgeError(f"prompt template {path}: placeholders {sorted(found)}, expected {sorted(fields)}")
        templates[name] = text
    return templates


def few_shot_prompt(template: str, field: str, examples: list[tuple[str, str]], question: str) -> str:
    """The template filled with each example and its answer, a blank line apart, then the question."""
    shots = "".join(template.format(**{field: text}) + " " + answer + "\n\n" for text, answer in examples)
    return shots + template.format(**{field: question})


def _words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def sample(rows: list, n: int, seed: int) -> list:
    """``n`` rows drawn at random (seeded): task files are grouped by source, so their first rows
    would often hold a single label."""
    return random.Random(seed).sample(rows, min(n, len(rows)))


# --------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------


def corpus_chunks(params: Params) -> list[dict[str, Any]]:
    """Every document of the split stage cut into overlapping word windows, with its provenance."""
    chunks = []
    for split in ("train", "val", "test"):
        for row in load_dataset_dir(params.stage_dir("split") / split, "split").select_columns(["id", "path", "text"]).to_list():
            for i, text in enumerate(chunk_words(row["text"], params.rag.chunk_words, params.rag.overlap_words)):
                chunks.append({"id": f"{row['id']}#{i}", "doc_id": row["id"], "path": row["path"], "split": split, "text": text})
    return chunks


class Retriever:
    """A built index: chunks, BM25, and (when it has an encoder) the dense embeddings and the model."""

    def __init__(self, directory: Path):
        if not (directory / "meta.json").exists():
            raise LmforgeError(f"no retrieval index in {directory}: materialize 'retrieval_index' first")
        self.meta = json.loads((directory / "meta.json").read_text())
        self.chunks = read_jsonl(directory / "chunks.jsonl")
        self.lexical = LexicalIndex.load(directory / "bm25")
        embeddings = np.load(directory / "embeddings.npy") if (directory / "embeddings.npy").exists() else None
        self.embeddings = embeddings if embeddings is not None and embeddings.size else None  # empty: BM25 only
        summary = directory / "summary.json"
        self.best_method = json.loads(summary.read_text())["best_method"] if summary.exists() else "bm25"
        self._encoder = None

    def encoder(self):
        if self._encoder is None:
            from models.generation import load

            self._encoder = load(self.meta["encoder_dir"])[:2]
        return self._encoder

    def rankings(self, queries: list[str], k: int, method: str) -> list[list[int]]:
        method = self.best_method if method == "best" else method
        if method != "bm25" and self.embeddings is None:
            raise LmforgeError("the index has no dense part (rag.encoder: none): use rag.retrieval 'bm25' or 'best'")
        lexical = self.lexical.search(queries, k) if method != "dense" else None
        if method == "bm25":
            return lexical
        model, tokenizer = self.encoder()
        dense = dense_search(self.embeddings, embed(model, tokenizer, queries, self.meta["encoder_max_tokens"]), k)
        if method == "dense":
            return dense
        return [reciprocal_rank_fusion([lex, den], limit=k) for lex, den in zip(lexical, dense)]

    def search(self, queries: list[str], k: int, method: str, exclude=None) -> list[list[dict[str, Any]]]:
        """The ``k`` best chunks per query; ``exclude(query_index, chunk)`` drops e.g. the query's own document."""
        ranked = self.rankings(queries, k + (50 if exclude else 0), method)
        out = []
        for qi, ranking in enumerate(ranked):
            hits = [self.chunks[i] for i in ranking if not (exclude and exclude(qi, self.chunks[i]))]
            out.append(hits[:k])
        return out


def known_items(chunks: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Queries from held-out chunks: one sentence of a val/test chunk; relevant: every chunk holding
    that sentence (neighbouring chunks overlap, so a sentence can live in two)."""
    rng = random.Random(seed)
    held_out = [i for i, c in enumerate(chunks) if c["split"] != "train" and sentences(c["text"])]
    items = []
    for i in rng.sample(held_out, min(n, len(held_out))):
        sentence = rng.choice(sentences(chunks[i]["text"]))
        relevant = sorted(j for j, c in enumerate(chunks) if c["doc_id"] == chunks[i]["doc_id"] and sentence in c["text"])
        items.append({"query": sentence, "chunk": chunks[i]["id"], "relevant": relevant})
    return items


def run_retrieval_index(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    say = ctx.log
    rag = params.rag
    out = fresh_dir(params.stage_dir("retrieval_index"))
    chunks = corpus_chunks(params)
    if not chunks:
        raise LmforgeError("retrieval_index: the split stage holds no text to index")
    write_jsonl(out / "chunks.jsonl", chunks)
    texts = [c["text"] for c in chunks]
    LexicalIndex.build(texts).save(out / "bm25")
    meta: dict[str, Any] = {"chunks": len(chunks), "chunk_words": rag.chunk_words, "overlap_words": rag.overlap_words,
                            "encoder": rag.encoder, "encoder_max_tokens": rag.encoder_max_tokens}
    if rag.encoder == "champion":
        from models.generation import load

        name, model_dir, _ = champion(params)
        model, tokenizer, _ = load(model_dir)
        np.save(out / "embeddings.npy", embed(model, tokenizer, texts, rag.encoder_max_tokens))
        meta.update(encoder_dir=str(model_dir), encoder_champion=name)
    else:  # an empty array: the file exists either way, so DVC's outputs do not depend on the setting
        np.save(out / "embeddings.npy", np.zeros((0, 0), dtype=np.float32))
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    say(f"retrieval_index: {len(chunks)} chunks of {len({c['doc_id'] for c in chunks})} documents "
        f"({'BM25 + dense' if rag.encoder == 'champion' else 'BM25'})")

    retriever = Retriever(out)
    items = known_items(chunks, rag.queries, rag.seed)
    write_jsonl(out / "known_items.jsonl", items)
    summary: dict[str, Any] = {"chunks": len(chunks), "documents": len({c["doc_id"] for c in chunks}), "queries": len(items),
                               "random_recall_at_{}".format(max(rag.recall_at)): max(rag.recall_at) / len(chunks)}
    methods = METHODS if retriever.embeddings is not None else ("bm25",)
    for method in methods:
        ranked = retriever.rankings([it["query"] for it in items], max(rag.recall_at), method)
        for key, value in known_item_metrics(ranked, [set(it["relevant"]) for it in items], rag.recall_at).items():
            summary[f"{method}_{key}"] = value
        say(f"retrieval_index {method}: recall@{max(rag.recall_at)} {summary[f'{method}_recall_at_{max(rag.recall_at)}']:.3f}, MRR {summary[f'{method}_mrr']:.3f}")
    summary["best_method"] = max(methods, key=lambda m: summary[f"{m}_mrr"])
    with tracked_run(params, "retrieval index", {"stage": "retrieval_index", **ctx.tags()}) as (client, run_id):
        log_numbers(client, run_id, summary)
        for key, value in meta.items():
            client.log_param(run_id, key, str(value))
    summary["mlflow_run_id"] = run_id
    write_params(out, rag)
    write_summary(out, summary)
    return summary


# --------------------------------------------------------------------------------------------------
# With and without retrieval
# --------------------------------------------------------------------------------------------------


def _causal(ref: str | Path, what: str):
    from models.generation import load

    model, tokenizer, objective = load(ref)
    if objective != "causal":
        raise LmforgeError(f"{what}: {ref} is a {objective} model; RAG and prompting need a causal language model")
    return model, tokenizer


def rag_context(hits: list[dict[str, Any]], numbered: bool = False) -> str:
    """Retrieved chunks for the template, the best last: next to the question, and the last to go
    when a long prompt is cut from the left to fit the model's context."""
    return "\n\n".join((f"[{n}] " if numbered else "") + h["text"] for n, h in reversed(list(enumerate(hits, 1))))


def with_retrieval(params: Params, prompts: list[str], k: int, tokenizer, max_new_tokens: int) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """Each prompt inside the RAG template with its top-k chunks (numbered, to cite), cut from the left
    to leave ``max_new_tokens`` of the model's context; and those chunks.  What ``lmforge generate --rag`` sends."""
    retriever = Retriever(params.stage_dir("retrieval_index"))
    template = load_templates(params)["rag"]
    hits = retriever.search(prompts, k, params.rag.retrieval)
    filled = [template.format(context=rag_context(h, numbered=True), prompt=q) for q, h in zip(prompts, hits)]
    if tokenizer.model_max_length < 1_000_000:  # retrieved chunks can outgrow the trained context
        filled = [truncate_left(tokenizer, t, tokenizer.model_max_length - max_new_tokens) for t in filled]
    return filled, hits


def run_rag_eval(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Champion perplexity on held-out continuations and SFT ROUGE (when the SFT task is configured),
    each with and without retrieval."""
    say = ctx.log
    rag, templates = params.rag, load_templates(params)
    retriever = Retriever(params.stage_dir("retrieval_index"))
    rng = random.Random(rag.seed)
    max_tokens = params.tokenizer.block_size
    out = params.stage_dir("rag_eval")
    out.mkdir(parents=True, exist_ok=True)

    # 1. held-out continuations: the end of a test chunk after its beginning (± retrieved chunks of other documents)
    name, model_dir, parent = champion(params)
    model, tokenizer = _causal(model_dir, "rag_eval")
    n = rag.continuation_words
    long_enough = [c for c in retriever.chunks if c["split"] == "test" and len(c["text"].split()) >= 2 * n]
    picked = rng.sample(long_enough, min(rag.continuations, len(long_enough)))
    if not picked:
        raise LmforgeError(f"rag_eval: no test chunk has the {2 * n} words of a lead-in and a continuation (rag.continuation_words)")
    # a lead-in as long as the continuation, so that the retrieved chunks have room in the context window
    contexts = [" ".join(c["text"].split()[-2 * n : -n]) for c in picked]
    targets = [" ".join(c["text"].split()[-n:]) for c in picked]
    hits = retriever.search(contexts, rag.top_k, rag.retrieval, exclude=lambda qi, chunk: chunk["doc_id"] == picked[qi]["doc_id"])
    with_context = [templates["rag"].format(context=rag_context(h), prompt=c) for h, c in zip(hits, contexts)]
    summary: dict[str, Any] = {"champion": name, "retrieval": retriever.best_method if rag.retrieval == "best" else rag.retrieval, "top_k": rag.top_k, "continuations": len(picked),
                               "perplexity_without": continuation_perplexity(model, tokenizer, contexts, targets, max_tokens),
                               "perplexity_with": continuation_perplexity(model, tokenizer, with_context, targets, max_tokens)}
    say(f"rag_eval continuations: perplexity {summary['perplexity_without']:.1f} without, {summary['perplexity_with']:.1f} with retrieval")

    # 2. summarisation with the fine-tuned SFT model, when there is one
    skipped = not_configured(params, "sft")
    if skipped:
        summary["summaries_skipped"] = skipped
        say(f"rag_eval summaries: {skipped}")
    examples = [] if skipped else _summaries_with_and_without(params, retriever, templates, summary, say)
    (out / "examples.json").write_text(json.dumps(examples, indent=2, ensure_ascii=False) + "\n")
    (out / "comparison.md").write_text(comparison_table(summary))
    with tracked_run(params, "rag eval", {"stage": "rag_eval", "champion": name, **ctx.tags()}, parent_run_id=parent) as (client, run_id):
        log_numbers(client, run_id, summary)
        client.log_artifact(run_id, str(out / "comparison.md"))
    summary["mlflow_run_id"] = run_id
    write_params(out, rag)
    write_summary(out, summary)
    return summary


def _summaries_with_and_without(params: Params, retriever: Retriever, templates: dict[str, str], summary: dict[str, Any],
                                say) -> list[dict[str, Any]]:
    """ROUGE of the fine-tuned summariser on the summarisation test set, with and without retrieved
    chunks (of other documents), into ``summary``; a few examples side by side."""
    from models.finetune import first_line, rouge, sft_prompt
    from models.generation import generate, has_chat_template

    rag = params.rag
    sft = read_summary(params.stage_dir("finetune_sft"))
    if "skipped" in sft:
        raise LmforgeError(f"rag_eval: finetune_sft was skipped ({sft['skipped']}): materialize 'finetune_sft' again")
    sft_model, sft_tokenizer = _causal(params.stage_dir("finetune_sft") / "models" / sft["best_method"] / "hf", "rag_eval")
    task = params.finetune.sft
    rows = sample(load_task(params, "sft")["test"], rag.eval_examples, rag.seed)
    prompts = [sft_prompt(sft_tokenizer, r["prompt"], task.template, task.max_prompt_tokens) for r in rows]
    own = [r.get("group") or "" for r in rows]
    hits = retriever.search([_words(r["prompt"], 60) for r in rows], rag.top_k, rag.retrieval,
                            exclude=lambda qi, chunk: bool(own[qi]) and Path(chunk["path"]).stem.lower() == own[qi].lower())
    room = params.tokenizer.block_size - task.max_new_tokens
    augmented = [truncate_left(sft_tokenizer, templates["rag"].format(context=rag_context(h), prompt=p), room) for h, p in zip(hits, prompts)]
    greedy = dataclasses.replace(params.evaluate.sampling, temperature=0.0, max_new_tokens=task.max_new_tokens)
    chat = has_chat_template(sft_tokenizer)  # asked as it was fine-tuned: the prompt (with its chunks) as the user's message
    references = [r["response"] for r in rows]
    answers = {label: [first_line(t) for t in generate(sft_model, sft_tokenizer, p, greedy, chat=chat)]
               for label, p in (("without", prompts), ("with", augmented))}
    for label in ("without", "with"):
        for key, value in rouge(answers[label], references).items():
            summary[f"{key}_{label}"] = value
    summary["summaries"] = len(rows)
    summary["sft_method"] = sft["best_method"]
    say(f"rag_eval summaries: ROUGE-L {summary['rougeL_without']:.3f} without, {summary['rougeL_with']:.3f} with retrieval")
    return [{"prompt": p[:300], "retrieved": [x["id"] for x in h], "reference": ref, "without": a, "with": b}
            for p, h, ref, a, b in list(zip(prompts, hits, references, answers["without"], answers["with"]))[:5]]


def comparison_table(summary: dict[str, Any]) -> str:
    """The with/without-retrieval table (the summary table, Dagster metadata); summaries only when the SFT task is configured."""
    rows = [("continuation perplexity (lower is better)", "perplexity")] + [(f"summaries {k}", k) for k in ("rouge1", "rouge2", "rougeL")]
    lines = ["| measure | without retrieval | with retrieval |", "|---|---|---|"]
    for label, key in rows:
        if f"{key}_without" in summary:
            lines.append(f"| {label} | {summary[f'{key}_without']:.3f} | {summary[f'{key}_with']:.3f} |")
    if "summaries_skipped" in summary:
        lines.append(f"| summaries | {summary['summaries_skipped']} | |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Prompt templates and few-shot examples
# --------------------------------------------------------------------------------------------------


class Prompter:
    """Builds task prompts from the templates: zero-shot, or with k examples chosen fixed (the first
    of the train part, labels taking turns) or retrieved (the most similar train examples, BM25)."""

    def __init__(self, params: Params, templates: dict[str, str], task: str, train: list[dict[str, str]]):
        self.shot = params.rag.few_shot
        self.task = task
        self.template, self.field = (templates["classify"], "text") if task == "classification" else (templates["summarise"], "document")
        self.pairs = [(_words(r["text" if task == "classification" else "prompt"], self.shot.example_words),
                      r["label" if task == "classification" else "response"]) for r in train]
        self.fixed = self._interleaved()
        self.index = LexicalIndex.build([text for text, _ in self.pairs]) if self.pairs else None

    def _interleaved(self) -> list[tuple[str, str]]:
        by_answer: dict[str, list] = {}
        for pair in self.pairs:
            by_answer.setdefault(pair[1] if self.task == "classification" else "", []).append(pair)
        turns = itertools.chain.from_iterable(itertools.zip_longest(*by_answer.values()))
        return [p for p in turns if p is not None][: self.shot.k]

    def examples(self, questions: list[str], mode: str) -> list[list[tuple[str, str]]]:
        """The examples shown before each question (none for zero-shot; the most similar last)."""
        if mode == "zero_shot":
            return [[] for _ in questions]
        if mode == "fixed":
            return [self.fixed for _ in questions]
        ranked = self.index.search([_words(q, self.shot.example_words) for q in questions], self.shot.k)
        return [[self.pairs[i] for i in reversed(r)] for r in ranked]

    def render(self, examples: list[tuple[str, str]], question: str) -> str:
        return few_shot_prompt(self.template, self.field, examples, _words(question, self.shot.example_words))

    def prompts(self, questions: list[str], mode: str) -> list[str]:
        return [self.render(ex, q) for ex, q in zip(self.examples(questions, mode), questions)]


def _skipped_tasks(params: Params, say, stage: str) -> dict[str, str]:
    """``<task>_skipped``: the reason, for each task set left out of ``finetune.tasks`` (said as well)."""
    skipped = {f"{task}_skipped": reason for task in TASKS if (reason := not_configured(params, task))}
    for reason in skipped.values():
        say(f"{stage}: {reason}")
    return skipped


def classify_by_likelihood(model, tokenizer, prompts: list[str], content_free: list[str], labels: list[str], max_tokens: int) -> list[int]:
    """The label most likely after each prompt, calibrated (Zhao et al., 2021, "Calibrate before use"):
    each label's mean log-probability per token minus the same after a content-free prompt (the same
    examples, the text "N/A"), so that a label the model favours whatever the text does not win always."""
    def scores(prompt: str) -> np.ndarray:
        return np.array([-loss / n for loss, n in (continuation_loss(model, tokenizer, prompt, label, max_tokens) for label in labels)])

    prior: dict[str, np.ndarray] = {}
    predictions = []
    for prompt, empty in zip(prompts, content_free):
        if empty not in prior:
            prior[empty] = scores(empty)
        predictions.append(int(np.argmax(scores(prompt) - prior[empty])))
    return predictions


def run_prompt_eval(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Zero-shot vs few-shot prompting of the champion on the task sets of ``finetune.tasks`` (test parts)."""
    from models.finetune import classification_metrics, first_line, rouge
    from models.generation import generate

    say = ctx.log
    rag, templates = params.rag, load_templates(params)
    name, model_dir, parent = champion(params)
    model, tokenizer = _causal(model_dir, "prompt_eval")
    max_tokens = params.tokenizer.block_size
    modes = ["zero_shot", *rag.few_shot.selection]
    summary: dict[str, Any] = {"champion": name, "k": rag.few_shot.k, "modes": modes, **_skipped_tasks(params, say, "prompt_eval")}
    examples = []

    if "classification_skipped" not in summary:
        data = load_task(params, "classification")
        labels = params.finetune.classification.labels
        rows = sample(data["test"], rag.eval_examples, rag.seed)
        prompter = Prompter(params, templates, "classification", data["train"])
        targets = [labels.index(r["label"]) for r in rows]
        for mode in modes:
            shown = prompter.examples([r["text"] for r in rows], mode)
            prompts = [prompter.render(ex, r["text"]) for ex, r in zip(shown, rows)]
            predicted = classify_by_likelihood(model, tokenizer, prompts, [prompter.render(ex, "N/A") for ex in shown], labels, max_tokens)
            for key, value in classification_metrics(predicted, targets, len(labels)).items():
                summary[f"classification_{mode}_{key}"] = value
            say(f"prompt_eval classification {mode}: macro-F1 {summary[f'classification_{mode}_macro_f1']:.3f}")
            examples.append({"task": "classification", "mode": mode, "prompt": prompts[0][-600:], "predicted": labels[predicted[0]], "label": rows[0]["label"]})
        summary["classification_best_mode"] = max(modes, key=lambda m: summary[f"classification_{m}_macro_f1"])

    if "sft_skipped" not in summary:
        data = load_task(params, "sft")
        rows = sample(data["test"], rag.eval_examples, rag.seed)
        prompter = Prompter(params, templates, "sft", data["train"])
        greedy = dataclasses.replace(params.evaluate.sampling, temperature=0.0, max_new_tokens=params.finetune.sft.max_new_tokens)
        room = max_tokens - greedy.max_new_tokens
        for mode in modes:
            prompts = [truncate_left(tokenizer, p, room) for p in prompter.prompts([r["prompt"] for r in rows], mode)]
            answers = [first_line(t) for t in generate(model, tokenizer, prompts, greedy)]
            for key, value in rouge(answers, [r["response"] for r in rows]).items():
                summary[f"sft_{mode}_{key}"] = value
            say(f"prompt_eval summaries {mode}: ROUGE-L {summary[f'sft_{mode}_rougeL']:.3f}")
            examples.append({"task": "sft", "mode": mode, "prompt": prompts[0][-600:], "answer": answers[0], "reference": rows[0]["response"]})
        summary["sft_best_mode"] = max(modes, key=lambda m: summary[f"sft_{m}_rougeL"])
    out = params.stage_dir("prompt_eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "examples.json").write_text(json.dumps(examples, indent=2, ensure_ascii=False) + "\n")
    with tracked_run(params, "prompt eval", {"stage": "prompt_eval", "champion": name, **ctx.tags()}, parent_run_id=parent) as (client, run_id):
        log_numbers(client, run_id, summary)
    summary["mlflow_run_id"] = run_id
    write_params(out, rag)
    write_summary(out, summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Sampling sweep
# --------------------------------------------------------------------------------------------------


def sweep_settings(params: Params) -> list[dict[str, float]]:
    """The grid, with greedy decoding once (top-k and top-p do not change an argmax)."""
    sweep = params.rag.sweep
    settings = []
    for t, k, p in itertools.product(sweep.temperature, sweep.top_k, sweep.top_p):
        setting = {"temperature": t, "top_k": 0 if t == 0 else k, "top_p": 1.0 if t == 0 else p}
        if setting not in settings:
            settings.append(setting)
    return settings


def run_sampling_sweep(params: Params, ctx: RunContext = QUIET) -> dict[str, Any]:
    """Each setting generates summaries (ROUGE-L, distinct-2, repetition) and labels (macro-F1) for the
    val parts of the task sets of ``finetune.tasks`` with the registered champion; the best mean of
    ROUGE-L and F1 (of the tasks configured) wins.  Without any task set there is nothing to score:
    the summary says so."""
    from mlflow import MlflowClient
    from models.finetune import classification_metrics, first_line, rouge
    from models.generation import generate

    say = ctx.log
    rag, templates = params.rag, load_templates(params)
    sweep = rag.sweep
    out = params.stage_dir("sampling_sweep")
    out.mkdir(parents=True, exist_ok=True)
    skipped = _skipped_tasks(params, say, "sampling_sweep")
    if len(skipped) == len(TASKS):
        summary = {"skipped": "no task set to score samples on: " + "; ".join(skipped.values())}
        write_params(out, sweep)
        write_summary(out, summary)
        return summary
    registered = read_summary(params.stage_dir("register"))
    name, model_dir, parent = champion(params)
    model, tokenizer = _causal(model_dir, "sampling_sweep")
    room = params.tokenizer.block_size - sweep.max_new_tokens
    if "sft_skipped" not in skipped:
        sft = load_task(params, "sft")
        sft_rows = sample(sft["val"], sweep.examples, rag.seed)
        sft_prompts = [truncate_left(tokenizer, p, room) for p in Prompter(params, templates, "sft", sft["train"]).prompts([r["prompt"] for r in sft_rows], "zero_shot")]
    if "classification_skipped" not in skipped:
        cls = load_task(params, "classification")
        labels = params.finetune.classification.labels
        cls_rows = sample(cls["val"], sweep.examples, rag.seed)
        cls_prompts = Prompter(params, templates, "classification", cls["train"]).prompts([r["text"] for r in cls_rows], "fixed")
    rows = []
    for setting in sweep_settings(params):
        sampling = dataclasses.replace(params.evaluate.sampling, max_new_tokens=sweep.max_new_tokens, **setting)
        row = dict(setting)
        if "sft_skipped" not in skipped:
            summaries = [first_line(t) for t in generate(model, tokenizer, sft_prompts, sampling)]
            row.update(rougeL=rouge(summaries, [r["response"] for r in sft_rows])["rougeL"], distinct_2=distinct_n(summaries),
                       repetition=repetition_rate(summaries))
        if "classification_skipped" not in skipped:
            guesses = [(t.split() or [""])[0].strip(string.punctuation).lower() for t in generate(model, tokenizer, cls_prompts, dataclasses.replace(sampling, max_new_tokens=4))]
            predicted = [labels.index(g) if g in labels else -1 for g in guesses]
            row.update(macro_f1=classification_metrics(predicted, [labels.index(r["label"]) for r in cls_rows], len(labels))["macro_f1"],
                       label_rate=sum(p >= 0 for p in predicted) / len(predicted))
        row["score"] = float(np.mean([row[k] for k in ("rougeL", "macro_f1") if k in row]))
        rows.append(row)
        say("sampling_sweep " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()))
    best = max(rows, key=lambda r: (r["score"], r.get("distinct_2", 0.0)))
    setting = {k: best[k] for k in ("temperature", "top_k", "top_p")}
    cols = list(rows[0])
    (out / "sweep.md").write_text("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
                                  + "".join("| " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |\n" for r in rows))
    client = MlflowClient(tracking_uri(params), registry_uri=tracking_uri(params))
    version = registered["champion_version"]
    client.set_model_version_tag(params.registry.name, version, "sampling_best", json.dumps(setting, sort_keys=True))
    client.set_model_version_tag(params.registry.name, version, "sampling_score", f"{best['score']:.4f}")
    say(f"sampling_sweep: best {setting} (score {best['score']:.3f}) tagged on {params.registry.name} version {version}")
    with tracked_run(params, "sampling sweep", {"stage": "sampling_sweep", "champion": name, **ctx.tags()}, parent_run_id=parent) as (client, run_id):
        for i, row in enumerate(rows):
            for key, value in row.items():
                client.log_metric(run_id, key, value, step=i)
        client.log_artifact(run_id, str(out / "sweep.md"))
    summary = {"champion": name, "settings": len(rows), "best": setting, "best_score": best["score"],
               **{f"best_{k}": best[k] for k in ("rougeL", "macro_f1", "distinct_2", "repetition") if k in best}, **skipped,
               "registered_model": params.registry.name, "tagged_version": version, "mlflow_run_id": run_id, "grid": rows}
    write_params(out, sweep)
    write_summary(out, summary)
    return summary
