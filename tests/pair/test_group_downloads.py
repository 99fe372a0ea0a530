"""Group downloads in memory: an edge announces a round once on its broadcast topic to the devices whose
announcement is identical, and the run ends on the same model as with one announcement per device."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import Received
from mqttfl.protocol.messages import MAX_GROUP, OpenRound, TrainRound, parse
from mqttfl.runtime.memory import Fault, MemoryFleet
from mqttfl.wire.topics import BROADCAST
from tests.pair.common import N_BLOCKS, assert_reference, fleet_of, max_abs_diff, round_entries, spec

EDGE1 = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge1"}


def announcements(fleet: MemoryFleet, src: str | None = None) -> Fault:
    """Every TrainRound copy the broker hands a device (a broadcast: one copy per subscriber, same id)."""
    return fleet.watch(lambda p: isinstance(p.msg, TrainRound) and (src is None or p.src == src))


def run(s: Any, **edge: Any) -> tuple[MemoryFleet, Fault]:
    s.edge_extra.update(edge)
    fleet = fleet_of(s, start=False)
    seen = announcements(fleet)
    fleet.start()
    fleet.run_to_end(max_time=600)
    return fleet, seen


def test_identical_announcements_go_out_once_on_the_edge_broadcast_and_train_the_reference() -> None:
    s = spec(EDGE1)
    fleet, seen = run(s)
    assert_reference(fleet, s, rounds=2)
    # One publish per round, encoded once, naming the three devices; the broker copies it to each.
    assert fleet.counts("edge1")["tx_model"] == 2 and fleet.counts("edge1")["group_downloads"] == 2
    assert len({p.env.id for p in seen.hits}) == 2
    assert all(p.env.dst == BROADCAST and p.msg.devices == ("dev1", "dev2", "dev3") for p in seen.hits)
    assert sorted(p.dst for p in seen.hits) == sorted([*EDGE1] * 2)


def test_the_off_switch_sends_one_announcement_per_device_and_trains_the_same_model() -> None:
    grouped, _ = run(spec(EDGE1))
    s = spec(EDGE1)
    fleet, seen = run(s, group_downloads=False)
    assert_reference(fleet, s, rounds=2)
    assert fleet.counts("edge1")["tx_model"] == 6 and "group_downloads" not in fleet.counts("edge1")
    assert all(p.env.dst == p.dst and p.msg.devices == () for p in seen.hits)
    assert max_abs_diff(fleet.global_state(), grouped.global_state()) == 0.0


def test_distinct_announcements_keep_their_own_message() -> None:
    # dev3 trains the whole model (another cut), dev4 takes the model in fp16 (another encoding).
    devices = {**EDGE1, "dev4": "edge1"}
    s = spec(devices, device_extra={"dev3": {"cut": N_BLOCKS}, "dev4": {"model_encoding": "fp16"}})
    fleet, seen = run(s)
    for rnd in (0, 1):
        sent = {p.env.id: p for p in seen.hits if p.env.round == rnd}.values()
        shapes = sorted((p.env.dst, p.msg.devices, p.msg.cut) for p in sent)
        cut = next(p.msg.cut for p in sent if p.env.dst == BROADCAST)
        assert shapes == sorted([(BROADCAST, ("dev1", "dev2"), cut), ("dev3", (), N_BLOCKS), ("dev4", (), cut)])
        assert next(p for p in sent if p.env.dst == "dev4").env.body["enc"] == "fp16"
    assert [sorted(e["devices"]) for e in round_entries(fleet)] == [sorted(devices)] * 2


def test_a_device_not_named_ignores_the_group_and_counts_it() -> None:
    # Two of the three devices train each round: the third hears its edge's broadcast and leaves it.
    s = spec(EDGE1, cloud={"sample_size": 2, "rounds": 3})
    fleet, seen = run(s)
    rounds = round_entries(fleet)
    assert len(rounds) == 3 and all(len(e["devices"]) == 2 for e in rounds)
    for d in EDGE1:
        left_out = sum(d not in e["devices"] for e in rounds)
        assert fleet.counts(d)["group_not_named"] == left_out
        assert fleet.machine(d).rounds_done == 3 - left_out
    assert all(p.msg.devices == tuple(sorted(e["devices"])) for p in seen.hits for e in rounds
               if e["round"] == p.env.round)


def test_a_device_that_moved_between_rounds_hears_only_its_new_edge() -> None:
    devices = {"dev1": "edge1", "dev2": "edge1", "dev5": "edge1", "dev3": "edge2", "dev4": "edge2"}

    def moved(group: bool) -> tuple[MemoryFleet, Fault]:
        s = spec(devices, cloud={"rounds": 3})
        s.edge_extra["group_downloads"] = group
        fleet = fleet_of(s, start=False)
        seen = announcements(fleet)
        fleet.start()
        fleet.run_until(lambda: fleet.machine("cloud").policy.completed >= 1 and fleet.machine("dev1").round is None,
                        max_time=600)
        assert fleet.command("dev1", "move", edge="edge2")["ok"]
        fleet.run_to_end(max_time=600)
        return fleet, seen

    fleet, seen = moved(True)
    assert fleet.nodes["dev1"].following == ("edge2",)
    # After its first round at edge2, edge1's broadcasts (still to dev2 and dev5) no longer reach dev1.
    assert {p.msg.devices for p in seen.hits if p.src == "edge1" and p.env.round == 2} == {("dev2", "dev5")}
    assert not [p for p in seen.hits if p.src == "edge1" and p.dst == "dev1" and p.env.round == 2]
    assert [p.msg.devices for p in seen.hits if p.dst == "dev1" and p.env.round == 2] == [("dev1", "dev3", "dev4")]
    assert round_entries(fleet)[-1]["devices"]["dev1"]["edge"] == "edge2"
    per_device, _ = moved(False)
    assert max_abs_diff(fleet.global_state(), per_device.global_state()) <= 1e-6


def test_a_device_offline_when_the_group_goes_out_gets_it_from_its_session() -> None:
    s = spec(EDGE1)
    fleet = fleet_of(s, start=False)
    opened = fleet.watch(lambda p: isinstance(p.msg, OpenRound) and p.env.round == 1)
    fleet.start()
    fleet.run_until(lambda: opened.hits, max_time=600)
    fleet.kill("dev2")  # before edge1 announces round 1: the broker keeps the broadcast in dev2's session
    fleet.run_for(2.0)
    assert fleet.nodes["dev2"].queued and isinstance(fleet.nodes["dev2"].queued[0].msg, TrainRound)
    fleet.restart("dev2")
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)
    assert [sorted(e["devices"]) for e in round_entries(fleet)] == [sorted(EDGE1)] * 2


@functools.cache
def _group() -> TrainRound:
    fleet, seen = run(spec(EDGE1))
    msg = seen.hits[0].msg
    assert isinstance(msg, TrainRound)
    return msg


def _group_body(**over: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    body, tensors = _group().to_wire()
    return {**body, **over}, tensors


@pytest.mark.parametrize("devices", [["dev1"], ["dev1", "dev1"], ["dev1", "Bad/id"], ["dev1", 3],
                                     [f"d{i}" for i in range(MAX_GROUP + 1)], "dev1,dev2"])
def test_a_malformed_group_is_refused_at_the_boundary(devices: Any) -> None:
    body, tensors = _group_body(devices=devices)
    with pytest.raises(ProtocolError):
        parse("model", "r1", 0, body, tensors)


def test_a_group_carries_no_per_device_fields() -> None:
    body, tensors = _group_body(helpers=["dev9"])
    with pytest.raises(ProtocolError):
        parse("model", "r1", 0, body, tensors)
    body, tensors = _group_body()
    assert parse("model", "r1", 0, body, tensors).devices == ("dev1", "dev2", "dev3")


def test_a_group_from_another_edge_than_the_devices_is_dropped() -> None:
    group = _group()
    fleet = fleet_of(spec({"dev1": "edge1", "dev3": "edge2"}, cloud={"autostart": False}))
    fleet.run_for(1.0)
    later = replace(group, plan=replace(group.plan, round=5), round=5, edge="edge2", devices=("dev1", "dev3"))
    fleet.inject("dev1", Received("edge2", later, b"x" * 16))
    assert [d["reason"] for d in fleet.drops(node="dev1")] == ["unknown_sender"]
    assert fleet.machine("dev1").round is None
    fleet.inject("dev1", Received("edge1", replace(later, edge="edge1", devices=("dev2", "dev3")), b"y" * 16))
    assert fleet.counts("dev1")["group_not_named"] == 1 and fleet.machine("dev1").round is None
