"""The in-memory fleet itself: what it keeps of the real runtime (wire checks, presence, control, determinism)."""

from __future__ import annotations

import numpy as np

from mqttfl.protocol.messages import Activations, DeviceUpdate, Report
from mqttfl.tools.testbed import make_shards
from mqttfl.wire.codec import Envelope
from tests.pair.common import SCHEMA, SPLIT_CUT, digits, fleet_of, round_entries, spec


def test_a_fleet_from_a_spec_has_the_testbeds_shards_and_cloud_section() -> None:
    s = spec({"dev1": "edge1", "dev2": "edge2"}, extra_edges=("edge3",), cloud={"quorum": 0.7},
             device_extra={"dev2": {"cut": 3, "act_timeout_s": 2.5, "threads": 1}})
    fleet = fleet_of(s, start=False)
    shards = make_shards(s, digits()[0])
    assert sorted(fleet.nodes) == ["cloud", "dev1", "dev2", "edge1", "edge2", "edge3"]
    fleet.start()
    for d in ("dev1", "dev2"):
        assert fleet.machine(d).n_samples == len(shards[d])
    assert fleet.machine("dev2").cut_pref == 3 and fleet.machine("dev2").act_timeout_s == 2.5
    settings = fleet.machine("cloud").settings
    assert (settings.min_devices, settings.quorum, settings.run) == (2, 0.7, "r1")
    fleet.run_to_end(max_time=600)
    assert {d: v["cut"] for d, v in round_entries(fleet)[0]["devices"].items()} == {"dev1": SPLIT_CUT, "dev2": 3}


def test_the_same_seed_gives_the_same_run_to_the_last_bit_and_event() -> None:
    s = spec({"dev1": "edge1", "dev2": "edge2"})
    runs = []
    for _ in range(2):
        fleet = fleet_of(s, seed=3)
        fleet.run_to_end(max_time=600)
        runs.append(fleet)
    a, b = runs
    assert [(e["event"], e["ts"]) for e in a.event_log] == [(e["event"], e["ts"]) for e in b.event_log]
    assert all(np.array_equal(a.global_state()[k], b.global_state()[k]) for k in a.global_state())


def test_presence_reaches_the_cloud_and_a_killed_node_goes_offline() -> None:
    fleet = fleet_of(spec({"dev1": "edge1", "dev2": "edge1"}))
    fleet.run_until(lambda: round_entries(fleet), max_time=600)
    seen = fleet.machine("cloud").fleet
    assert seen["dev1"].online and seen["dev1"].edge == "edge1" and seen["dev1"].samples > 0
    assert seen["dev1"].labels is not None and sum(seen["dev1"].labels) == seen["dev1"].samples
    fleet.kill("dev2")
    fleet.run_for(1.0)
    assert fleet.status("dev2")["state"] == "offline" and not fleet.machine("cloud").fleet["dev2"].online
    fleet.restart("dev2")
    fleet.run_for(1.0)
    assert fleet.machine("cloud").fleet["dev2"].online and fleet.status("dev2")["boot"] == 2
    # A restarted cloud learns the fleet from the retained statuses alone.
    fleet.restart("cloud")
    fleet.run_for(1.0)
    assert {n for n, p in fleet.machine("cloud").fleet.items() if p.online} == {"dev1", "dev2", "edge1"}


def test_malformed_messages_are_dropped_at_the_boundary_and_counted() -> None:
    fleet = fleet_of(spec({"dev1": "edge1"}))
    fleet.run_until(lambda: fleet.machine("edge1").session_of("dev1")[1] is not None, max_time=60)
    x = np.full((4, *SCHEMA.activation(SPLIT_CUT)), np.nan, np.float32)
    nan_act = Activations(run="r1", round=0, step=0, micro=0, n_micro=1, batch_size=4, attempt=0, x=x,
                          y=np.zeros(4, np.int64))
    body, tensors = nan_act.to_wire()
    fleet.send_raw(Envelope(kind="act", src="dev9", dst="edge1", body=body, tensors=tensors, run="r1"))
    bad = DeviceUpdate(run="r1", round=0, report=Report(samples=5), delta={})
    body, tensors = bad.to_wire()
    body["report"]["t_local"] = "x"
    fleet.send_raw(Envelope(kind="delta", src="dev1", dst="edge1", body=body, tensors=tensors, run="r1"))
    fleet.run_for(0.1)
    assert [d["reason"] for d in fleet.drops(node="edge1")] == ["non_finite", "bad_field"]
    assert fleet.counts("edge1")["drop_non_finite"] == 1 and fleet.events("dropped", node="edge1")
    fleet.run_to_end(max_time=600)
    assert round_entries(fleet)[0]["participants"] == 1, "the round was not disturbed"


def test_commands_are_authorised_and_checked_like_the_runtime_does() -> None:
    fleet = fleet_of(spec({"dev1": "edge1"}))
    assert fleet.command("dev1", "ping")["result"]["pong"] is True
    denied = fleet.command("dev1", "move", src="dev9", edge="edge2")
    assert (denied["ok"], denied["code"]) == (False, "unauthorised")
    assert fleet.command("edge1", "nonsense")["code"] == "unknown_command"
    bad = fleet.command("cloud", "set", rounds=-1)
    assert bad["ok"] is False and "rounds" in bad["error"]
    status = fleet.command("cloud", "status")["result"]
    assert status["run"] == "r1" and status["mode"] == "sync"
    # The cloud forwards a move to a device it knows of, which answers the cloud.
    assert fleet.command("cloud", "move", device="dev1", edge="edge1")["code"] == "unknown_node"
    fleet.run_until(lambda: "dev1" in fleet.machine("cloud").fleet, max_time=1)
    assert fleet.command("cloud", "move", device="dev1", edge="edge1")["result"]["forwarded"]
    fleet.run_for(0.1)
    (answer,) = [r for r in fleet.replies if r["node"] == "dev1" and r["to"] == "cloud"]
    assert answer["cmd"] == "move" and answer["result"]["reason"] == "already there"
