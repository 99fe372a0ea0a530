"""Synchronous rounds device <-> edge <-> cloud, in memory: split training ends on unsplit FedAvg."""

from __future__ import annotations

import pytest

from mqttfl.protocol.messages import Activations, Gradients
from mqttfl.tools.testbed import make_shards
from tests.pair.common import N_BLOCKS, SPLIT_CUT, assert_reference, digits, fleet_of, round_entries, spec


def test_split_and_local_devices_on_two_edges_end_on_the_unsplit_reference() -> None:
    s = spec({"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}, device_extra={"dev2": {"cut": N_BLOCKS}})
    fleet = fleet_of(s)
    done = fleet.run_to_end(max_time=600)
    assert done["event"] == "run_complete" and done["rounds"] == 2
    assert_reference(fleet, s, rounds=2)

    shards = make_shards(s, digits()[0])
    entries = round_entries(fleet)
    assert [e["round"] for e in entries] == [0, 1]
    for e in entries:
        assert e["participants"] == 3 and e["missing"] == []
        devs = e["devices"]
        assert {d: devs[d]["cut"] for d in devs} == {"dev1": SPLIT_CUT, "dev2": N_BLOCKS, "dev3": SPLIT_CUT}
        assert {d: devs[d]["edge"] for d in devs} == s.devices
        for d, v in devs.items():
            steps = -(-len(shards[d]) // 20)
            assert v["steps"] == steps and v["seen"] == len(shards[d]) and v["samples"] == len(shards[d])
            # The edge trained one optimizer step per device mini-batch for split devices, none for local ones.
            assert v["edge_steps"] == (0 if d == "dev2" else steps)
            assert v["T_local"] > 0 and v["T_download"] > 0 and v["T_upload"] > 0
        # A device's bytes up are its smashed activations (split devices only) and its delta: the local device
        # sends the whole model's delta in float32 and nothing else.
        model_bytes = 4 * sum(v.size for v in fleet.machine("cloud").global_state.values())
        assert model_bytes <= devs["dev2"]["bytes_up"] < 1.05 * model_bytes
        assert devs["dev1"]["bytes_up"] > 0
        assert min(v["bytes_down"] for v in devs.values()) > 0
    assert fleet.drops() == [] and fleet.job_errors == []
    assert fleet.status("cloud")["state"] == "done"
    assert [r["round"] for r in fleet.runlogs["cloud"]] == [0, 1]


def test_one_f_one_b_with_five_micro_batches_pipelines_and_equals_gradient_accumulation() -> None:
    s = spec({"dev1": "edge1", "dev2": "edge2"}, cloud={"micro_batches": 5},
             device_extra={"dev2": {"cut": N_BLOCKS}})
    fleet = fleet_of(s)
    wire = fleet.watch(lambda p: isinstance(p.msg, (Activations, Gradients)) and "dev1" in (p.src, p.dst))
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)

    sent = [(type(p.msg).__name__[0], p.msg.round, p.msg.step, p.msg.micro) for p in wire.hits]
    first = [x for x in sent if x[1] == 0 and x[2] == 0]
    # 1F1B over a network (K = min(M, 3)): three forwards in flight before the first gradient is back, and
    # the fourth forward only after the first backward.
    assert first[:4] == [("A", 0, 0, 0), ("A", 0, 0, 1), ("A", 0, 0, 2), ("G", 0, 0, 0)]
    assert first.index(("A", 0, 0, 3)) > first.index(("G", 0, 0, 0))
    assert {x[3] for x in sent} == {0, 1, 2, 3, 4}
    assert sum(1 for x in sent if x[0] == "A") == sum(1 for x in sent if x[0] == "G"), "every act answered once"


@pytest.mark.parametrize("wire", [True, False])
def test_the_wire_codec_is_optional_and_changes_nothing(wire: bool) -> None:
    s = spec({"dev1": "edge1"}, cloud={"rounds": 1})
    fleet = fleet_of(s, wire=wire)
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=1)
    assert (fleet.counts("dev1")["tx_bytes"] > 0) == wire


def test_virtual_time_follows_latency_and_compute() -> None:
    s = spec({"dev1": "edge1"}, cloud={"rounds": 1})
    slow = fleet_of(s, latency_s=0.05, compute_s=0.01)
    fast = fleet_of(s, latency_s=0.001, compute_s=0.0001)
    t_slow = slow.run_to_end(max_time=600)["ts"]
    t_fast = fast.run_to_end(max_time=600)["ts"]
    assert t_slow > 20 * t_fast > 0
    # Each mini-batch costs at least two link crossings (act up, grad down) on the device's critical path.
    steps = round_entries(slow)[0]["devices"]["dev1"]["steps"]
    assert round_entries(slow)[0]["devices"]["dev1"]["T_local"] >= steps * 2 * 0.05
    assert max(abs(slow.global_state()[k] - fast.global_state()[k]).max() for k in fast.global_state()) == 0.0
