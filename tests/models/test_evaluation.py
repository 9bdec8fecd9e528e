"""Evaluation and generation on tiny models: scores against a hand computation, the context curve,
speed, batched/streamed generation, model references (directories and MLflow URIs), the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prose
from typer.testing import CliRunner

from lmforge.params import SamplingParams
from models.architectures import build_model, from_name
from models.data import PackedBlocks, pack_split, write_meta
from models.evaluation import context_curve, lm_scores, speed
from models.generation import ModelNotFound, generate, load, resolve
from models.metrics import token_byte_lengths
from models.objectives import CausalCollator
from models.tokenizer import TokenizerSpec, to_transformers, train_tokenizer
from models.training import special_ids

TEXTS = [prose(i, 80) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    spec = TokenizerSpec(vocab_size=300, min_frequency=1, objectives=("causal", "mlm"))
    to_transformers(train_tokenizer(iter(TEXTS), spec), spec, 64).save_pretrained(str(root))
    return root


def tiny_model(tokenizer_dir: Path, out: Path, **overrides) -> Path:
    """A randomly initialised tiny model saved with the tokenizer (what pretraining exports)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(from_name("tiny", vocab_size=len(tok), **{"max_context": 64, **overrides}), special_ids(tok))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def packed(tokenizer_dir: Path, tmp_path_factory) -> Path:
    import datasets
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("packed")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stats = pack_split(datasets.Dataset.from_dict({"text": TEXTS}), tokenizer_dir / "tokenizer.json", tok.eos_token_id, tok.pad_token_id,
                       16, np.dtype(np.uint16), root / "val.bin")
    write_meta(root, {"block_size": 16, "dtype": "uint16", "pad_id": tok.pad_token_id, "separator_id": tok.eos_token_id,
                      "vocab_size": len(tok), "splits": {"val": stats}})
    return root


def test_scores_of_a_tiny_model_match_a_hand_computation(tokenizer_dir: Path, packed: Path, tmp_path: Path):
    model, tok, objective = load(tiny_model(tokenizer_dir, tmp_path / "m"))
    blocks = PackedBlocks(packed, "val")
    lengths = token_byte_lengths(tok)
    got = lm_scores(model, blocks, CausalCollator(tok.pad_token_id), lengths, objective, batch_size=3, max_blocks=7)
    nll = n = nbytes = correct = 0
    with torch.no_grad():
        for i in range(7):
            ids = blocks[i]
            log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
            for t in range(len(ids) - 1):  # position t predicts token t + 1; padding is not scored
                target = int(ids[t + 1])
                if target == tok.pad_token_id:
                    continue
                nll -= float(log_probs[t, target])
                n += 1
                nbytes += int(lengths[target])
                correct += int(log_probs[t].argmax()) == target
    assert objective == "causal" and got.tokens == n == 7 * 15
    assert math.isclose(got.perplexity, math.exp(nll / n), rel_tol=1e-4)
    assert math.isclose(got.bits_per_byte, nll / math.log(2) / nbytes, rel_tol=1e-4)
    assert got.correct == correct


def test_context_curve_scores_the_same_tokens_and_stops_where_learned_positions_end(tokenizer_dir: Path, packed: Path, tmp_path: Path):
    blocks = PackedBlocks(packed, "val")
    stream = np.asarray(blocks.data[: blocks.tokens])
    rope, tok, _ = load(tiny_model(tokenizer_dir, tmp_path / "rope"))
    lengths = token_byte_lengths(tok)
    curve = context_curve(rope, stream, 16, [1, 2, 4], lengths)
    usable = (len(stream) // 64) * 64
    for m in (1, 2, 4):  # every length covers the same tokens; each sequence's first token is not predicted
        assert curve[m].tokens == usable - usable // (16 * m)
    learned, _, _ = load(tiny_model(tokenizer_dir, tmp_path / "gpt2", position="learned", max_context=32))
    curve = context_curve(learned, stream, 16, [1, 2, 4], lengths)
    assert curve[1] is not None and curve[2] is not None and curve[4] is None  # 64 > 32 positions


def test_speed_is_measured_per_batch_size(tokenizer_dir: Path, tmp_path: Path):
    model, _, objective = load(tiny_model(tokenizer_dir, tmp_path / "m"))
    rows = speed(model, torch.arange(5, 13)[None], [1, 2], new_tokens=4, objective=objective)
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["tokens_per_second"] > 0 and r["latency_ms"] > 0 and r["peak_memory_mb"] >= 0 for r in rows)


def test_batched_generation_equals_one_by_one_and_streams_the_same_text(tokenizer_dir: Path, tmp_path: Path):
    model, tok, _ = load(tiny_model(tokenizer_dir, tmp_path / "m"))
    prompts = ["the model reads", "engineers want lineage from each weight back to", "python"]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    batched = generate(model, tok, prompts, greedy, batch_size=3)  # left padding: the prompts line up at the end
    single = [generate(model, tok, [p], greedy, batch_size=1)[0] for p in prompts]
    assert batched == single and all(batched)
    pieces: dict[int, str] = {}
    streamed = generate(model, tok, prompts, greedy, on_text=lambda i, piece: pieces.__setitem__(i, pieces.get(i, "") + piece))
    assert streamed == batched and [pieces[i] for i in range(3)] == batched
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert generate(model, tok, prompts, sampled) == generate(model, tok, prompts, sampled)  # seeded


def test_model_references_directories_and_mlflow_uris(tokenizer_dir: Path, tmp_path: Path, monkeypatch):
    import mlflow

    model_dir = tiny_model(tokenizer_dir, tmp_path / "m")
    assert resolve(model_dir) == model_dir
    with pytest.raises(ModelNotFound, match="not a model directory"):
        resolve(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("refs", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(model_dir), "model")  # weights logged as artifacts
    ref_run = client.create_run(experiment, tags={"model_dir": str(model_dir)})  # pretraining logs a reference instead
    downloaded = resolve(f"runs:/{run.info.run_id}/model", uri)
    assert (downloaded / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert resolve(f"runs:/{ref_run.info.run_id}", uri) == model_dir
    model, _, objective = load(f"runs:/{run.info.run_id}/model", tracking_uri=uri)
    assert objective == "causal"
    with pytest.raises(ModelNotFound, match="models:/nope@champion"):
        resolve("models:/nope@champion", uri)
    with pytest.raises(ModelNotFound, match="runs:/0123"):
        resolve("runs:/0123", uri)


def test_generate_command(tokenizer_dir: Path, tmp_path: Path, monkeypatch):
    from dagster_project.cli import app

    monkeypatch.setenv("LMFORGE_PARAMS", str(tmp_path / "params.yaml"))
    (tmp_path / "params.yaml").write_text(f"paths: {{artifacts: {tmp_path / 'artifacts'}}}\nmlflow: {{tracking_uri: 'sqlite:///{tmp_path / 'db'}'}}\n")
    model_dir = tiny_model(tokenizer_dir, tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the model reads\n\npython packages\n")
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--model", str(model_dir), "--file", str(prompts), "--temperature", "0", "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["the model reads", "python packages"] and all(r["completion"] for r in rows)
    result = runner.invoke(app, ["generate", "--model", str(model_dir), "the model", "--temperature", "0", "--max-new-tokens", "5"])
    assert result.exit_code == 0 and result.output.startswith("the model") and result.output.strip() != "the model"  # streamed
    result = runner.invoke(app, ["generate", "hello"])
    assert result.exit_code == 1 and "no champion yet" in result.output
    result = runner.invoke(app, ["generate", "--model", str(model_dir), "x", "--top-p", "0"])
    assert result.exit_code == 1 and "top_p" in result.output
    bert = tiny_model(tokenizer_dir, tmp_path / "bert", arch="encoder")
    result = runner.invoke(app, ["generate", "--model", str(bert), "x"])
    assert result.exit_code == 1 and "masked language model" in result.output
