"""``lmforge.cluster``: which Ray a stage's driver joins, and that it leaves it when the stage ends.  The engines on
a cluster of two nodes (the session's ``ray_cluster``): test_ray_data.py, test_hpsearch.py and
tests/models/test_ray_training.py."""

import pytest

from lmforge.cluster import address, connected
from lmforge.params import ClusterParams


def test_ray_address_wins_over_the_params(monkeypatch):
    """As for every Ray program, ``$RAY_ADDRESS`` names the cluster; params.yaml's ``cluster.address`` otherwise."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert address(ClusterParams(address="auto")) == "10.0.0.7:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert address(ClusterParams(address="auto")) == "auto"


@pytest.mark.slow  # it starts a Ray (a few seconds)
def test_no_address_starts_a_ray_on_this_machine_for_the_block_and_stops_it_after(monkeypatch):
    """``cluster.address: ""`` (the default): a Ray of the stage's own on this machine, gone when the stage ends."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    said: list[str] = []
    with connected(ClusterParams(), report=said.append):
        assert ray.is_initialized() and len(ray.nodes()) == 1
        assert ray.get(ray.put("stored")) == "stored"  # its object store serves this driver
    assert len(said) == 1 and said[0].startswith("ray: started on this machine: 1 node(s), "), said
    assert "dashboard" not in said[0]  # cluster.dashboard: false, the default (its nine processes: ~6-10 s of CPU)
    assert not ray.is_initialized()
