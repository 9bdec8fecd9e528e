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
    # every run's steps in the run's own process, as `lmforge run` runs them: Dagster's default executor starts a
    # Python per step, each importing torch, Lightning, transformers and MLflow again (~5-10 s of CPU a step on a
    # laptop, and 25 steps in the whole pipeline); a stage uses every core itself, and one that needs more
    # processes starts them (torchrun, Ray)
    executor=dg.in_process_executor,
)
