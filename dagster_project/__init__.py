"""Dagster wiring of lmforge: Definitions, resources, jobs, schedules, sensors, checks and the CLI."""
