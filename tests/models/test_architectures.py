"""The model zoo: every family trains a step and survives save/reload; bad configs name the field."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures import (
    PRESETS,
    ArchConfig,
    ArchConfigError,
    SpecialIds,
    build_model,
    flops_per_token,
    from_name,
    model_class,
    parameter_count,
)

IDS = SpecialIds(pad=0, bos=1, eos=2)
VARIANTS = {
    "gpt2": dict(position="learned"),
    "llama": {},
    "llama-mqa": dict(n_kv_head=1),
    "llama-gqa": dict(n_kv_head=2),
    "mistral": dict(window=8),
    "mixtral": dict(n_experts=4, experts_per_token=2),
    "bloom": dict(position="alibi"),
    "bert": dict(arch="encoder"),
    "t5": dict(arch="encoder-decoder"),
}


def micro(**overrides) -> ArchConfig:
    return from_name("tiny", vocab_size=300, max_context=32, **overrides)


def batch_for(cfg: ArchConfig) -> dict:
    torch.manual_seed(0)
    x = torch.randint(3, cfg.vocab_size, (2, 16))
    if cfg.arch == "encoder":
        return {"input_ids": x, "labels": x, "next_sentence_label": torch.tensor([0, 1])}
    return {"input_ids": x, "labels": x}


@pytest.mark.parametrize("name", VARIANTS)
def test_each_family_runs_forward_backward_and_reloads_identically(tmp_path: Path, name: str):
    cfg = micro(**VARIANTS[name])
    expected = {"gpt2": "gpt2", "llama-mqa": "llama", "llama-gqa": "llama", "bert": "bert", "t5": "t5"}.get(name, name)
    assert cfg.family == expected
    model = build_model(cfg, IDS)
    out = model(**batch_for(cfg))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad and p.grad is not None)
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = model_class(cfg).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = model(**batch_for(cfg)).logits if cfg.arch != "encoder" else model(**batch_for(cfg)).prediction_logits
        b = reloaded(**batch_for(cfg)).logits if cfg.arch != "encoder" else reloaded(**batch_for(cfg)).prediction_logits
    assert torch.equal(a, b)
    assert (tmp_path / "model.safetensors").exists()
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    assert flops_per_token(cfg) > 6 * 0  # computed for every config


def test_every_objective_loads_with_its_auto_class(tmp_path: Path):
    """models.loading reads the objective from the saved config and opens it with its head (an
    encoder trained as BertForPreTraining loads its MLM part)."""
    from models.loading import load_model

    for arch, loaded in (("decoder", "LlamaForCausalLM"), ("encoder", "BertForMaskedLM"), ("encoder-decoder", "T5ForConditionalGeneration")):
        build_model(micro(arch=arch), IDS).save_pretrained(tmp_path / arch)
        assert type(load_model(tmp_path / arch)).__name__ == loaded


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses_counts_and_runs_at_micro_size(preset: str):
    cfg = from_name(preset)
    n = parameter_count(cfg)  # on the meta device: no memory even for 1b
    assert flops_per_token(cfg, n) > 6 * (n - cfg.vocab_size * cfg.d_model) - 1
    if preset == "tiny":
        assert n < 1_000_000
    shrunk = cfg.replace(n_layer=1, d_model=32, n_head=4, n_kv_head=4 if cfg.n_kv_head == cfg.n_head else 1, d_ff=64, vocab_size=128, max_context=16)
    model = build_model(shrunk, IDS)
    model(input_ids=torch.randint(0, 128, (1, 8)), labels=torch.randint(0, 128, (1, 8))).loss.backward()


def test_sizes_grow_with_the_presets():
    counts = [parameter_count(from_name(p)) for p in ("tiny", "cpu-small", "125m", "350m", "1b")]
    assert counts == sorted(counts) and 100e6 < counts[2] < 150e6 and 0.9e9 < counts[4] < 1.2e9


def test_moe_flops_count_only_the_active_experts():
    dense, moe = micro(), micro(n_experts=8, experts_per_token=2)
    assert parameter_count(moe) > 3 * parameter_count(dense)
    assert flops_per_token(moe) < 2 * flops_per_token(dense)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=60, n_head=8), "n_head"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(position="alibi", n_kv_head=1), "n_kv_head"),
        (dict(arch="encoder", window=8), "window"),
        (dict(position="alibi", d_ff=100), "d_ff"),
        (dict(arch="encoder-decoder", position="rope"), "position"),
        (dict(n_experts=2, experts_per_token=3), "experts_per_token"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_configs_name_the_field(overrides: dict, field: str):
    with pytest.raises(ArchConfigError, match=rf"^{field}:"):
        micro(**overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ArchConfigError, match="preset: unknown preset 'cpu-smal' \\(did you mean 'cpu-small'\\?\\)"):
        from_name("cpu-smal")
    with pytest.raises(ArchConfigError, match="^n_heads: not an architecture field \\(did you mean 'n_head'\\?\\)"):
        from_name("tiny", n_heads=4)


def test_within_one_gguf_load_each_file_is_parsed_once_and_the_library_is_left_as_it_was(tmp_path: Path):
    """transformers opens a GGUF file for the config, the tokenizer and the weights: one parse serves all three."""
    import gguf

    from models.loading import gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.license", "mit")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and first.fields["general.license"].contents() == "mit"
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    assert gguf.GGUFReader(path) is not first
