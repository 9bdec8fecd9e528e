"""The great-expectations suite on ``clean``, one blocking Dagster check per expectation."""

from __future__ import annotations

import dagster as dg

from assets.resources import ParamsResource
from lmforge.validation import CHECK_NAMES, data_docs_index, validate_clean


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(name, asset="clean", blocking=True, description=description) for name, description in CHECK_NAMES.items()],
    description="great-expectations 1.x suite on the cleaned corpus; Data Docs under artifacts/clean/data_docs.",
)
def clean_expectations(lmforge_params: ParamsResource):
    params = lmforge_params.load()
    docs = data_docs_index(params)
    for outcome in validate_clean(params):
        metadata = {"unexpected": outcome.unexpected, "data_docs": dg.MetadataValue.path(str(docs))}
        if outcome.observed is not None:
            metadata["observed"] = dg.MetadataValue.text(str(outcome.observed))
        if outcome.examples:
            metadata["examples"] = dg.MetadataValue.json(outcome.examples)
        example = f", e.g. {outcome.examples[0][:80]!r}" if outcome.examples else ""
        verdict = "" if outcome.passed else f" FAILED: {outcome.unexpected} unexpected{example}"
        yield dg.AssetCheckResult(
            asset_key="clean",
            check_name=outcome.name,
            passed=outcome.passed,
            description=outcome.description + verdict,
            metadata=metadata,
        )
