"""Dagster resources: how assets find their parameters."""

from __future__ import annotations

from typing import Optional

import dagster as dg
from pydantic import PrivateAttr

from lmforge.params import Params, load_params

#: Run tag naming the size tier (tiny, demo, gpu): set by the tier jobs, schedules, sensors and `lmforge run --tier`.
TIER_TAG = "lmforge/tier"


class ParamsResource(dg.ConfigurableResource):
    """Loads ``params.yaml`` (or ``$LMFORGE_PARAMS``, or ``params_file``) once per run step, with the
    overlay of the run's size tier (its ``lmforge/tier`` tag; else ``tier``; else ``$LMFORGE_TIER``).

    Read at run time, not at import time, so an edit to ``params.yaml`` takes effect on the next run
    without reloading the code location.
    """

    params_file: Optional[str] = None
    tier: Optional[str] = None
    _run_tier: Optional[str] = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.dagster_run
        self._run_tier = run.tags.get(TIER_TAG) if run is not None else None

    def load(self) -> Params:
        return load_params(self.params_file, self._run_tier or self.tier)
