"""What a stage run is told about the run that asked for it (``RunContext``).

The stage logic in ``lmforge/`` is called by a Dagster asset, by the CLI, by ``dvc repro`` through
``lmforge run`` and by tests.  It needs two things from its caller, whoever that is: where its progress
messages go, and the orchestrator's run id, which it tags on the MLflow runs it opens so that a
model can be traced back to the run that made it.  One small object carries both (and the partition,
the candidate of a per-candidate stage), instead of Dagster's context, so this layer imports no
Dagster and every stage function has the same shape: ``run_<stage>(params[, candidate], ctx)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def _quiet(_message: str) -> None:
    """Progress messages nobody asked for (a test, a script) go nowhere."""


@dataclass(frozen=True)
class RunContext:
    run_id: str = ""  # the orchestrator's run id, tagged `dagster_run_id` on MLflow runs; "" outside Dagster
    log: Callable[[str], None] = field(default=_quiet)  # one line of progress: Dagster's logger, print, or nothing
    partition: str | None = None  # the candidate of a per-candidate stage (a Dagster partition, a DVC foreach item)

    def tags(self) -> dict[str, str]:
        """The MLflow tag that links a run to the orchestrator's run that made it."""
        return {"dagster_run_id": self.run_id}


#: The context of a call that nobody orchestrates: no run id, no messages.
QUIET = RunContext()
