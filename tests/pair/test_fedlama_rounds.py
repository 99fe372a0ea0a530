"""FedLAMA in synchronous rounds, in memory: phi = 1 is FedAvg to the last bit, phi = 2 sends only the layers
due in both directions and ends on an independent replay of the layer-wise schedule; devices and edges without
their previous round's layers get the whole model."""

from __future__ import annotations

from typing import Any

import numpy as np

from mqttfl.fl.aggregate import apply_delta, delta, weighted_average
from mqttfl.protocol.messages import DeviceUpdate, EdgeUpdate, OpenRound, TrainRound
from mqttfl.runtime.memory import MemoryFleet
from mqttfl.tools.testbed import make_shards
from tests.pair.common import N_BLOCKS, digits, fleet_of, initial_global, max_abs_diff, round_entries, spec
from tests.reference import train_like_device

DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}
EXTRA = {"dev2": {"cut": N_BLOCKS}}  # split devices on both edges, and a local one


def lama_spec(phi: int, rounds: int = 6, **cloud: Any) -> Any:
    return spec(DEVICES, cloud={"rounds": rounds, "fedlama_phi": phi, **cloud}, device_extra=EXTRA)


def watch_all(fleet: MemoryFleet) -> Any:
    return fleet.watch(lambda p: isinstance(p.msg, (OpenRound, TrainRound, DeviceUpdate, EdgeUpdate)))


def test_phi_one_is_bit_identical_to_fedavg() -> None:
    fedavg = fleet_of(spec(DEVICES, cloud={"rounds": 4}, device_extra=EXTRA))
    fedavg.run_to_end(max_time=600)
    lama = fleet_of(lama_spec(1, rounds=4))
    lama.run_to_end(max_time=600)
    for k, v in fedavg.global_state().items():
        assert np.array_equal(v, lama.global_state()[k]), k
    assert all(e["fedlama"]["traffic_ratio"] == 1.0 for e in round_entries(lama))


def replay(s: Any, entries: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """FedLAMA replayed without the protocol: every device keeps its layers between rounds, opens each round from
    them with the layers aggregated last round on top, and at the round's end the layers due are averaged."""
    train = digits()[0]
    shards = make_shards(s, train)
    g = initial_global(s)
    local: dict[str, dict[str, np.ndarray]] = {}
    synced = list(g)
    intervals: dict[str, int] = {}
    for rnd, entry in enumerate(entries):
        ends = {}
        for d in sorted(s.devices):
            start = {**local.get(d, g), **{k: g[k] for k in synced}}
            ends[d] = train_like_device(start, s, shards[d], d, rnd)
        due = [k for k in g if (rnd + 1) % intervals.get(k, 1) == 0]
        items = [(delta({k: ends[d][k] for k in due}, {k: g[k] for k in due}), float(len(shards[d])))
                 for d in sorted(s.devices)]
        g = {**g, **apply_delta({k: g[k] for k in due}, weighted_average(items))}
        local, synced = ends, due
        intervals = dict(entry["fedlama"]["intervals"])  # what the cloud decided after this round
    return g


def test_phi_two_sends_only_the_layers_due_both_ways_and_ends_on_the_replayed_schedule() -> None:
    s = lama_spec(2)
    fleet = fleet_of(s, start=False)
    wire = watch_all(fleet)
    fleet.start()
    assert fleet.run_to_end(max_time=600)["event"] == "run_complete"
    assert fleet.drops() == [] and fleet.job_errors == []
    entries = round_entries(fleet)
    keys = list(fleet.global_state())
    relaxed = set(entries[1]["fedlama"]["intervals"])  # adjusted after the first window (rounds 0 and 1)
    assert entries[1]["fedlama"]["adjusted"] and relaxed and all(len(fleet.global_state()[k].shape) >= 2
                                                                 for k in relaxed)
    for p in wire.hits:
        m, rnd = p.msg, p.msg.round
        due_now = [k for k in keys if rnd < 2 or k not in relaxed or (rnd + 1) % 2 == 0]
        due_before = [k for k in keys if rnd < 3 or k not in relaxed or rnd % 2 == 0]
        if isinstance(m, OpenRound):
            assert m.partial == (rnd > 0) and set(m.state) == set(due_before), rnd
        elif isinstance(m, TrainRound):
            assert m.partial == (rnd > 0) and set(m.state) <= set(due_before), rnd
        elif isinstance(m, DeviceUpdate):
            assert set(m.delta) <= set(due_now) and set(m.delta) != set()
        else:
            assert set(m.delta) == set(due_now) and set(m.sqnorms) == set(due_now)
    ratios = [e["fedlama"]["elements_synced"] / e["fedlama"]["elements_total"] for e in entries]
    assert ratios[2] < 0.9 and ratios[3] == 1.0
    assert max_abs_diff(fleet.global_state(), replay(s, entries)) <= 1e-5


def test_a_device_that_missed_a_round_gets_its_whole_part_and_training_goes_on() -> None:
    s = lama_spec(2, rounds=5, quorum=0.3)
    fleet = fleet_of(s, start=False)
    wire = watch_all(fleet)
    fleet.drop(lambda p: isinstance(p.msg, TrainRound) and p.dst == "dev1" and p.msg.round == 2)
    fleet.start()
    assert fleet.run_to_end(max_time=900)["event"] == "run_complete"
    to_dev1 = {p.msg.round: p.msg for p in wire.hits if isinstance(p.msg, TrainRound) and p.dst == "dev1"}
    assert to_dev1[1].partial and not to_dev1[3].partial
    assert set(to_dev1[3].state) == {k for k in fleet.global_state() if int(k.split(".")[0]) < to_dev1[3].cut}
    assert to_dev1[4].partial
    assert "dev1" in round_entries(fleet)[2]["missing"]


def test_an_edge_that_lost_its_copy_reports_its_devices_missing_and_gets_the_whole_model_next() -> None:
    s = lama_spec(2, rounds=4, quorum=0.3)
    fleet = fleet_of(s, start=False)
    wire = watch_all(fleet)
    fleet.start()
    fleet.run_until(lambda: fleet.machine("cloud").policy.completed >= 2, max_time=600)
    fleet.restart("edge1")  # the next round's partial announcement reaches an edge without a copy
    assert fleet.run_to_end(max_time=600)["event"] == "run_complete"
    assert fleet.events("fedlama_state_missing", node="edge1")
    opens = {(p.dst, p.msg.round): p.msg.partial for p in wire.hits if isinstance(p.msg, OpenRound)}
    assert opens[("edge1", 2)] and not opens[("edge1", 3)] and opens[("edge2", 3)]
    assert set(round_entries(fleet)[2]["missing"]) == {"dev1", "dev2"}
