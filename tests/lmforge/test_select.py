"""Model selection: the factor matrix's arithmetic, and only eligible candidates can win."""

import json
import math
from pathlib import Path

import pytest
from conftest import write_params

from lmforge.params import LmforgeError, load_params
from lmforge.select import factors, normalise, run_select, score_matrix


def test_normalise_scores_relative_to_the_best():
    assert normalise([2.0, 4.0, None], higher_is_better=True) == [0.5, 1.0, 0.0]
    assert normalise([2.0, 4.0, None], higher_is_better=False) == [1.0, 0.5, 0.0]
    assert normalise([3.0, 3.0], higher_is_better=False) == [1.0, 1.0]
    assert normalise([None, None], higher_is_better=True) == [0.0, 0.0]


def evaluation(bpb: float, speed: float, params: int, flops: float, extrapolation: float | None, **extra) -> dict:
    return {"val_bits_per_byte": bpb, "tokens_per_second_b8": speed, "parameters": params, "training_flops": flops,
            "context_extrapolation": extrapolation, "memory_mb_b8": 100.0, "context_window": 256, "licence": "own",
            "crows_pairs_deviation": 0.05, **extra}


def test_the_weighted_total_by_hand(tmp_path: Path):
    table = factors(load_params(write_params(tmp_path)))
    summaries = {"a": evaluation(100.0, 1000.0, 2_000_000, 4e12, 1.10), "b": evaluation(200.0, 2000.0, 1_000_000, 2e12, None)}
    weights = {"quality": 2.0, "speed": 1.0, "size": 1.0, "training_cost": 0.0, "context": 1.0}
    rows = score_matrix(summaries, weights, table)
    # a: quality 1, speed 0.5, size 0.5, cost 0.6 (weight 0), context 1  → (2 + 0.5 + 0.5 + 1) / 5
    # b: quality 0.5, speed 1, size 1, cost 1, context missing → 0     → (1 + 1 + 1 + 0) / 5
    assert math.isclose(rows["a"]["total"], 4.0 / 5) and math.isclose(rows["b"]["total"], 3.0 / 5)
    assert rows["b"]["scores"]["context"] == 0.0 and rows["a"]["values"]["quality"] == 100.0


def write_candidate(root: Path, name: str, fingerprint: str, checks: dict, **metrics) -> None:
    for stage, summary in (("pretrain", {"fingerprint": fingerprint, "mlflow_run_id": f"run-{name}"}),
                           ("evaluate", {"pretrain_fingerprint": fingerprint, "checks": checks, **evaluation(**metrics)}),
                           ("benchmark_eval", {"pretrain_fingerprint": fingerprint, "checks": {}, "bench_accuracy": 0.4, "xstest_accuracy": 0.5})):
        (root / stage / name).mkdir(parents=True, exist_ok=True)
        (root / stage / name / "summary.json").write_text(json.dumps(summary))


def test_a_candidate_that_failed_a_check_or_is_stale_cannot_win(tmp_path: Path, monkeypatch):
    candidates = [{"name": n, "preset": "tiny", "overrides": {}} for n in ("good", "failed", "stale", "missing", "regressed")]
    params = load_params(write_params(tmp_path, pretrain={"candidates": candidates}, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "artifacts"
    ok = {"weights_finite": True, "beats_unigram_baseline": True, "metrics_finite": True}
    better = dict(bpb=0.5, speed=9000.0, params=10, flops=1.0, extrapolation=1.0)
    write_candidate(root, "good", "f1", ok, bpb=3.0, speed=1000.0, params=2_000_000, flops=4e12, extrapolation=1.2)
    write_candidate(root, "failed", "f2", {**ok, "beats_unigram_baseline": False}, **better)
    write_candidate(root, "stale", "f3", ok, **better)
    (root / "pretrain/stale/summary.json").write_text(json.dumps({"fingerprint": "retrained", "mlflow_run_id": "x"}))
    write_candidate(root, "regressed", "f4", ok, **better)  # an adapted model that lost what its base model knew
    (root / "benchmark_eval/regressed/summary.json").write_text(json.dumps({"pretrain_fingerprint": "f4", "checks": {"kept_base_knowledge": False}}))
    summary = run_select(params)
    assert summary["champion"] == "good" and summary["champion_score"] == 1.0
    assert summary["not_eligible"] == {
        "failed": "failed check beats_unigram_baseline",
        "stale": "stale evaluation (the model was retrained since): re-run evaluate",
        "missing": "not evaluated",
        "regressed": "failed check kept_base_knowledge",
    }
    assert summary["champion_pretrain_run_id"] == "run-good"
    table = (root / "select/factors.md").read_text()
    assert "| good 🏆 |" in table and "not eligible: failed check beats_unigram_baseline" in table
    assert (root / "select/scores.png").stat().st_size > 0
    (root / "evaluate/good/summary.json").unlink()
    with pytest.raises(LmforgeError, match="no eligible candidate .*good: not evaluated"):
        run_select(params)


def test_a_model_used_as_is_costs_nothing_and_licences_count(tmp_path: Path):
    """Training cost scores by ratio with a floor of 1 TFLOP, so zero FLOPs (as is) is the best, not
    undefined; a licence outside select.open_licences scores 0; quality is bits per byte."""
    params = load_params(write_params(tmp_path))
    table = factors(params)
    assert table["quality"].metric == "val_bits_per_byte"
    assert normalise([0.0, 1e12, 3e12], higher_is_better=False, floor=1e12) == [1.0, 0.5, 0.25]
    summaries = {
        "as-is": evaluation(1.0, 10.0, 100_000_000, 0.0, 1.0, licence_open=1.0),
        "adapted": evaluation(0.9, 10.0, 100_000_000, 3e12, 1.0, licence_open=0.0),
    }
    rows = score_matrix(summaries, {"training_cost": 1.0, "licence": 1.0, "quality": 1.0}, table)
    assert rows["as-is"]["scores"]["training_cost"] == 1.0 and rows["adapted"]["scores"]["training_cost"] == 0.25
    assert rows["adapted"]["scores"]["licence"] == 0.0 and math.isclose(rows["as-is"]["scores"]["quality"], 0.9)
    assert math.isclose(rows["as-is"]["total"], (1.0 + 1.0 + 0.9) / 3)


def test_unknown_weight_is_a_params_error(tmp_path: Path):
    from lmforge.params import ParamsError

    with pytest.raises(ParamsError, match="unknown factor.*qualty"):
        load_params(write_params(tmp_path, select={"weights": {"qualty": 1.0}}))
