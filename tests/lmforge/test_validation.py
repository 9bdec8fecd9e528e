"""The great-expectations suite: passes on clean data, fails (and says why) on bad data."""

from pathlib import Path

import datasets
from conftest import write_params

from lmforge.clean import run_clean
from lmforge.ingest import run_ingest
from lmforge.params import load_params
from lmforge.validation import CHECK_NAMES, data_docs_index, validate_clean


def test_suite_passes_on_the_cleaned_corpus_and_builds_data_docs(tmp_path: Path, corpus: Path):
    params = load_params(write_params(tmp_path, corpus))
    run_ingest(params)
    run_clean(params)
    outcomes = {o.name: o for o in validate_clean(params)}
    assert set(outcomes) == set(CHECK_NAMES)
    assert all(o.passed for o in outcomes.values()), outcomes
    index = data_docs_index(params)
    assert index.exists() and "validation" in index.read_text().lower()


def test_suite_fails_on_markup_control_chars_duplicates_and_too_few_rows(tmp_path: Path, corpus: Path):
    params = load_params(write_params(tmp_path, corpus, clean={"steps": [], "validation": {"min_rows": 100, "max_rejection_ratio": 0.0}}))
    run_ingest(params)
    run_clean(params)
    # tamper with the cleaned dataset: what a buggy cleaning step would produce
    path = params.stage_dir("clean") / "dataset"
    ds = datasets.load_from_disk(str(path))
    rows = ds.to_list()
    rows[0]["text"] = "<div>markup</div> left"
    rows[1]["text"] = "bell \x07 character"
    rows[2]["sha256"] = rows[3]["sha256"]
    rows[4]["text"] = ""
    datasets.Dataset.from_list(rows, features=ds.features).save_to_disk(str(path) + ".new")
    del ds
    import shutil

    shutil.rmtree(path)
    shutil.move(str(path) + ".new", path)
    outcomes = {o.name: o for o in validate_clean(params)}
    failed = {name for name, o in outcomes.items() if not o.passed}
    assert failed == {"no_markup", "no_control_chars", "unique_hashes", "min_rows", "length_bounds"}
    assert outcomes["no_markup"].unexpected == 1 and "markup" in outcomes["no_markup"].examples[0]
    assert outcomes["max_rejection_ratio"].passed  # nothing was rejected with no steps and these docs
