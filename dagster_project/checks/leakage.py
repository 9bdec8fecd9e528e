"""No identical text in two splits: evaluation on text seen in training would flatter every model."""

from __future__ import annotations

import dagster as dg

from assets.resources import ParamsResource
from lmforge.split import leakage


@dg.asset_check(asset="split", blocking=True, description="No identical document text in two splits.")
def no_leakage(lmforge_params: ParamsResource) -> dg.AssetCheckResult:
    shared = leakage(lmforge_params.load())
    leaked = {pair: n for pair, n in shared.items() if n}
    return dg.AssetCheckResult(
        passed=not leaked,
        description="no text shared between splits" if not leaked else f"texts shared between splits: {leaked}",
        metadata={pair: n for pair, n in shared.items()},
    )
