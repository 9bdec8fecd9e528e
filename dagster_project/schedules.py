"""Schedules.  Off by default: turn them on in the UI (Automation) when the sources change on their own."""

from __future__ import annotations

import dagster as dg

from dagster_project.jobs import data_job

nightly_data = dg.ScheduleDefinition(
    name="nightly_data",
    job=data_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Rebuild the data stages every night at 03:00 (for sources that grow, e.g. a crawl).",
)

SCHEDULES = [nightly_data]
