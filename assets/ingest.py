"""Asset ``ingest``: raw sources → ``<artifacts>/ingest`` (Arrow dataset + quarantine)."""

import warnings

import dagster as dg

import lmforge.ingest
from assets.common import declared, materialized, md_table, sample_rows, stage_params, summary_metadata
from assets.factory import run_config, run_context
from assets.resources import ParamsResource
from lmforge.artifacts import load_dataset_dir


def _observe_raw(lmforge_params: ParamsResource) -> dg.DataVersion:
    return dg.DataVersion(lmforge.ingest.source_fingerprint(lmforge_params.load())[0])


with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)  # "beta" upstream for years; the API we use is stable
    raw_documents = dg.observable_source_asset(
        name="raw_documents",
        group_name="data",
        description="The raw documents of every ingest source (params.yaml ingest.sources).  Its data version is a "
        "fingerprint of the files (path, size, modification time): observing it (\"Observe sources\", the "
        "raw_data_changed sensor, `lmforge run`) marks ingest and everything downstream stale when files change.",
    )(_observe_raw)


@dg.asset(
    **declared("ingest", raw_documents),
    kinds={"python", "arrow"},
    description="Every configured source (files of many formats, Hugging Face datasets) converted to "
    "plain-text documents with provenance; unreadable inputs go to quarantine.jsonl.",
)
def ingest(context: dg.AssetExecutionContext, config: run_config("ingest"), lmforge_params: ParamsResource) -> dg.MaterializeResult:
    """Not ``stage_asset``: it records the version of the raw documents it read (the source asset's data version)."""
    params = stage_params(lmforge_params.load(), "ingest", config)
    raw_version = lmforge.ingest.source_fingerprint(params)[0]  # before reading: a file changed meanwhile re-runs next time
    summary = lmforge.ingest.run_ingest(params, run_context(context))
    stage = params.stage_dir("ingest")
    return materialized("ingest", params, {
        **summary_metadata(summary),
        "path": dg.MetadataValue.path(str(stage)),
        "rejections": dg.MetadataValue.md(md_table(summary["by_reason"], ("reason", "count"))),
        "formats": dg.MetadataValue.md(md_table(summary["formats"], ("format", "documents"))),
        "sample": dg.MetadataValue.md(sample_rows(load_dataset_dir(stage / "dataset", "ingest"))),
    }, raw_documents=raw_version)
