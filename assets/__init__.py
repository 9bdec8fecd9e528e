"""Thin Dagster asset definitions, one module per stage; the work is done by ``lmforge.*``."""
