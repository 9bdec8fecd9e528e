"""The Dagster code location: every asset, check, job, schedule and sensor of lmforge."""

from __future__ import annotations

import dagster as dg

import assets
from assets.resources import ParamsResource
from dagster_project.checks import data_quality, leakage, vocabulary
from dagster_project.jobs import JOBS
from dagster_project.loggers import console
from dagster_project.schedules import SCHEDULES
from dagster_project.sensors import SENSORS

ASSETS = dg.load_assets_from_package_module(assets)  # every module of assets/: a new stage's asset module needs no edit here
CHECKS = dg.load_asset_checks_from_modules([data_quality, leakage, vocabulary])

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=CHECKS,
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources={"lmforge_params": ParamsResource()},
    loggers={"console": console},
)
