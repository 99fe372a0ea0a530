"""Asynchronous group aggregation in memory: versions, groups, and a late delta applied as a stale update."""

from __future__ import annotations

from typing import Any

import pytest

from mqttfl.protocol.messages import EdgeUpdate
from mqttfl.runtime.memory import MemoryFleet
from tests.pair.common import assert_reference, fleet_of, spec

ASYNC: dict[str, Any] = {"mode": "async", "profile_rounds": 1, "max_versions": 8, "group_deadline_s": 3.0,
                         "deadline_s": 30.0}
# In virtual time a device round takes about a second (50 ms per compute job): slow enough for a delayed
# delta to miss its group round while the other group keeps producing versions.
SLOW = {"slowdown": 50.0}


def async_fleet(strategy: str, **cloud: Any) -> tuple[Any, MemoryFleet]:
    s = spec({"dev1": "edge1", "dev2": "edge2"}, cloud={**ASYNC, "strategy": strategy, **cloud},
             device_extra={"dev1": dict(SLOW), "dev2": dict(SLOW)})
    return s, fleet_of(s)


def versions(fleet: MemoryFleet) -> list[dict[str, Any]]:
    return fleet.metrics("version", node="cloud")


def first_group_delta_of_edge1(p: Any) -> bool:
    return p.src == "edge1" and isinstance(p.msg, EdgeUpdate) and p.msg.tag is not None and p.msg.tag.kind == "group"


@pytest.mark.parametrize("strategy", ["fedasync", "ecofl"])
def test_async_run_produces_versions_and_mixes_a_late_delta_in_as_a_stale_update(strategy: str) -> None:
    s, fleet = async_fleet(strategy)
    late = fleet.delay(first_group_delta_of_edge1, seconds=ASYNC["group_deadline_s"] + 1.0)
    done = fleet.run_to_end(max_time=600)

    assert done["event"] == "run_complete" and done["mode"] == "async" and done["strategy"] == strategy
    assert done["versions"] == ASYNC["max_versions"]
    vs = versions(fleet)
    assert [v["version"] for v in vs] == list(range(1, ASYNC["max_versions"] + 1))
    assert vs[0]["group"] == -1 and vs[0]["participants"] == ["dev1", "dev2"], "the profiling round"
    groups = fleet.metrics("groups", node="cloud")
    assert groups and sorted(d for ms in groups[0]["groups"].values() for d in ms) == ["dev1", "dev2"]

    (delayed,) = late.hits
    tag = delayed.msg.tag
    stale = [v for v in vs if v["late"]]
    assert len(stale) == 1, "the delta that missed its round is applied once, late"
    (v,) = stale
    assert v["round"] == delayed.msg.round and v["group"] == tag.group and v["participants"] == ["dev1"]
    # Other versions were committed while it travelled: it is stale, and the strategy damped it.
    assert v["staleness"] >= 1 and v["base_version"] == tag.version and 0 < v["alpha_t"] < 0.6
    assert fleet.nodes["edge1"].outbox == {}, "the late delta was acknowledged"
    assert fleet.status("cloud")["state"] == "done" and fleet.job_errors == []


def test_async_with_one_group_is_synchronous_fedavg() -> None:
    """The ``sync`` strategy runs FedAvg rounds through the asynchronous machinery: same model as sync mode."""
    s, fleet = async_fleet("sync", max_versions=2)
    fleet.run_to_end(max_time=600)
    vs = versions(fleet)
    assert [(v["version"], v["round"], v["participants"]) for v in vs] == \
        [(1, 0, ["dev1", "dev2"]), (2, 1, ["dev1", "dev2"])]
    assert_reference(fleet, s, rounds=2)


def test_an_async_cloud_restarted_mid_run_resumes_its_version_and_open_rounds() -> None:
    s, fleet = async_fleet("fedasync", max_versions=6)
    fleet.run_until(lambda: len(versions(fleet)) >= 3 and fleet.machine("cloud").policy.open, max_time=600)
    before = fleet.machine("cloud").policy.completed
    fleet.restart("cloud")
    assert fleet.machine("cloud").policy.completed == before
    done = fleet.run_to_end(max_time=600)
    assert done["versions"] == 6
    assert fleet.events("resumed", node="cloud")[-1]["round"] == before
    assert [v["version"] for v in versions(fleet)] == list(range(1, 7)), "no version lost or repeated"
