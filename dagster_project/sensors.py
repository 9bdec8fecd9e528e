"""Sensors: react to new or changed raw documents."""

from __future__ import annotations

import hashlib
import os

import dagster as dg

from dagster_project.jobs import data_job
from dagster_project.resources import ParamsResource
from lmforge.ingest import resolve_source_path


def source_fingerprint(params) -> str:
    """A hash of (path, size, mtime) of every file under the directory sources: cheap, no reading."""
    h = hashlib.sha256()
    for source in params.ingest.sources:
        if source.type != "directory":
            continue
        root = resolve_source_path(params, source)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                h.update(f"{os.path.relpath(full, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dg.sensor(
    job=data_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Runs the data job when files under the ingest source directories are added, removed or changed.",
)
def raw_data_changed(context: dg.SensorEvaluationContext, lmforge_params: ParamsResource):
    fingerprint = source_fingerprint(lmforge_params.load())
    if fingerprint == context.cursor:
        return dg.SkipReason("no change under the source directories")
    context.update_cursor(fingerprint)
    return dg.RunRequest(run_key=fingerprint)


SENSORS = [raw_data_changed]
