"""great-expectations 1.x suites for the cleaned corpus, run as Dagster blocking asset checks.

Three validation definitions, so that memory stays flat in corpus size:
- ``documents``: text expectations (non-empty, length bounds, no markup, no control characters),
  validated batch by batch over the memory-mapped dataset;
- ``corpus``: whole-corpus expectations on the small ``sha256`` column (unique hashes, minimum rows);
- ``accounting``: the stage's ``summary.json`` (rejection ratio under the maximum).
Results are rendered as Data Docs (HTML) under ``<artifacts>/clean/data_docs``.

``dagster-ge`` is stuck on great-expectations < 1.0, so the suites are built and run here directly.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.artifacts import load_dataset_dir, read_params, read_summary
from lmforge.cleaning import CONTROL_PATTERN, MARKUP_PATTERN
from lmforge.params import CleanParams, Params, build

BATCH_ROWS = 20_000  # rows of text per validation batch: bounds memory at ~tens of MB


@dataclass
class CheckOutcome:
    """One named check, aggregated over every batch it ran on."""

    name: str
    description: str
    passed: bool = True
    unexpected: int = 0
    examples: list[Any] = field(default_factory=list)
    observed: Any = None
    rows: list[int] = field(default_factory=list)  # indices of the failing rows (result_format="COMPLETE" only)


#: Check name → what it guarantees (the Dagster check specs are declared from this, before any run).
CHECK_NAMES = {
    "non_empty": "every document has text",
    "length_bounds": "text length within clean.validation [min_chars, max_chars]",
    "no_markup": "no HTML/XML tags left in the text",
    "no_control_chars": "no control characters in the text",
    "unique_hashes": "every document's sha256 is unique (dedup worked)",
    "min_rows": "at least clean.validation.min_rows documents kept",
    "max_rejection_ratio": "at most clean.validation.max_rejection_ratio of documents quarantined",
}


def _expectations(params: Params) -> dict[str, list]:
    import great_expectations as gx

    v = params.clean.validation
    E = gx.expectations
    return {
        "documents": [
            ("non_empty", "every document has text", E.ExpectColumnValuesToNotBeNull(column="text")),
            (
                "length_bounds",
                f"text length within [{v.min_chars}, {v.max_chars}] characters",
                E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=v.min_chars, max_value=v.max_chars),
            ),
            ("no_markup", "no HTML/XML tags left in the text", E.ExpectColumnValuesToNotMatchRegex(column="text", regex=MARKUP_PATTERN)),
            ("no_control_chars", "no control characters in the text", E.ExpectColumnValuesToNotMatchRegex(column="text", regex=CONTROL_PATTERN)),
        ],
        "corpus": [
            ("unique_hashes", "every document's sha256 is unique (dedup worked)", E.ExpectColumnValuesToBeUnique(column="sha256")),
            ("min_rows", f"at least {v.min_rows} documents kept", E.ExpectTableRowCountToBeBetween(min_value=v.min_rows)),
        ],
        "accounting": [
            (
                "max_rejection_ratio",
                f"at most {v.max_rejection_ratio:.0%} of documents quarantined",
                E.ExpectColumnValuesToBeBetween(column="rejection_ratio", min_value=0.0, max_value=v.max_rejection_ratio),
            ),
        ],
    }


def _context_without_docs():
    """An in-memory great-expectations context, quiet (no progress bars, errors only)."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _context(docs_dir: Path):
    """An in-memory context that renders Data Docs into ``docs_dir``."""
    context = _context_without_docs()
    context.add_data_docs_site(
        site_name="lmforge",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def validate_clean(params: Params) -> list[CheckOutcome]:
    """Run the suites on ``<artifacts>/clean`` and build Data Docs; return one outcome per check."""
    import great_expectations as gx
    import pandas as pd

    stage = params.stage_dir("clean")
    # validate against the thresholds the clean run actually used (run config may have overridden them)
    params = dataclasses.replace(params, clean=build(CleanParams, read_params(stage), "clean"))
    ds = load_dataset_dir(stage / "dataset", "clean")
    summary = read_summary(stage)
    context = _context(stage / "data_docs")
    source = context.data_sources.add_pandas("clean")
    outcomes: dict[str, CheckOutcome] = {}
    validations = {}
    for suite_name, checks in _expectations(params).items():
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
        for name, description, expectation in checks:
            expectation.meta = {"check": name}
            suite.add_expectation(expectation)
            outcomes[name] = CheckOutcome(name, description)
        batch = source.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all")
        validations[suite_name] = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )

    def run(suite_name: str, frame) -> None:
        _fold(validations[suite_name].run(batch_parameters={"dataframe": frame}), outcomes)

    if len(ds) == 0:
        run("documents", pd.DataFrame({"text": pd.Series([], dtype=object)}))
    for start in range(0, len(ds), BATCH_ROWS):
        run("documents", ds.select_columns(["text"]).select(range(start, min(start + BATCH_ROWS, len(ds)))).to_pandas())
    run("corpus", pd.DataFrame({"sha256": ds.data.column("sha256").to_pylist()}))
    run("accounting", pd.DataFrame({"rejection_ratio": [summary["rejection_ratio"]]}))
    context.build_data_docs()
    return list(outcomes.values())


def data_docs_index(params: Params) -> Path:
    return params.stage_dir("clean") / "data_docs" / "index.html"


def validate_frame(name: str, frame, checks: list[tuple[str, str, Any]], result_format: str = "SUMMARY") -> list[CheckOutcome]:
    """Run ``checks`` ((name, description, expectation) triples) on a whole pandas frame at once,
    for small tables such as the fine-tuning task sets; one outcome per check name.
    ``result_format="COMPLETE"`` also lists every failing row's index (``CheckOutcome.rows``), for
    callers that quarantine rows rather than reject the table."""
    import great_expectations as gx

    context = _context_without_docs()
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    outcomes: dict[str, CheckOutcome] = {}
    for check, description, expectation in checks:
        expectation.meta = {"check": check}
        suite.add_expectation(expectation)
        outcomes.setdefault(check, CheckOutcome(check, description))
    batch = context.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    _fold(gx.ValidationDefinition(name=name, data=batch, suite=suite).run(batch_parameters={"dataframe": frame}, result_format=result_format),
          outcomes)
    return list(outcomes.values())


def _fold(result, outcomes: dict[str, CheckOutcome]) -> None:
    """Add one validation result (one batch) to the outcomes of the checks it ran."""
    for r in result.results:
        outcome = outcomes[r.expectation_config.meta["check"]]
        res = r.result or {}
        outcome.passed &= bool(r.success)
        outcome.unexpected += int(res.get("unexpected_count") or 0)
        if "observed_value" in res:
            outcome.observed = res["observed_value"]
        outcome.rows += [int(i) for i in res.get("unexpected_index_list") or []]
        for value in res.get("partial_unexpected_list") or []:
            if len(outcome.examples) < 5:
                outcome.examples.append(str(value)[:200])
