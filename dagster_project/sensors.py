"""Sensors: new or changed raw documents start the pipeline; failures are recorded where users look;
registry versions made outside Dagster show up on the `register` asset; enough new user feedback starts the
feedback or the preference loop."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import dagster as dg

# Sensors launch backfills with RunRequest.for_asset_graph_subset; its argument has no public constructor in 1.13
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

from assets.resources import TIER_TAG, ParamsResource
from dagster_project.errors import root_cause
from dagster_project.jobs import data_job, feedback_job, preference_job
from dagster_project.schedules import AUTOMATION, THEN_DOWNSTREAM, THEN_TAG
from lmforge.ingest import source_fingerprint
from lmforge.params import REPO_ROOT, LmforgeError, load_params

#: The source asset whose data version is the fingerprint of the raw documents.
RAW_DOCUMENTS = dg.AssetKey("raw_documents")
#: Where failed runs are recorded, under the tier's artifacts directory.
FAILURES = "run_failures.jsonl"


def report_raw_version(instance: dg.DagsterInstance, fingerprint: str) -> None:
    """Record the raw documents' current version, so that the UI marks `ingest` and everything
    downstream stale (the same event the UI's "Observe sources" button records)."""
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key=RAW_DOCUMENTS, tags={"dagster/data_version": fingerprint})
    )


@dg.sensor(
    job=data_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="New, changed or removed files under the ingest source directories start the data job, then "
    "everything downstream.  Waits until no file changed for automation.settle_seconds (a file still being "
    "copied is not ingested half-written); one change, one run (the cursor is the files' fingerprint).",
)
def raw_data_changed(context: dg.SensorEvaluationContext, lmforge_params: ParamsResource):
    params = lmforge_params.load()
    fingerprint, newest = source_fingerprint(params)
    if fingerprint == context.cursor:
        return dg.SkipReason("no change under the source directories")
    quiet_for = time.time() - newest
    if quiet_for < params.automation.settle_seconds:
        return dg.SkipReason(f"files are changing (last change {quiet_for:.0f} s ago): waiting until they settle")
    report_raw_version(context.instance, fingerprint)
    context.update_cursor(fingerprint)
    return dg.RunRequest(
        run_key=fingerprint,
        tags={TIER_TAG: params.automation.retrain_tier, THEN_TAG: THEN_DOWNSTREAM, "lmforge/trigger": "raw_data_changed"},
    )


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a successful run tagged lmforge/then=downstream (started by weekly_retrain or raw_data_changed), "
    "launches one backfill of everything downstream of it: each pretraining candidate, then selection, "
    "fine-tuning, compression and the registry.  Untagged runs (yours from the UI) are left alone.",
)
def continue_downstream(context: dg.SensorEvaluationContext):
    since = float(context.cursor or 0.0)
    records = context.instance.get_run_records(
        filters=dg.RunsFilter(tags={THEN_TAG: THEN_DOWNSTREAM}, statuses=[dg.DagsterRunStatus.SUCCESS], updated_after=datetime.fromtimestamp(since, timezone.utc))
    )
    records = [r for r in records if not r.dagster_run.tags.get("dagster/backfill")]
    if not records:
        return dg.SkipReason("no finished run asks for its downstream assets")
    graph = context.repository_def.asset_graph
    requests = []
    for record in sorted(records, key=lambda r: r.update_timestamp):
        run = record.dagster_run
        done = set(run.asset_selection or ())
        downstream = dg.AssetSelection.assets(*done).downstream().resolve(graph) - done
        if downstream:
            tags = {TIER_TAG: run.tags.get(TIER_TAG, AUTOMATION.retrain_tier), "lmforge/after_run": run.run_id}
            requests.append(dg.RunRequest.for_asset_graph_subset(AssetGraphSubset.from_asset_keys(downstream, graph), tags=tags))
        since = max(since, record.update_timestamp.timestamp())
    context.update_cursor(str(since))
    return requests


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records every failed run in <artifacts>/run_failures.jsonl (shown by `lmforge summary` and `make demo`).",
)
def record_run_failure(context: dg.RunFailureSensorContext):
    run = context.dagster_run
    steps = [e.step_key for e in context.get_step_failure_events()]
    errors = [": ".join(root_cause(e.event_specific_data.error)) for e in context.get_step_failure_events()
              if e.event_specific_data and e.event_specific_data.error]
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": run.run_id,
        "job": run.job_name,
        "tier": run.tags.get(TIER_TAG),
        "partition": run.tags.get("dagster/partition"),
        "steps": steps,
        "error": errors[0] if errors else context.failure_event.message,
    }
    try:
        path = load_params(tier=run.tags.get(TIER_TAG)).artifacts / FAILURES
    except LmforgeError:  # the failure may be the params file itself
        path = REPO_ROOT / "artifacts" / FAILURES
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    context.log.info(f"run {run.run_id[:8]} of {run.job_name} failed: recorded in {path}")


@dg.sensor(
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Polls the MLflow registry (params.yaml registry.name) and records each new version on the `register` "
    "asset's timeline as an observation (version, aliases, run, tags), including versions registered outside Dagster.",
)
def registry_versions(context: dg.SensorEvaluationContext, lmforge_params: ParamsResource):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lmforge.tracking import tracking_uri

    params = lmforge_params.load()
    client = MlflowClient(tracking_uri(params), registry_uri=tracking_uri(params))
    try:
        versions = client.search_model_versions(f"name='{params.registry.name}'")
    except MlflowException as exc:
        return dg.SkipReason(f"registry not reachable: {str(exc).splitlines()[0]}")
    seen = int(context.cursor or 0)
    new = sorted((v for v in versions if int(v.version) > seen), key=lambda v: int(v.version))
    if not new:
        return dg.SkipReason(f"no version of {params.registry.name} after {seen}")
    for v in new:
        context.instance.report_runless_asset_event(dg.AssetObservation(
            asset_key="register",
            metadata={"registered_model": params.registry.name, "version": int(v.version), "aliases": ", ".join(v.aliases) or "none",
                      "mlflow_run_id": v.run_id or "", "kind": v.tags.get("kind", ""), "candidate": v.tags.get("candidate", "")},
        ))
    context.update_cursor(str(int(new[-1].version)))
    return dg.SkipReason(f"recorded version(s) {', '.join(str(v.version) for v in new)} of {params.registry.name}")


def _feedback_interval() -> int:
    """``feedback.sensor_interval_seconds``, read when the code location loads (like the schedules' cron)."""
    try:
        return load_params().feedback.sensor_interval_seconds
    except LmforgeError:
        return 60  # the sensor's ticks report the params error


def _loop_cursor(cursor: str | None) -> dict[str, list[str]]:
    """What the feedback_arrived sensor has started runs for: example ids and pair ids (an older cursor: example ids)."""
    data = json.loads(cursor) if cursor else {}
    return {"examples": data, "pairs": []} if isinstance(data, list) else {"examples": data.get("examples", []), "pairs": data.get("pairs", [])}


@dg.sensor(
    jobs=[feedback_job, preference_job],
    minimum_interval_seconds=_feedback_interval(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Counts the accepted examples and the preference pairs in users' feedback (lmforge serve's store, feedback.inbox, "
    "preference.files) and starts feedback_job when at least feedback.min_new_examples new examples arrived, preference_job when at "
    "least preference.min_new_pairs new pairs did (the cursor: the examples and pairs already used).",
)
def feedback_arrived(context: dg.SensorEvaluationContext, lmforge_params: ParamsResource):
    from lmforge import feedback, preference

    params = lmforge_params.load()
    cursor = _loop_cursor(context.cursor)
    loops = (("examples", feedback_job, feedback.collect(params).ids, params.feedback.min_new_examples, "feedback.min_new_examples"),
             ("pairs", preference_job, preference.collect(params)[0].ids, params.preference.min_new_pairs, "preference.min_new_pairs"))
    requests, waiting = [], []
    for kind, job, ids, needed, setting in loops:
        used = set(cursor[kind])
        new = [i for i in ids if i not in used]
        if len(new) < needed:
            waiting.append(f"{len(new)} new {kind} ({setting} is {needed})")
            continue
        cursor[kind] = sorted(used | set(ids))
        requests.append(dg.RunRequest(run_key=f"{kind}-{len(cursor[kind])}-{new[-1]}", job_name=job.name,
                                      tags={"lmforge/trigger": "feedback_arrived", f"lmforge/new_{kind}": str(len(new))}))
    if not requests:
        return dg.SkipReason("; ".join(waiting))
    context.update_cursor(json.dumps(cursor))
    return requests


SENSORS = [raw_data_changed, continue_downstream, record_run_failure, registry_versions, feedback_arrived]
