"""``stage_asset``: the Dagster asset of a declared stage, made the same way for every stage.

Every stage's asset does the same things: read ``params.yaml`` (with the launchpad's overrides of one
section for this run), call the stage's function in ``lmforge/`` with a ``RunContext`` (Dagster's run
id and logger, the candidate of a per-candidate stage), show the summary's numbers as metadata, report
its checks, and record where and with which version it was made (``materialized``).  Written once
here, an asset module keeps only what is its own: its description, kinds, checks and the tables it
shows.  Group, upstream assets and code version come from the stage's declaration (``declared``).

No ``from __future__ import annotations`` in this module: Dagster reads the type of the generated
function's ``config`` parameter to build the launchpad form, so it must be a class, not a string.
"""

import functools
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from assets.common import declared, materialized, overrides_config, stage_params, summary_metadata
from assets.resources import ParamsResource
from lmforge import stages
from lmforge.context import RunContext
from lmforge.params import Params, ParamsError, load_params

#: ``show(summary, params, out)``: metadata beyond the summary's numbers (tables, plots, paths).
Show = Callable[[dict[str, Any], Params, Path], dict[str, Any]]
#: ``checks(summary, params, out)``: one result for each of the asset's ``check_specs``.
Checks = Callable[[dict[str, Any], Params, Path], list[dg.AssetCheckResult]]


def _candidates() -> list[str]:
    """Partition keys, read when the code location loads: reload it after editing the candidates."""
    try:
        return [c.name for c in load_params().pretrain.candidates]
    except ParamsError:
        return []  # the run itself reports the params error in one line


#: One partition per pretraining candidate: the partitions of every per-candidate stage.
candidates = dg.StaticPartitionsDefinition(_candidates())


@functools.cache
def run_config(section: str) -> type[dg.Config]:
    """The launchpad form of a params section (every field optional, empty meaning "from params.yaml"),
    one class per section, shared by the stages that read it."""
    config = overrides_config(typing.get_type_hints(Params)[section], "".join(part.title() for part in section.split("_")) + "Config")
    config.__doc__ = f"Overrides of params.yaml `{section}` for one run."
    return config


def run_context(context: dg.AssetExecutionContext) -> RunContext:
    """What the stage logic is told of this Dagster run: its id, its logger, its partition."""
    return RunContext(run_id=context.run_id, log=context.log.info, partition=context.partition_key if context.has_partition_key else None)


def stage_asset(stage: str, run: Callable[..., dict[str, Any]], *, section: str | None = None, show: Show | None = None,
                checks: Checks | None = None, observed: tuple = (), **options: Any) -> dg.AssetsDefinition:
    """The asset of the declared stage ``stage``.

    ``run``: the stage function, ``run(params, ctx)`` or, for a per-candidate stage, ``run(params, candidate, ctx)``.
    ``section``: the params section the launchpad may override for one run (none: params.yaml as it is).
    ``show``/``checks``: what the asset shows beyond the summary's numbers, and its check results.
    ``options``: the rest of ``@dg.asset`` (description, kinds, check_specs, pool).
    A summary with ``skipped`` (the stage's task is not configured) is shown as such, its checks passed
    with the reason: an unreported check would fail the step, a failed one would read like a broken run.
    """
    per_candidate = stages.get(stage).per_candidate
    check_names = [spec.name for spec in options.get("check_specs", [])]

    def body(context: dg.AssetExecutionContext, params: Params) -> dg.MaterializeResult:
        ctx = run_context(context)
        summary = run(params, ctx.partition, ctx=ctx) if per_candidate else run(params, ctx=ctx)
        out = params.stage_dir(stage) / (ctx.partition or "")
        if "skipped" in summary:
            return materialized(stage, params, {"skipped": summary["skipped"]}, check_results=[
                dg.AssetCheckResult(check_name=name, passed=True, description=summary["skipped"]) for name in check_names])
        metadata = {**summary_metadata(summary), "path": dg.MetadataValue.path(str(out)),
                    **({"mlflow_run_id": summary["mlflow_run_id"]} if "mlflow_run_id" in summary else {}),
                    **(show(summary, params, out) if show else {})}
        return materialized(stage, params, metadata, check_results=checks(summary, params, out) if checks else None)

    if section is None:
        def compute(context: dg.AssetExecutionContext, lmforge_params: ParamsResource) -> dg.MaterializeResult:
            return body(context, lmforge_params.load())
    else:
        config_class = run_config(section)

        def compute(context: dg.AssetExecutionContext, config: config_class, lmforge_params: ParamsResource) -> dg.MaterializeResult:
            return body(context, stage_params(lmforge_params.load(), section, config))

    compute.__name__ = stage
    return dg.asset(name=stage, partitions_def=candidates if per_candidate else None, **declared(stage, *observed), **options)(compute)
