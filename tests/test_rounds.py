"""Round mechanics end to end, with real agent processes: hierarchical FedAvg, deadlines, quorum and retries."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from mqttfl.fl.aggregate import apply_delta, delta, weighted_average
from mqttfl.tools import testbed
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec, make_shards
from tests.helpers import schema
from tests.reference import TOL, initial_global, max_abs_diff, reference_global, train_like_device
from tests.test_split_e2e import cloud_state, digits


def test_edge_preaggregation_then_cloud_aggregation_equals_flat_fedavg(tmp_path: Path, broker: Broker,
                                                                       fleet: str) -> None:
    n_blocks = schema("mlp", (64,)).n_blocks
    # Unequal edges (3 devices and 1) and unequal shards (dev1 holds 40%); split and local devices mixed.
    spec = FleetSpec(devices={"dev1": "edge1", "dev2": "edge1", "dev3": "edge1", "dev4": "edge2"},
                     model="mlp", input_shape=(64,), partition="imbalanced:0.4", fleet=fleet,
                     device_extra={"dev2": {"cut": n_blocks}, "dev4": {"cut": n_blocks}},
                     cloud={"rounds": 1, "batch_size": 64, "lr": 0.05, "seed": 11})
    data = digits((64,))
    sizes = {n: len(s) for n, s in make_shards(spec, data[0]).items()}
    assert len(set(sizes.values())) > 1, sizes
    with testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_event("run_complete", 120)
        [m] = tb.round_metrics()
    assert m["participants"] == 4 and m["missing"] == []
    assert {d: v["edge"] for d, v in m["devices"].items()} == spec.devices
    assert {d: v["samples"] for d, v in m["devices"].items()} == sizes
    expected = reference_global(spec, data[0], rounds=1)
    diff = max_abs_diff(cloud_state(tmp_path)["global"], expected)
    assert diff <= TOL, f"edge pre-aggregation + cloud FedAvg differs from flat FedAvg by {diff:.3g}"
    # Averaging the two edges' means equally (ignoring their sample counts) would give another model, so
    # the comparison above really checks the sample weighting across the hierarchy.
    g0 = initial_global(spec)
    shards = make_shards(spec, data[0])
    deltas = {n: delta(train_like_device(g0, spec, shards[n], n, 0), g0) for n in spec.devices}
    edge1 = weighted_average([(deltas[n], float(sizes[n])) for n in ("dev1", "dev2", "dev3")])
    equal_edges = apply_delta(g0, weighted_average([(edge1, 1.0), (deltas["dev4"], 1.0)]))
    assert max_abs_diff(expected, equal_edges) > 100 * TOL


def _silent_device_fleet(fleet: str, cloud: dict[str, object]) -> FleetSpec:
    n_blocks = schema("mlp", (64,)).n_blocks
    # Local training (cut = end) keeps the answering devices deterministic and fast.
    return FleetSpec(devices={"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}, model="mlp", input_shape=(64,),
                     fleet=fleet, device_extra={d: {"cut": n_blocks} for d in ("dev1", "dev2", "dev3")},
                     cloud={"batch_size": 64, "lr": 0.05, "seed": 5, "autostart": False, **cloud})


def test_silent_device_does_not_stall_the_round(tmp_path: Path, broker: Broker, fleet: str) -> None:
    deadline = 10.0
    spec = _silent_device_fleet(fleet, {"rounds": 1, "deadline_s": deadline, "quorum": 0.5})
    spec.devices = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge1"}  # the silent one shares an edge
    data = digits((64,))
    with testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_online(["cloud", "edge1", "dev1", "dev2", "dev3"])
        # Stopped, not dead: its connection and its retained "online" status stay, it just never answers.
        os.kill(tb.procs["dev3"].pid, signal.SIGSTOP)
        try:
            assert tb.ctl("cloud", "start")["ok"]
            tb.wait_event("run_complete", deadline * 3)
            [m] = tb.round_metrics()
        finally:
            os.kill(tb.procs["dev3"].pid, signal.SIGCONT)
    assert m["missing"] == ["dev3"] and m["participants"] == 2
    assert m["round_s"] < deadline + 2.0
    state = cloud_state(tmp_path)
    assert state["round"] == 1 and state["state"] == "done"
    # The round's result is FedAvg over the devices that answered, nothing of the silent one.
    diff = max_abs_diff(state["global"], reference_global(spec, data[0], rounds=1, participants=["dev1", "dev2"]))
    assert diff <= TOL


def test_round_below_quorum_is_retried_then_the_run_fails(tmp_path: Path, broker: Broker, fleet: str) -> None:
    spec = _silent_device_fleet(fleet, {"rounds": 2, "deadline_s": 8.0, "quorum": 1.0, "max_attempts": 2})
    data = digits((64,))
    with testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_online(["cloud", "edge1", "edge2", "dev1", "dev2", "dev3"])
        os.kill(tb.procs["dev3"].pid, signal.SIGSTOP)
        try:
            assert tb.ctl("cloud", "start")["ok"]
            first = tb.wait_event("quorum_not_met", 30)
            second = tb.wait_event("quorum_not_met", 30)
            status = tb.ctl("cloud", "status")
        finally:
            os.kill(tb.procs["dev3"].pid, signal.SIGCONT)
    assert (first["round"], first["action"], first["level"]) == (0, "retry", "warning")
    assert first["needed"] == 3 and first["reported"] <= 2
    assert (second["round"], second["action"], second["level"]) == (0, "fail", "error")
    assert second["attempt"] == first["attempt"] + 1, "the retry is a new attempt of the same round"
    assert status["ok"] and status["result"]["state"] == "failed" and status["result"]["round"] == 0
    state = cloud_state(tmp_path)
    assert state["state"] == "failed" and state["round"] == 0 and state["history"] == []
    # Nothing of the failed attempts reached the global model.
    assert max_abs_diff(state["global"], initial_global(spec)) == 0.0
