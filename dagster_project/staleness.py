"""What ``lmforge run`` recomputes: the stages whose outputs in *this* artifacts directory were made by
other code, other parameters or other inputs than the ones in force now.

Dagster's own staleness (what the UI shows) compares an asset with its latest materialization,
whichever params file or size tier made it.  One project can hold several corpora (another params
file, another artifacts directory) in one Dagster instance, and a run of one of them must not make
the others look out of date.  So every materialization records the artifacts directory it wrote and
the stage's version as run (``assets.common.materialized``), and staleness is judged per directory:

- a stage (or partition) is out of date when this directory has no materialization of it, or its
  ``summary.json`` is gone, or its *lineage* differs from the lineage it would have now;
- a lineage is a hash of the stage's version (code files, params values: ``assets.common.code_version``)
  and the lineages of the inputs it read (the newest materialization of each parent in this directory
  before it; the raw documents' fingerprint for ``ingest``), like Dagster's logical data versions.
  A forced re-run that changes nothing keeps its lineage, so nothing downstream is recomputed.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg

from assets.common import ARTIFACTS_KEY, RAW_KEY, VERSION_KEY, code_version
from dagster_project.sensors import RAW_DOCUMENTS
from lmforge.ingest import source_fingerprint
from lmforge.params import Params

MISSING = "missing"


@dataclass(frozen=True)
class Made:
    """One materialization of a stage (or partition) in this artifacts directory."""

    storage_id: int
    version: str
    raw: str | None


class Staleness:
    """Lineages of the stages of ``graph`` in the artifacts directory of ``params``, from ``instance``'s event log."""

    def __init__(self, instance: dg.DagsterInstance, graph, params: Params):
        self.instance, self.graph, self.params = instance, graph, params
        self.here = str(params.artifacts)

    @functools.cache
    def _history(self, key: dg.AssetKey) -> dict[str | None, list[Made]]:
        """This directory's materializations of ``key`` by partition, newest first."""
        out: dict[str | None, list[Made]] = {}
        for record in self._records(key):
            metadata = record.asset_materialization.metadata
            if ARTIFACTS_KEY not in metadata or metadata[ARTIFACTS_KEY].value != self.here:
                continue
            raw = metadata[RAW_KEY].value if RAW_KEY in metadata else None
            made = Made(record.storage_id, metadata[VERSION_KEY].value, raw)
            out.setdefault(record.partition_key, []).append(made)
        return out

    def _records(self, key: dg.AssetKey) -> Iterator:
        cursor = None
        while True:
            result = self.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1000, cursor=cursor, ascending=False)
            yield from result.records
            if not result.has_more:
                return
            cursor = result.cursor

    def latest(self, key: dg.AssetKey, partition: str | None, before: int | None = None) -> Made | None:
        for made in self._history(key).get(partition, []):
            if before is None or made.storage_id < before:
                return made
        return None

    def _input_partitions(self, key: dg.AssetKey, parent: dg.AssetKey, partition: str | None) -> list[str | None]:
        """The parent's partitions a (partition of a) stage reads: the same candidate, or every one."""
        parent_def = self.graph.get(parent).partitions_def
        if parent_def is None:
            return [None]
        if partition is not None and self.graph.get(key).partitions_def == parent_def:
            return [partition]
        return list(parent_def.get_partition_keys())

    @functools.cache
    def lineage(self, key: dg.AssetKey, partition: str | None, made: Made | None) -> str:
        """The lineage of one materialization (``made``), or the one the stage would have now (None)."""
        if made is None:
            version = code_version(key.to_user_string(), self.params)
        else:
            version = made.version
        h = hashlib.sha256(version.encode())
        for parent in sorted(self.graph.get(key).parent_keys):
            if parent == RAW_DOCUMENTS:
                raw = made.raw if made is not None else self.raw_version
                h.update(b"\0raw\0" + (raw or MISSING).encode())
                continue
            for p in self._input_partitions(key, parent, partition):
                if made is None:
                    used = self.lineage(parent, p, None)
                else:
                    before = self.latest(parent, p, before=made.storage_id)
                    used = self.lineage(parent, p, before) if before is not None else MISSING
                h.update(f"\0{parent.to_user_string()}[{p or ''}]\0{used}".encode())
        return h.hexdigest()

    @functools.cached_property
    def raw_version(self) -> str:
        return source_fingerprint(self.params)[0]

    def out_of_date(self, key: dg.AssetKey, partition: str | None) -> bool:
        made = self.latest(key, partition)
        summary = self.params.stage_dir(key.to_user_string()) / (partition or "") / "summary.json"
        return made is None or not summary.exists() or self.lineage(key, partition, made) != self.lineage(key, partition, None)
