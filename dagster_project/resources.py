"""Dagster resources: how assets find their parameters."""

from __future__ import annotations

from typing import Optional

import dagster as dg

from lmforge.params import Params, load_params


class ParamsResource(dg.ConfigurableResource):
    """Loads ``params.yaml`` (or ``$LMFORGE_PARAMS``, or ``params_file``) once per run step.

    Read at run time, not at import time, so an edit to ``params.yaml`` takes effect on the next run
    without reloading the code location.
    """

    params_file: Optional[str] = None

    def load(self) -> Params:
        return load_params(self.params_file)
