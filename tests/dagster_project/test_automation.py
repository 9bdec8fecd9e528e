"""Jobs, tiers, the schedule and the sensors, evaluated in-process with Dagster's test contexts."""

import json
import os
import time
import uuid

import dagster as dg
import pytest
import yaml
from conftest import write_params

from dagster_project.definitions import defs
from assets.resources import TIER_TAG, ParamsResource
from dagster_project.schedules import THEN_DOWNSTREAM, THEN_TAG, weekly_retrain
from dagster_project.sensors import RAW_DOCUMENTS, continue_downstream, raw_data_changed, record_run_failure, registry_versions
from lmforge.params import ParamsError, load_params


def test_jobs_cover_the_stages_users_launch():
    def keys(job: str) -> set[str]:
        return {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.selected_asset_keys}

    feedback = {"feedback_examples", "feedback_finetune", "feedback_register"}  # the feedback loop runs on its own
    preference = {"feedback_preferences", "preference_tune", "preference_register"}  # so does the preference loop
    everything = {k.to_user_string() for k in defs.resolve_asset_graph().materializable_asset_keys} - feedback - preference - {"hpsearch"}
    assert keys("full_job") == keys("tiny_job") == keys("gpu_job") == everything
    assert keys("feedback_job") == feedback and keys("preference_job") == preference and keys("hpsearch_job") == {"hpsearch"}
    assert keys("data_job") == {"ingest", "clean", "split"}
    assert keys("retrain_job") == everything - {"ingest", "clean", "split", "task_data", "benchmark_data"}  # made from the data, not retrained
    assert keys("rag_job") == {"retrieval_index", "rag_eval", "prompt_eval", "sampling_sweep"}
    assert keys("finetune_job") == {"select", "task_data", "finetune_classifier", "finetune_sft"}
    assert defs.resolve_job_def("tiny_job").tags[TIER_TAG] == "tiny"
    assert defs.resolve_job_def("gpu_job").tags[TIER_TAG] == "gpu"


def test_tiers_overlay_params_and_are_validated(tmp_path):
    tiny = load_params(tier="tiny")
    assert tiny.paths.artifacts == "artifacts/tiny" and tiny.registry.name == "lmforge-tiny"
    assert [c.preset for c in tiny.pretrain.candidates] == ["tiny", "tiny"]
    assert tiny.clean == load_params().clean  # what a tier leaves alone stays as params.yaml has it
    gpu = load_params(tier="gpu")
    assert gpu.pretrain.scale.strategy == "fsdp2" and gpu.pretrain.train.precision == "bf16-mixed"
    with pytest.raises(ParamsError, match=r"unknown tier 'huge' \(tiers in params.yaml: demo, tiny, gpu, compare\)"):
        load_params(tier="huge")
    bad = write_params(tmp_path)
    data = yaml.safe_load(bad.read_text())
    bad.write_text(yaml.safe_dump({**data, "tiers": {"small": {"pretrain": {"train": {"max_stepz": 5}}}}}))
    with pytest.raises(ParamsError, match=r"tiers.small: unknown key 'pretrain.train.max_stepz' \(did you mean 'max_steps'\?\)"):
        load_params(bad)  # a typo in a tier nobody runs today is still caught
    bad.write_text(yaml.safe_dump({**data, "automation": {"retrain_tier": "nano"}}))
    with pytest.raises(ParamsError, match="unknown tier 'nano'"):
        load_params(bad)


def test_resource_takes_the_tier_from_the_run_tag(params_file):
    data = yaml.safe_load(params_file.read_text())
    params_file.write_text(yaml.safe_dump({**data, "tiers": {"small": {"split": {"seed": "tiered"}}}}))

    @dg.asset
    def probe(lmforge_params: ParamsResource) -> str:
        return lmforge_params.load().split.seed

    plain = dg.materialize([probe], resources={"lmforge_params": ParamsResource()})
    tagged = dg.materialize([probe], resources={"lmforge_params": ParamsResource()}, tags={TIER_TAG: "small"})
    assert plain.output_for_node("probe") == "lmforge" and tagged.output_for_node("probe") == "tiered"


def test_weekly_retrain_is_off_by_default_and_starts_the_data_job_then_the_rest():
    schedule = defs.resolve_schedule_def("weekly_retrain")
    assert schedule.cron_schedule == load_params().automation.retrain_cron == "0 4 * * 1"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED and schedule.job_name == "data_job"
    with dg.build_schedule_context() as ctx:
        request = weekly_retrain(ctx)
    assert request.tags[THEN_TAG] == THEN_DOWNSTREAM and request.tags[TIER_TAG] == "demo"


def test_raw_data_sensor_one_change_one_run_and_waits_for_files_to_settle(params_file, corpus):
    assert defs.resolve_sensor_def("raw_data_changed").default_status == dg.DefaultSensorStatus.STOPPED
    old = time.time() - 3600
    for path in corpus.rglob("*"):
        os.utime(path, (old, old))
    with dg.instance_for_test() as instance, dg.build_sensor_context(instance=instance, cursor=None, resources={"lmforge_params": ParamsResource()}) as ctx:
        first = raw_data_changed(ctx)
        assert isinstance(first, dg.RunRequest) and first.tags[THEN_TAG] == THEN_DOWNSTREAM
        observed = instance.get_latest_data_version_record(RAW_DOCUMENTS)
        assert observed.asset_observation.tags["dagster/data_version"] == first.run_key  # the UI marks ingest stale
        assert isinstance(raw_data_changed(ctx), dg.SkipReason)  # the cursor moved: the same files start nothing
        half = corpus / "arriving.txt"
        half.write_text("a document still being copied")  # modified just now
        skipped = raw_data_changed(ctx)
        assert isinstance(skipped, dg.SkipReason) and "settle" in skipped.skip_message
        os.utime(half, (old, old))  # the copy finished long enough ago
        second = raw_data_changed(ctx)
        assert isinstance(second, dg.RunRequest) and second.run_key != first.run_key
        assert isinstance(raw_data_changed(ctx), dg.SkipReason)


def _finished_run(instance, job: str, tags: dict, keys: list[str]) -> dg.DagsterRun:
    run = dg.DagsterRun(job_name=job, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.SUCCESS, tags=tags,
                        asset_selection=frozenset(dg.AssetKey(k) for k in keys))
    return instance.add_run(run)


def test_continue_downstream_backfills_every_candidate_after_a_tagged_run():
    with dg.instance_for_test() as instance:
        repo = defs.get_repository_def()
        _finished_run(instance, "data_job", {}, ["ingest", "clean", "split"])  # a user's own run: left alone
        with dg.build_sensor_context(instance=instance, repository_def=repo, cursor=None) as ctx:
            assert isinstance(continue_downstream(ctx), dg.SkipReason)
            _finished_run(instance, "data_job", {THEN_TAG: THEN_DOWNSTREAM, TIER_TAG: "tiny"}, ["ingest", "clean", "split"])
            (request,) = continue_downstream(ctx)
            subset = request.asset_graph_subset
            assert request.tags[TIER_TAG] == "tiny"
            assert {k.to_user_string() for k in subset.non_partitioned_asset_keys} >= {"tokenizer", "packed", "select", "register"}
            assert "ingest" not in {k.to_user_string() for k in subset.non_partitioned_asset_keys}
            assert set(subset.get_partitions_subset(dg.AssetKey("pretrain")).get_partition_keys()) == {"llama-rope", "smollm2"}
            assert isinstance(continue_downstream(ctx), dg.SkipReason)  # handled once


def test_failed_runs_are_recorded_where_users_look(params_file, tmp_path):
    data = yaml.safe_load(params_file.read_text())
    params_file.write_text(yaml.safe_dump({**data, "paths": {**data["paths"], "raw": str(tmp_path / "missing")}}))
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("data_job").execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
        ctx = dg.build_run_status_sensor_context(
            sensor_name="record_run_failure", dagster_instance=instance, dagster_run=result.dagster_run, dagster_event=failure
        ).for_run_failure()
        record_run_failure(ctx)
    (record,) = [json.loads(line) for line in (tmp_path / "artifacts" / "run_failures.jsonl").read_text().splitlines()]
    assert record["job"] == "data_job" and record["run_id"] == result.run_id and record["steps"] == ["ingest"]
    assert "directory not found" in record["error"]


def test_registry_sensor_records_new_versions_once(params_file, tmp_path):
    import mlflow

    data = yaml.safe_load(params_file.read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params_file.write_text(yaml.safe_dump({**data, "mlflow": {"tracking_uri": uri}, "registry": {"name": "watched"}}))
    with dg.instance_for_test() as instance, dg.build_sensor_context(instance=instance, cursor=None, resources={"lmforge_params": ParamsResource()}) as ctx:
        assert "watched" in registry_versions(ctx).skip_message  # no such model yet: a reason, not an error
        client = mlflow.MlflowClient(uri, registry_uri=uri)  # no process-wide MLflow state: other tests share it
        client.create_registered_model("watched")
        run = client.create_run(client.create_experiment("by-hand"))  # registered by hand, outside Dagster
        client.create_model_version("watched", f"runs:/{run.info.run_id}/model", run.info.run_id, tags={"kind": "pretrained"})
        assert "recorded version(s) 1" in registry_versions(ctx).skip_message
        assert "no version of watched after 1" in registry_versions(ctx).skip_message
        records = instance.fetch_observations(dg.AssetKey("register"), limit=5).records
        assert len(records) == 1 and records[0].asset_observation.metadata["version"].value == 1
