"""The Dagster code location: every asset, check, job, schedule and sensor of lmforge."""

from __future__ import annotations

import dagster as dg

from assets import (batch_inference, benchmarks, clean, deploy, evaluate, feedback, finetune, hpsearch, ingest, preference, pretrain, rag, split,
                    tokenizer)
from dagster_project.checks import data_quality, leakage, vocabulary
from dagster_project.jobs import JOBS
from dagster_project.loggers import console
from dagster_project.resources import ParamsResource
from dagster_project.schedules import SCHEDULES
from dagster_project.sensors import SENSORS

ASSETS = dg.load_assets_from_modules([ingest, clean, split, tokenizer, pretrain, evaluate, benchmarks, finetune, deploy, batch_inference, rag, feedback,
                                      preference, hpsearch])
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
