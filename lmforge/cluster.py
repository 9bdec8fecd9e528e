"""The Ray cluster that the ``ray`` engines hand work to (params.yaml ``cluster``; docs/scaling-out.md).

The process running a stage (a Dagster run, ``lmforge run``, a notebook) becomes a Ray *driver*: it
connects to the cluster, submits the work and waits for it, so a run started from the UI, a schedule
or a sensor uses the cluster in the same way, and stopping the run stops its work on the cluster.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from lmforge.params import ClusterParams, LmforgeError


def address(cluster: ClusterParams) -> str:
    """The cluster to join: ``$RAY_ADDRESS`` (as for every Ray program), else ``cluster.address``;
    "" means this machine."""
    return os.environ.get("RAY_ADDRESS") or cluster.address


@contextlib.contextmanager
def connected(cluster: ClusterParams, report=None) -> Iterator[None]:
    """Be a Ray driver for the block: join the cluster (or start one here), and leave it afterwards.

    A driver that is already connected (a test, a notebook) is reused and left connected.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    where = address(cluster)
    say = report or (lambda _msg: None)
    # Ray reports usage to its makers unless told not to; lmforge sends nothing off the machine unasked
    # (set RAY_USAGE_STATS_ENABLED=1 to opt in).  Off, Ray Data also stops polling a Prometheus server
    # from a background thread after every dataset it runs.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        # "": a Ray instance of this block's own, even where `ray start` runs one ("auto" joins that), with
        # its dashboard on 127.0.0.1:8265 (Ray's default host: reachable from this machine only) if asked for
        context = ray.init(address=where) if where else ray.init(address="local", include_dashboard=cluster.dashboard)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LmforgeError(f"cluster.address: cannot join the Ray cluster at '{where}': {exc}") from exc
    resources = ray.cluster_resources()
    dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url and not where else ""
    say(f"ray: {'joined ' + where if where else 'started on this machine'}: {len(ray.nodes())} node(s), "
        f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU{dashboard}")
    try:
        yield
    finally:
        ray.shutdown()
