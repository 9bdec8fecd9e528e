"""Retrieval, RAG, prompt templates and the sampling sweep: the pieces against known values, then the
whole `rag` group on a tiny project (corpus, champion, task sets, registry)."""

import json
import math
import random
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from conftest import REPO, TINY_DOWNSTREAM, WORDS, prose, tiny_champion, write_params, write_task_sets
from typer.testing import CliRunner

import mlflow
from dagster_project.cli import app
from lmforge.artifacts import save_dataset
from lmforge.params import LmforgeError, ParamsError, load_params, params_file
from models.retrieval import (
    LexicalIndex,
    chunk_words,
    continuation_perplexity,
    distinct_n,
    known_item_metrics,
    reciprocal_rank_fusion,
    repetition_rate,
    sentences,
)


def test_chunks_cover_every_word_with_the_overlap():
    words = [f"w{i}" for i in range(25)]
    chunks = chunk_words(" ".join(words), size=10, overlap=3)
    assert [c.split()[0] for c in chunks] == ["w0", "w7", "w14", "w21"]
    assert all(len(c.split()) == 10 for c in chunks[:-1]) and chunks[-1].split()[-1] == "w24"
    assert chunks[0].split()[-3:] == chunks[1].split()[:3]  # neighbours share the overlap
    assert chunk_words("short text", 10, 3) == ["short text"] and chunk_words("  ", 10, 3) == []
    with pytest.raises(ValueError, match="overlap"):
        chunk_words("a b", 5, 5)
    assert sentences("One two. Three four five six seven eight! Nine?", min_words=3) == ["Three four five six seven eight!"]


def test_known_item_metrics_and_rank_fusion_by_hand():
    rankings = [[4, 1, 2], [0, 3, 9], [7, 8, 5]]
    relevant = [{1}, {0, 3}, {6}]
    metrics = known_item_metrics(rankings, relevant, ks=[1, 2])
    assert metrics == {"recall_at_1": 1 / 3, "recall_at_2": 2 / 3, "mrr": (1 / 2 + 1 + 0) / 3}
    # 2 is second in one list and first in the other; 1 and 3 appear once
    assert reciprocal_rank_fusion([[1, 2], [2, 3]], k=60) == [2, 1, 3]


def test_bm25_finds_the_document_with_the_query_words(tmp_path):
    texts = ["the tokenizer splits words into pieces", "gradient descent lowers the training loss", "checkpoints resume interrupted training"]
    index = LexicalIndex.build(texts)
    assert index.search(["how does gradient descent work"], 3)[0][0] == 1
    index.save(tmp_path / "bm25")
    reloaded = LexicalIndex.load(tmp_path / "bm25")
    assert reloaded.search(["resume checkpoints", "zebra"], 2) == [[2], []]  # no shared word: nothing, not noise


def test_diversity_measures_known_values():
    assert distinct_n(["a b a b"], 2) == 2 / 3  # bigrams ab, ba, ab
    assert repetition_rate(["x y z x y z"], 3) == 1 - 3 / 4 and repetition_rate(["a b c d"], 3) == 0.0


def test_continuation_perplexity_scores_only_the_continuation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_champion(tmp_path)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    prompt, continuation = "the model reads documents", "before cleaning every stage"
    context = tok(prompt, add_special_tokens=False)["input_ids"]
    target = tok(" " + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + target])).logits[0]
    nll = -sum(torch.log_softmax(logits[len(context) - 1 + i], -1)[t].item() for i, t in enumerate(target))
    assert math.isclose(continuation_perplexity(model, tok, [prompt], [continuation], 128), math.exp(nll / len(target)), rel_tol=1e-4)


@pytest.fixture
def rag_project(tmp_path: Path, monkeypatch) -> Path:
    """Split datasets of distinct documents, a tiny champion, validated task sets and a params file."""
    from lmforge.benchdata import run_benchmark_data
    from lmforge.finetune import run_task_data

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rng = random.Random(3)
    for split, n in (("train", 30), ("val", 8), ("test", 8)):
        rows = [{"id": f"{split}{i}", "path": f"{split}/doc{i}.txt",
                 "text": f"Document {split}{i} is about {rng.choice(WORDS)} {rng.choice(WORDS)}. " + prose(hash((split, i)) % 10_000, 90)}
                for i in range(n)]
        save_dataset(datasets.Dataset.from_list(rows), tmp_path / "artifacts/split" / split)
    tiny_champion(tmp_path)
    write_task_sets(tmp_path / "finetune", classification=60, sft=40)
    params = write_params(tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, tokenizer={"block_size": 128},
                          **{**TINY_DOWNSTREAM, "rag": {**TINY_DOWNSTREAM["rag"], "queries": 30, "continuations": 8,
                                                        "sweep": {**TINY_DOWNSTREAM["rag"]["sweep"], "top_k": [0, 20]}}})
    monkeypatch.setenv("LMFORGE_PARAMS", str(params))
    run_task_data(load_params())
    run_benchmark_data(load_params())  # the items finetune_sft gates its model on
    return tmp_path


def test_the_rag_group_on_a_tiny_project(rag_project: Path):
    from lmforge.finetune import run_finetune_sft
    from lmforge.rag import Retriever, run_prompt_eval, run_rag_eval, run_retrieval_index, run_sampling_sweep
    from lmforge.registry import run_register

    params = load_params()
    with pytest.raises(LmforgeError, match="materialize 'retrieval_index' first"):
        Retriever(params.stage_dir("retrieval_index"))
    index = run_retrieval_index(params)
    art = rag_project / "artifacts/retrieval_index"
    chunks = [json.loads(line) for line in (art / "chunks.jsonl").read_text().splitlines()]
    assert index["chunks"] == len(chunks) and index["documents"] == 46 and {c["split"] for c in chunks} == {"train", "val", "test"}
    assert index["queries"] == 30 and index["bm25_recall_at_10"] > 0.8  # known items: a held-out chunk's own sentence finds it
    assert {"dense_mrr", "hybrid_mrr"} <= set(index) and index["best_method"] in ("bm25", "dense", "hybrid")
    items = [json.loads(line) for line in (art / "known_items.jsonl").read_text().splitlines()]
    by_id = {c["id"]: c for c in chunks}
    assert all(it["query"] in by_id[it["chunk"]]["text"] and by_id[it["chunk"]]["split"] != "train" for it in items)
    # the retriever leaves out what it is told to (the query's own document)
    retriever = Retriever(art)
    hits = retriever.search(["Document test3 is about"], 3, "bm25", exclude=lambda _qi, c: c["doc_id"] == "test3")
    assert hits[0] and all(h["doc_id"] != "test3" for h in hits[0])

    # generation with retrieval cites the chunks it used
    runner = CliRunner()
    out = runner.invoke(app, ["generate", "--rag", "--json", "--chunks", "2", "--temperature", "0", "--max-new-tokens", "4", "Document train5 is about"])
    assert out.exit_code == 0, out.output
    record = json.loads(out.output.strip().splitlines()[-1])
    assert record["prompt"] == "Document train5 is about" and len(record["sources"]) == 2 and record["sources"][0]["id"].startswith("train5#")

    run_finetune_sft(params)
    rag = run_rag_eval(params)
    assert {"perplexity_without", "perplexity_with", "rougeL_without", "rougeL_with"} <= set(rag) and rag["continuations"] == 8
    assert "| continuation perplexity" in (rag_project / "artifacts/rag_eval/comparison.md").read_text()
    prompts = run_prompt_eval(params)
    assert prompts["modes"] == ["zero_shot", "fixed", "retrieved"]
    assert all(0 <= prompts[f"classification_{m}_macro_f1"] <= 1 and f"sft_{m}_rougeL" in prompts for m in prompts["modes"])

    evaluation = rag_project / "artifacts/evaluate/tiny"
    evaluation.mkdir(parents=True)
    (evaluation / "summary.json").write_text(json.dumps({"checks": {"metrics_finite": True}, "perplexity": 100.0, "bits_per_byte": 3.0}))
    (rag_project / "artifacts/benchmark_eval/tiny").mkdir(parents=True)  # what benchmark_eval writes, read by register
    (rag_project / "artifacts/benchmark_eval/tiny/summary.json").write_text(json.dumps({"checks": {}, "bench_accuracy": 0.25}))
    run_register(params)
    sweep = run_sampling_sweep(params)
    assert sweep["settings"] == 3  # greedy once, then 0.9 × top-k {0, 20}
    client = mlflow.MlflowClient(params.mlflow.tracking_uri, registry_uri=params.mlflow.tracking_uri)
    tags = client.get_model_version("lmforge", sweep["tagged_version"]).tags
    assert json.loads(tags["sampling_best"]) == sweep["best"] and float(tags["sampling_score"]) == pytest.approx(sweep["best_score"], abs=1e-4)


def test_template_and_params_mistakes_are_clear(rag_project: Path, tmp_path: Path):
    from lmforge.rag import few_shot_prompt, load_templates, sweep_settings

    params = load_params()
    assert few_shot_prompt("Q: {text}\nA:", "text", [("one", "1")], "two") == "Q: one\nA: 1\n\nQ: two\nA:"
    assert sweep_settings(params)[0] == {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    bad = tmp_path / "templates"
    bad.mkdir()
    for name in ("rag", "summarise"):
        (bad / f"{name}.txt").write_text((REPO / "prompts" / f"{name}.txt").read_text())
    (bad / "classify.txt").write_text("Text: {txt}\nKind:")
    params.rag.templates = str(bad)
    with pytest.raises(LmforgeError, match=r"classify.txt: placeholders \['txt'\], expected \['text'\]"):
        load_templates(params)
    data = yaml.safe_load(params_file().read_text())
    data["rag"]["continuation_words"] = 30  # 2 × 30 words do not fit chunks of 40
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match="2 × continuation_words"):
        load_params(tmp_path / "bad.yaml")


def test_the_rag_group_without_the_sft_task(rag_project: Path):
    """Classification only: rag_eval scores continuations and says the summaries are not configured,
    prompt_eval and the sweep score labels only; with no task at all the sweep says there is nothing to score."""
    from lmforge.finetune import run_task_data
    from lmforge.rag import comparison_table, run_prompt_eval, run_rag_eval, run_retrieval_index, run_sampling_sweep
    from lmforge.report import rows as report_rows

    data = yaml.safe_load(params_file().read_text())
    data["finetune"]["tasks"] = ["classification"]
    params_file().write_text(yaml.safe_dump(data))
    params = load_params()
    run_task_data(params)
    run_retrieval_index(params)
    reason = "sft is not configured (finetune.tasks: classification)"
    rag = run_rag_eval(params)
    assert rag["summaries_skipped"] == reason and "rougeL_with" not in rag and rag["perplexity_with"] > 0
    assert comparison_table(rag).splitlines()[-1] == f"| summaries | {reason} | |"
    prompts = run_prompt_eval(params)
    assert prompts["sft_skipped"] == reason and "sft_best_mode" not in prompts and prompts["classification_best_mode"] in prompts["modes"]

    client = mlflow.MlflowClient(params.mlflow.tracking_uri, registry_uri=params.mlflow.tracking_uri)
    client.create_registered_model("lmforge")
    version = client.create_model_version("lmforge", source=str(rag_project / "artifacts/pretrain/tiny/hf")).version
    (rag_project / "artifacts/register").mkdir(parents=True)
    registered = {"registered_model": "lmforge", "candidate_version": version, "champion_version": version}
    (rag_project / "artifacts/register/summary.json").write_text(json.dumps(registered))
    sweep = run_sampling_sweep(params)
    assert sweep["sft_skipped"] == reason and "best_rougeL" not in sweep and sweep["best_score"] == sweep["best_macro_f1"]
    table = {stage: text for stage, _item, text in report_rows(params)}
    assert table["rag_eval"].endswith(reason) and table["prompt_eval"].endswith(reason)

    data["finetune"]["tasks"] = []
    params_file().write_text(yaml.safe_dump(data))
    assert run_sampling_sweep(load_params()) == {"skipped": "no task set to score samples on: classification is not configured "
                                                 "(finetune.tasks: none); sft is not configured (finetune.tasks: none)"}
