"""Schedules: the pipeline on a timetable, off by default (turn them on in the UI, Automation) for sources that change on their own."""

from __future__ import annotations

import dagster as dg

from assets.resources import TIER_TAG
from dagster_project.jobs import data_job
from lmforge.params import AutomationParams, ParamsError, load_params

#: A run carrying this tag is followed, once it succeeds, by a backfill of everything downstream of
#: what it materialized (sensor `continue_downstream`): how a schedule or a sensor starts "the data job
#: and then the rest" although the rest holds partitioned assets that one run cannot cover.
THEN_TAG = "lmforge/then"
THEN_DOWNSTREAM = "downstream"


def automation_params() -> AutomationParams:
    """``automation:`` of params.yaml, read when the code location loads (a cron cannot change per tick)."""
    try:
        return load_params().automation
    except ParamsError:
        return AutomationParams()  # the runs themselves report the params error in one line


AUTOMATION = automation_params()


@dg.schedule(
    name="weekly_retrain",
    job=data_job,
    cron_schedule=AUTOMATION.retrain_cron,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Periodic retraining (params.yaml automation.retrain_cron, weekly by default): the data job on the "
    "current sources, then everything downstream (tier: automation.retrain_tier).",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(
        tags={TIER_TAG: AUTOMATION.retrain_tier, THEN_TAG: THEN_DOWNSTREAM, "lmforge/trigger": "weekly_retrain"},
    )


SCHEDULES = [weekly_retrain]
