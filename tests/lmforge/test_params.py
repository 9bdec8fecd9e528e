"""params.yaml into typed Params: defaults, typos and bad values as clear errors, the params file from the environment, overrides."""

from pathlib import Path

import pytest

from lmforge.params import REPO_ROOT, Params, ParamsError, load_params, with_overrides


def test_repo_params_load_with_documented_defaults():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.clean.steps[0] == "fix_mojibake"
    assert (params.split.train, params.split.val, params.split.test) == (0.9, 0.05, 0.05)
    assert params.ingest.sources[0].path is None
    # every stage section of the file parses to the same values as the dataclass defaults
    assert params.clean == Params().clean and params.split == Params().split


def test_typo_in_key_is_an_error_with_a_suggestion(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text("clean:\n  filters:\n    min_wrds: 3\n")
    with pytest.raises(ParamsError, match=r"unknown key 'clean.filters.min_wrds' \(did you mean 'min_words'\?\)"):
        load_params(path)


def test_typo_in_top_level_key(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text("clen: {}\n")
    with pytest.raises(ParamsError, match="unknown key 'clen'.*'clean'"):
        load_params(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("split:\n  train: 0.5\n  val: 0.1\n  test: 0.1\n", "sum to 1"),
        ("clean:\n  dedup:\n    near: maybe\n", "'maybe' is not one of"),
        ("clean:\n  num_proc: two\n", "expected int"),
        ("ingest:\n  sources: {}\n", "expected a list"),
        ("clean: [1, 2\n", "not valid YAML"),
        ("quantize:\n  variants: [int3]\n", "'int3' is not one of 'bf16', 'fp16', 'int8_dynamic'"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path: Path, text: str, message: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_distil_and_quantize_take_their_schema_from_models(tmp_path: Path):
    """The distillation settings and the quantization variants are written once, in models.train_config."""
    from models.train_config import VARIANTS, DistilSettings

    path = tmp_path / "p.yaml"
    path.write_text("distil: {student_preset: tiny}\n")
    params = load_params(path)
    assert isinstance(params.distil, DistilSettings) and params.distil.steps == 150  # the default a params file gets
    assert params.quantize.variants == list(VARIANTS)


def test_env_var_names_the_params_file_and_relative_paths_resolve_against_repo(tmp_path: Path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text("paths:\n  artifacts: elsewhere/art\n  raw: /abs/raw\n")
    monkeypatch.setenv("LMFORGE_PARAMS", str(path))
    params = load_params()
    assert params.artifacts == REPO_ROOT / "elsewhere/art"
    assert params.path(params.paths.raw) == Path("/abs/raw")


def test_missing_params_file(tmp_path: Path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_replace_single_nested_values():
    params = Params()
    clean = with_overrides(params.clean, {"filters": {"min_words": 3}, "steps": ["lowercase"]})
    assert clean.filters.min_words == 3 and clean.filters.max_words == params.clean.filters.max_words
    assert clean.steps == ["lowercase"] and params.clean.steps != ["lowercase"]
