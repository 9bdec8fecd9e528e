"""Quantization, pruning, distillation and the MLflow registry on a tiny champion."""

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_BENCHMARKS, save_tiny_llama, sentence, stop_process_group, tiny_champion, write_params

from lmforge.context import RunContext
from lmforge.params import LmforgeError, load_params
from models.distillation import distillation_loss


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A tiny champion, its packed test/train tokens, its evaluation and a params file, all in tmp_path."""
    import random

    import datasets
    from transformers import AutoTokenizer

    from models.data import pack_split, write_meta

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model_dir = tiny_champion(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    packed = tmp_path / "artifacts/packed/trained"
    packed.mkdir(parents=True)
    rng = random.Random(5)
    splits = {}
    for split, n in (("train", 40), ("test", 12)):
        ds = datasets.Dataset.from_dict({"text": [sentence(rng, __import__("conftest").WORDS, 60) for _ in range(n)]})
        splits[split] = pack_split(ds, model_dir / "tokenizer.json", tok.eos_token_id, tok.pad_token_id, 32, np.dtype(np.uint16), packed / f"{split}.bin")
    write_meta(packed, {"block_size": 32, "dtype": "uint16", "pad_id": tok.pad_token_id, "separator_id": tok.eos_token_id, "vocab_size": len(tok), "splits": splits})
    evaluation = {"checks": {"weights_finite": True, "beats_unigram_baseline": True, "metrics_finite": True},
                  "perplexity": 100.0, "bits_per_byte": 3.0, "token_accuracy": 0.1}
    (tmp_path / "artifacts/evaluate/tiny").mkdir(parents=True)
    (tmp_path / "artifacts/evaluate/tiny/summary.json").write_text(json.dumps(evaluation))
    write_params(tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                 evaluate={"speed_new_tokens": 4, "speed_batch_sizes": [1, 2]},
                 distil={"steps": 12, "batch_size": 4, "warmup_steps": 2, "teacher_precision": "32"}, quantize={"keep_full_precision": []},
                 benchmarks={**TINY_BENCHMARKS, "max_items": 4, "xstest": {"max_prompts": 2, "max_new_tokens": 4}})
    monkeypatch.setenv("LMFORGE_PARAMS", str(tmp_path / "params.yaml"))
    # the benchmark items every model here is gated on, and the champion's scores (what benchmark_eval writes)
    from lmforge.benchdata import run_benchmark_data

    datasets.Dataset.from_dict({"id": ["d0"], "text": [sentence(rng, __import__("conftest").WORDS, 60)]}).save_to_disk(
        str(tmp_path / "artifacts/split/train"))
    run_benchmark_data(load_params())
    (tmp_path / "artifacts/benchmark_eval/tiny").mkdir(parents=True)
    (tmp_path / "artifacts/benchmark_eval/tiny/summary.json").write_text(json.dumps({"checks": {}, "bench_accuracy": 0.25}))
    return tmp_path


def test_quantized_variants_are_smaller_measured_and_loadable(project: Path):
    from lmforge.compress import run_quantize
    from models.generation import load

    summary = run_quantize(load_params())
    rows = summary["variants"]
    assert rows["fp32"]["linear_size_ratio"] == 1.0
    assert rows["int8_dynamic"]["linear_size_ratio"] > 3.5 and rows["int8_weight_only"]["linear_size_ratio"] > 3.5  # int8 vs fp32
    assert math.isclose(rows["bf16"]["linear_size_ratio"], 2.0, rel_tol=1e-6)
    assert rows["onnx_int8"]["linear_size_ratio"] > 3.5  # int8 blocks and their scales, in ONNX Runtime's graph
    for variant in ("bf16", "fp16", "int8_dynamic", "int8_weight_only", "onnx_int8"):
        assert abs(rows[variant]["perplexity_increase"]) < 0.02, (variant, rows[variant])
        assert rows[variant]["tokens_per_second_b2"] > 0 and rows[variant]["disk_bytes"] < rows["fp32"]["disk_bytes"]
        model, tok, _ = load(project / "artifacts/quantize/models" / variant)
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tok)
        assert summary["benchmark_gates"][variant]["passed"] in (True, False)  # scored on the benchmarks like the others
    assert "int4_weight_only" in rows or summary["unsupported"]["int4_weight_only"]  # measured, or said why not
    for variant in rows:  # the median round's ratio lies within the rounds' spread
        assert all(rows[variant][f"speedup_b{b}_min"] <= rows[variant][f"speedup_b{b}"] <= rows[variant][f"speedup_b{b}_max"] for b in (1, 2))
    assert summary["chosen"] and summary["chosen_because"] and len(summary["speedup_spread_b2"]) == 2
    table = (project / "artifacts/quantize/variants.md").read_text()
    assert "| int8_dynamic |" in table


def test_the_quantized_variant_is_the_fastest_beyond_the_spread_else_the_smallest():
    from lmforge.compress import choose

    def row(size: int, b1: tuple[float, float, float], b8: tuple[float, float, float]) -> dict:
        return {"linear_weight_bytes": size, **{f"speedup_b{b}{k}": v for b, r in ((1, b1), (8, b8)) for k, v in zip(("_min", "", "_max"), r)}}

    rows = {"bf16": row(50, (1.3, 1.4, 1.5), (1.5, 1.6, 1.9)), "int8": row(25, (0.5, 0.55, 0.6), (0.7, 0.8, 0.9)),
            "noisy": row(40, (0.9, 2.0, 3.0), (1.1, 2.5, 5.4))}  # fast by its median, but one round slower than fp32
    assert choose(rows, ["bf16", "int8", "noisy"], [1, 8]) == ("bf16", "fastest beyond the spread")
    assert choose(rows, ["int8", "noisy"], [1, 8]) == ("int8", "smallest (none faster beyond the spread)")
    assert choose(rows, [], [1, 8])[0] is None


def test_models_are_timed_in_alternating_rounds():
    from models.evaluation import speed_side_by_side

    calls = []

    class Recorder:
        """Stands in for a model: records which one generates, in which order."""
        device = torch.device("cpu")
        config = type("Config", (), {"pad_token_id": 0})()

        def __init__(self, name):
            self.name = name

        def eval(self):
            return self

        def generate(self, input_ids, **kw):
            calls.append((self.name, input_ids.shape[0]))

    timings = speed_side_by_side({"a": Recorder("a"), "b": Recorder("b")}, torch.tensor([[1, 2, 3]]), [1, 4], 2, rounds=3)
    assert calls == [("a", 1), ("b", 1)] + [("a", 1), ("b", 1)] * 3 + [("a", 4), ("b", 4)] + [("a", 4), ("b", 4)] * 3  # warm-ups, then rounds
    assert all(len(timings[m][b]["tokens_per_second"]) == 3 for m in "ab" for b in (1, 4))


def test_int8_dynamic_keeps_the_layers_the_patterns_name_in_full_precision(project: Path, tmp_path: Path):
    from models.generation import load
    from models.quantization import RECIPE, quantize

    source = project / "artifacts/pretrain/tiny/hf"
    quantize(source, "int8_dynamic", tmp_path / "q", ("*down_proj",))
    kept = json.loads((tmp_path / "q" / RECIPE).read_text())["keep_full_precision"]
    assert kept and all(name.endswith("down_proj") or name == "lm_head" for name in kept)
    model, _, _ = load(tmp_path / "q")
    for name in kept:
        assert type(model.get_submodule(name)) is torch.nn.Linear  # fp32, rebuilt from the recipe
    quantized = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert quantized and all(m.weight().qscheme() == torch.per_channel_affine for m in quantized)


def test_no_variant_within_the_threshold_fails_the_check(project: Path, monkeypatch):
    from lmforge.compress import run_quantize

    params = load_params()
    params.quantize.max_perplexity_increase = -1.0  # nothing can be better than the original by 100%
    params.quantize.variants = ["bf16"]
    assert run_quantize(params)["chosen"] is None


def test_pruning_reaches_the_sparsity(project: Path):
    from lmforge.compress import run_prune

    summary = run_prune(load_params())
    assert math.isclose(summary["variants"]["unstructured"]["sparsity"], 0.3, abs_tol=0.01)
    assert math.isclose(summary["variants"]["structured"]["sparsity"], 0.3, abs_tol=0.02)
    assert summary["variants"]["dense"]["perplexity_increase"] == 0.0


def test_distillation_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert torch.isclose(distillation_loss(logits, None, labels, 2.0, 0.5), ce)
    assert torch.isclose(distillation_loss(logits, logits, labels, 2.0, 0.5), 0.5 * ce, atol=1e-6)  # KL(p‖p) = 0
    assert distillation_loss(logits, torch.randn(2, 5, 11), labels, 2.0, 0.5) > 0.5 * ce


def test_distil_compares_with_the_same_student_from_scratch(project: Path):
    from lmforge.compress import run_distil

    summary = run_distil(load_params())
    assert summary["student_parameters"] > 0 and summary["teacher_parameters"] > 0
    assert {"distilled_perplexity", "from_scratch_perplexity", "beats_from_scratch"} <= set(summary)
    assert (project / "artifacts/distil/models/distilled/config.json").exists()
    assert summary["teacher_precision"] == "32"  # pinned above: the same numbers on every machine


def test_registry_versions_aliases_and_lookups(project: Path):
    from typer.testing import CliRunner

    import mlflow
    from dagster_project.cli import app
    from lmforge.registry import describe_versions, run_register

    params = load_params()
    first = run_register(params, RunContext(run_id="run-1"))
    assert first["promoted"] and first["candidate_version"] == "1"
    assert run_register(params)["candidate_version"] == "1"  # the same weights are not registered twice
    # a worse model on the same data becomes a candidate, not the champion
    config = project / "artifacts/pretrain/tiny/hf/config.json"
    config.write_text(config.read_text() + "\n")  # other bytes: stands in for a retrained model
    evaluation = project / "artifacts/evaluate/tiny/summary.json"
    worse = {**json.loads(evaluation.read_text()), "bits_per_byte": 3.5}
    evaluation.write_text(json.dumps(worse))
    second = run_register(params)
    assert not second["promoted"] and second["champion_version"] == "1"
    rows = {r["version"]: r for r in describe_versions(params)}
    assert rows["2"]["aliases"] == ["candidate"] and rows["1"]["aliases"] == ["champion"]
    assert {"git_sha", "dvc_data_md5", "dagster_run_id", "params", "bits_per_byte", "candidate"} <= set(rows["1"]["tags"])
    assert rows["1"]["tags"]["dagster_run_id"] == "run-1"
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_model_version("lmforge", "1").tags["kind"] == "pretrained"
    # a champion that failed a check is never registered
    evaluation.write_text(json.dumps({**worse, "checks": {"weights_finite": False}}))
    with pytest.raises(LmforgeError, match="failed check.*weights_finite: nothing registered"):
        run_register(params)
    runner = CliRunner()
    listed = runner.invoke(app, ["registry", "list"])
    assert listed.exit_code == 0 and "models:/lmforge/1 @champion" in listed.output and "models:/lmforge/2 @candidate" in listed.output
    shown = runner.invoke(app, ["registry", "show", "lmforge@champion"])
    assert shown.exit_code == 0 and "models:/lmforge/1  aliases: champion" in shown.output and "bits_per_byte: 3.0" in shown.output
    assert runner.invoke(app, ["registry", "show", "lmforge@nothing"]).exit_code == 1
    generated = runner.invoke(app, ["generate", "-m", "models:/lmforge@champion", "the model", "--temperature", "0", "--max-new-tokens", "3", "--json"])
    assert generated.exit_code == 0 and json.loads(generated.output.strip().splitlines()[-1])["prompt"] == "the model"


def test_the_quantized_alias_points_at_the_quantized_champion(project: Path):
    from lmforge.compress import run_quantize
    from lmforge.registry import describe_versions, run_register, run_register_quantized

    params = load_params()
    params.quantize.variants = ["int8_dynamic"]
    run_quantize(params)
    run_register(params)
    summary = run_register_quantized(params)
    rows = {r["version"]: r for r in describe_versions(params)}
    assert rows[summary["quantized_version"]]["aliases"] == ["quantized"]
    assert rows[summary["quantized_version"]]["tags"]["variant"] == "int8_dynamic" and summary["base_version"] == "1"


@pytest.mark.slow  # llama.cpp's converter 4 times, two ONNX builds, each file read back and scored: ~40 s
def test_export_writes_gguf_files_that_read_back_to_the_same_model(project: Path):
    """llama.cpp's converter on the tiny champion (lmforge's own byte-level BPE, which llama.cpp's list does not
    hold): f32 reads back to the same perplexity, Q8_0 and the 4-bit type within tolerance, tagged on the registry."""
    import gguf

    import mlflow
    from lmforge.export import run_export
    from lmforge.fetch import sha256_file
    from lmforge.registry import run_register
    from models.checksums import weights_sha256

    params = load_params()
    params.export.types, params.export.onnx = ["f32", "q8_0", "q4_1"], []
    params.export.max_perplexity_increase = {"f32": 1e-5, "q8_0": 0.01, "q4_1": 0.5, "onnx_fp32": 1e-4, "onnx_int8": 0.5}
    config = project / "artifacts/pretrain/tiny/hf/config.json"
    gelu = json.loads(config.read_text())
    run_register(params)
    # the tiny preset's Llama has a GELU MLP: llama.cpp's llama has SiLU only, and the file would read back as another model
    refused = run_export(params)
    assert not refused["passed"] and "hidden_act: gelu → silu" in refused["unsupported"] and not refused["files"], refused
    assert not list((project / "artifacts/export/gguf").iterdir())
    config.write_text(json.dumps({**gelu, "hidden_act": "silu"}))
    run_register(params)
    params.export.onnx = ["fp32", "int8"]
    summary = run_export(params, RunContext(run_id="run-x"))
    assert summary["passed"] and set(summary["files"]) == {"f32", "q8_0", "q4_1", "onnx_fp32", "onnx_int8"}, summary
    assert abs(summary["files"]["f32"]["perplexity_increase"]) < 1e-5  # the tensor layout (e.g. llama.cpp's rope order) round-trips
    q4 = project / "artifacts/export" / summary["files"]["q4_1"]["file"]
    reader = gguf.GGUFReader(q4)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tags = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version("lmforge", summary["version"]).tags
    assert tags["gguf_q4_1_sha256"] == sha256_file(q4) == summary["files"]["q4_1"]["sha256"]
    assert tags["gguf_q8_0_uri"].startswith(f"runs:/{summary['mlflow_run_id']}/gguf/")
    # ONNX Runtime reads the fp32 ONNX model back to the same perplexity (the graph is the same model), and
    # the onnx engine finds the int8 one on the registry version
    assert abs(summary["files"]["onnx_fp32"]["perplexity_increase"]) < 1e-4
    onnx_int8 = project / "artifacts/export" / summary["files"]["onnx_int8"]["file"]
    assert (onnx_int8 / "genai_config.json").is_file() and tags["onnx_int8_sha256"] == weights_sha256(onnx_int8)
    from lmforge.serve import onnx_model

    found = onnx_model(f"models:/lmforge/{summary['version']}", project / "unused", "int8", f"sqlite:///{project / 'mlflow.db'}")
    assert weights_sha256(found) == tags["onnx_int8_sha256"]


def test_the_onnx_graph_generates_what_transformers_generates(tmp_path: Path, monkeypatch):
    """``OnnxCausalLM.generate`` over the fp32 graph, for a left-padded batch of prompts of different
    lengths: PyTorch's greedy tokens, and each row's tokens as alone (its rows are padded on the right
    inside, ``KVBatch``); sampled with a seed, the same tokens again.  A second build of the same model
    is a copy of the first, from the cache of builds, with no builder run."""
    from models.checksums import weights_sha256
    from models.loading import load_model
    from models.onnx_genai import OnnxCausalLM, build

    source = save_tiny_llama(tmp_path / "llama", heads=2)
    build(source, tmp_path / "onnx", "fp32")
    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"the builder ran again: {a}"))
        build(source, tmp_path / "again", "fp32")
    assert weights_sha256(tmp_path / "again") == weights_sha256(tmp_path / "onnx")
    reference = load_model(source, "causal").eval()
    onnx = OnnxCausalLM(tmp_path / "onnx", reference.config)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    ids = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (7 - len(p)) + [1] * len(p) for p in prompts])
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, temperature=None, top_k=None, top_p=None)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, **greedy)
    together = onnx.generate(input_ids=ids, attention_mask=mask, **greedy)
    assert torch.equal(together, expected)
    for i, prompt in enumerate(prompts):
        alone = onnx.generate(input_ids=torch.tensor([prompt]), **greedy)[0, len(prompt):]
        assert torch.equal(alone, together[i, 7 : 7 + len(alone)])
    sampled = []
    for _ in range(2):
        torch.manual_seed(3)
        sampled.append(onnx.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9, pad_token_id=0))
    assert torch.equal(*sampled) and not torch.equal(sampled[0][:, 7:], together[:, 7:15])


def test_export_refuses_a_tokenizer_llama_cpp_cannot_reproduce(project: Path, tmp_path: Path):
    from lmforge.export import convert

    params = load_params()
    model = project / "artifacts/pretrain/tiny/hf"
    other = tmp_path / "whitespace"
    shutil.copytree(model, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(LmforgeError, match="does not know the pre-tokenizer.*cannot be exported to GGUF"):
        convert(params.path(params.export.converter_dir), other, tmp_path / "out.gguf", "q8_0")
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(LmforgeError, match="converter is not in .*lmforge fetch-converter"):
        convert(tmp_path / "nowhere", model, tmp_path / "out.gguf", "q8_0")


@pytest.mark.slow
def test_mlflow_serves_the_champion_over_http(project: Path):
    from lmforge.registry import run_register

    run_register(load_params())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(REPO / ".venv/bin/mlflow"), "models", "serve", "-m", "models:/lmforge@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)  # its own process group: the server runs uvicorn as a child
    try:
        body = json.dumps({"inputs": ["the model", "python"], "params": {"temperature": 0.0, "max_new_tokens": 4}}).encode()
        deadline = time.time() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    predictions = json.loads(response.read())["predictions"]
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()[-2000:] if server.poll() is not None else "timeout"
                time.sleep(1)
        assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
    finally:
        stop_process_group(server)
