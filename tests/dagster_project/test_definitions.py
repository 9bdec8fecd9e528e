"""The Dagster code location: what it defines, and that its pieces are wired as documented."""

import dagster as dg

from dagster_project.definitions import defs


def test_asset_graph_snapshot():
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()} == {
        "raw_documents": "data", "ingest": "data", "clean": "data", "split": "data", "base_models": "tokenizer", "tokenizer": "tokenizer", "packed": "tokenizer", "pretrain": "pretrain",
        "evaluate": "evaluation", "benchmark_data": "evaluation", "benchmark_eval": "evaluation", "select": "evaluation", "task_data": "finetune", "finetune_classifier": "finetune", "finetune_sft": "finetune",
        **dict.fromkeys(("quantize", "prune", "distil", "register", "register_quantized", "export", "batch_inference"), "deploy"),
        **dict.fromkeys(("retrieval_index", "rag_eval", "prompt_eval", "sampling_sweep"), "rag"),
        **dict.fromkeys(("feedback_examples", "feedback_finetune", "feedback_register"), "feedback"),
        **dict.fromkeys(("feedback_preferences", "preference_tune", "preference_register"), "preference"), "hpsearch": "hpsearch",
    }
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("feedback_finetune")).parent_keys) == ["feedback_examples", "task_data"]
    assert [p.to_user_string() for p in graph.get(dg.AssetKey("feedback_register")).parent_keys] == ["feedback_finetune"]
    # the feedback loop runs from its sensor, not with the pipeline
    feedback = {"feedback_examples", "feedback_finetune", "feedback_register"}
    assert {k.to_user_string() for k in defs.get_job_def("feedback_job").asset_layer.selected_asset_keys} == feedback
    preference = {"feedback_preferences", "preference_tune", "preference_register"}
    assert {k.to_user_string() for k in defs.get_job_def("preference_job").asset_layer.selected_asset_keys} == preference
    assert [p.to_user_string() for p in graph.get(dg.AssetKey("preference_register")).parent_keys] == ["preference_tune"]
    # so do the preference loop and the search (launched by hand)
    assert {k.to_user_string() for k in defs.get_job_def("hpsearch_job").asset_layer.selected_asset_keys} == {"hpsearch"}
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("hpsearch")).parent_keys) == ["packed", "select", "task_data"]
    assert graph.get(dg.AssetKey("hpsearch")).pools == graph.get(dg.AssetKey("preference_tune")).pools == {"training"}
    for job in ("full_job", "tiny_job", "gpu_job"):
        assert not (feedback | preference | {"hpsearch"}) & {k.to_user_string() for k in defs.get_job_def(job).asset_layer.selected_asset_keys}
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("register_quantized")).parent_keys) == ["quantize", "register"]
    assert [p.to_user_string() for p in graph.get(dg.AssetKey("batch_inference")).parent_keys] == ["register"]
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("export")).parent_keys) == ["packed", "register", "select"]
    assert graph.get(dg.AssetKey("batch_inference")).pools == {"training"}
    for name in ("pretrain", "evaluate", "benchmark_eval"):
        node = graph.get(dg.AssetKey(name))
        assert node.partitions_def.get_partition_keys() == ["llama-rope", "smollm2"]  # params.yaml candidates
        assert node.pools == {"training"}
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("select")).parent_keys) == ["benchmark_eval", "evaluate", "pretrain"]
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("benchmark_eval")).parent_keys) == ["base_models", "benchmark_data", "pretrain"]
    assert [p.to_user_string() for p in graph.get(dg.AssetKey("benchmark_data")).parent_keys] == ["split"]
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("finetune_classifier")).parent_keys) == ["select", "task_data"]
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("finetune_sft")).parent_keys) == ["benchmark_data", "select", "task_data"]
    assert sorted(p.to_user_string() for p in graph.get(dg.AssetKey("packed")).parent_keys) == ["base_models", "split", "tokenizer"]
    assert [p.to_user_string() for p in graph.get(dg.AssetKey("clean")).parent_keys] == ["ingest"]
    assert [p.to_user_string() for p in graph.get(dg.AssetKey("ingest")).parent_keys] == ["raw_documents"]
    assert [p.to_user_string() for p in graph.get(dg.AssetKey("split")).parent_keys] == ["clean"]
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        assert node.code_version and "python" in node.kinds


def test_checks_are_blocking():
    graph = defs.resolve_asset_graph()
    specs = {(k.asset_key.to_user_string(), k.name): graph.get_check_spec(k) for k in graph.asset_check_keys}
    assert set(specs) == {
        ("clean", n) for n in ("non_empty", "length_bounds", "no_markup", "no_control_chars", "unique_hashes", "min_rows", "max_rejection_ratio")
    } | {("split", "no_leakage"), ("tokenizer", "round_trip_exact"), ("tokenizer", "unk_rate_below_threshold")} | {
        ("pretrain", "weights_finite"), ("pretrain", "beats_unigram_baseline"), ("evaluate", "metrics_finite"), ("benchmark_eval", "kept_base_knowledge")
    } | {("task_data", f"{task}_{n}") for task in ("classification", "sft") for n in ("min_examples", "no_empty_fields")} | {
        ("task_data", "classification_known_labels"), ("finetune_classifier", "beats_majority_baseline"), ("finetune_classifier", "beats_classical_baseline"), ("finetune_sft", "beats_zero_shot"),
        ("finetune_sft", "kept_benchmarks"), ("quantize", "perplexity_within_threshold"), ("distil", "beats_from_scratch"), ("retrieval_index", "finds_known_items"),
        ("feedback_examples", "feedback_valid"), ("feedback_finetune", "beats_current"), ("feedback_finetune", "kept_benchmarks"), ("quantize", "kept_benchmarks"),
        ("export", "round_trip_perplexity"), ("feedback_preferences", "preferences_valid"), ("preference_tune", "beats_current"),
        ("preference_tune", "kept_benchmarks"),
    }
    # a fine-tuned or distilled model below its baseline is a warning to read, not a gate
    warnings = {("finetune_classifier", "beats_majority_baseline"), ("finetune_classifier", "beats_classical_baseline"), ("finetune_sft", "beats_zero_shot"), ("distil", "beats_from_scratch"),
                ("quantize", "kept_benchmarks"), ("finetune_sft", "kept_benchmarks")}  # quantize's blocking gate is perplexity_within_threshold, which includes the benchmarks
    assert all(spec.blocking != (key in warnings) for key, spec in specs.items())


def test_every_run_executes_its_steps_in_its_own_process():
    """A run launched from the UI, a schedule or a sensor runs as `lmforge run` does: not a Python per step."""
    from dagster_project.jobs import JOBS

    jobs = [defs.resolve_implicit_global_asset_job_def()] + [defs.resolve_job_def(job.name) for job in JOBS]
    assert {job.name: job.executor_def.name for job in jobs} == {job.name: "in_process" for job in jobs}
