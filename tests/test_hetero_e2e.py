"""Heterogeneous devices with every agent a real process (docs/algorithms.md, "Heterogeneous devices",
"Deadlines", "Split-point planning"): devices training a full, partial, pruned and fp16 model and one cut short by
its class's cutoff, in the same rounds, end on the masked mean of what they trained, each weighted by the
examples it processed; the per-class costs reach the metrics and the run log; a link that turns slow moves a
device's planned cut between rounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.ml.data import load_digits
from mqttfl.runtime.node import board_energy_j
from mqttfl.runtime.persist import load_state
from mqttfl.tools.broker import Broker
from mqttfl.tools.linkproxy import LinkProxy
from mqttfl.tools.testbed import FleetSpec, Testbed
from tests.helpers import schema
from tests.reference import TOL, hetero_reference, max_abs_diff

CLASSES: dict[str, dict[str, Any]] = {
    "weak": {"train": "partial", "train_blocks": 2, "power_w": 3.0},
    "pruned": {"train": "pruned", "prune": 0.5},
    "half": {"precision": "fp16"},
    "slow": {"tau_s": 0.15},
}


def test_mixed_classes_and_a_cutoff_end_on_the_masked_mean_weighted_by_examples(tmp_path: Path, broker: Broker,
                                                                                fleet: str) -> None:
    train, test = load_digits((64,))
    data = (train.subset(np.arange(800)), test)
    devices = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2", "dev4": "edge2", "dev5": "edge2"}
    extra = {"dev2": {"class": "weak"}, "dev3": {"class": "pruned"}, "dev4": {"class": "half"},
             # 60 ms of emulated board time per mini-batch: five mini-batches take at least 0.3 s, so the 0.15 s
             # cutoff fires after the first, second or third whatever the machine's speed.
             "dev5": {"class": "slow", "step_delay_s": 0.06}}
    spec = FleetSpec(devices=devices, model="mlp", input_shape=(64,), fleet=fleet, device_extra=extra,
                     cloud={"rounds": 2, "batch_size": 32, "lr": 0.3, "momentum": 0.9, "seed": 5, "classes": CLASSES})
    with Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_event("run_complete", 120)
        metrics = tb.round_metrics()
    state = load_state(tmp_path / "state" / "cloud" / "cloud.state")
    assert state is not None and state["round"] == 2
    costs = [m["devices"] for m in metrics]
    assert all(set(c) == set(devices) for c in costs)  # everyone, in every round
    slow = [c["dev5"] for c in costs]
    assert all(s["cutoff"] == 1 and 0 < s["steps"] < costs[0]["dev1"]["steps"] for s in slow)
    assert all(s["samples"] == s["seen"] for s in slow)  # one epoch: weighted by the examples it processed
    assert costs[0]["dev1"]["cut"] == schema("mlp", (64,)).default_cut  # a split device among them
    expected = hetero_reference(spec, data[0], CLASSES, steps={"dev5": [s["steps"] for s in slow]}, rounds=2)
    diff = max_abs_diff(state["global"], expected)
    assert diff <= TOL, f"the global model differs from the masked mean by {diff:.3g}"
    # The costs per class, on metrics and in the run log.
    classes = metrics[-1]["classes"]
    assert set(classes) == {"default", "weak", "pruned", "half", "slow"}
    weak = classes["weak"]
    if board_energy_j() == 0:  # no power sensor on this machine: the estimate is CPU time x the class's power
        assert weak["energy_j"] == round(3.0 * costs[-1]["dev2"]["cpu_s"], 3)
    else:
        assert weak["energy_j"] > 0
    assert weak["T"] >= weak["T_local"] > 0
    assert classes["pruned"]["bytes_up"] < classes["half"]["bytes_up"]  # only the kept entries travel
    assert classes["weak"]["train_mem_mb"] < classes["half"]["train_mem_mb"]
    log = [json.loads(line) for line in (tmp_path / "state" / "cloud" / "runlog.jsonl").read_text().splitlines()]
    assert [e["classes"] for e in log if e.get("kind") == "round"][-1] == classes


def test_a_link_that_turns_slow_moves_the_planned_cut_between_rounds(tmp_path: Path, broker: Broker,
                                                                     fleet: str) -> None:
    train, test = load_digits((1, 8, 8))
    n = schema("cnn", (1, 8, 8)).n_blocks
    spec = FleetSpec(devices={"dev1": "edge1"}, model="cnn", input_shape=(1, 8, 8), fleet=fleet,
                     # A slow board by a fixed emulated cost (45 ms per block and mini-batch, in its profile too):
                     # local training costs ~0.18 s a mini-batch against ~0.05 s split on the fast link and ~0.5 s
                     # on the throttled one, whatever the machine's own speed.
                     device_extra={"dev1": {"block_ms": 15.0}},
                     cloud={"rounds": 40, "batch_size": 32, "lr": 0.05, "plan_cuts": True, "deadline_s": 60.0})
    planned: list[dict[str, Any]] = []

    def cut_of(m: Any) -> bool:
        if m.kind == "metrics" and m.data and m.data.get("kind") == "round" and m.data.get("cut_plan"):
            planned.append(m.data["cut_plan"]["devices"]["dev1"])
        return bool(planned) and planned[-1]["why"] == "planned"

    with LinkProxy(broker.host, broker.port) as proxy, \
            Testbed(tmp_path, spec, broker=broker, data=(train.subset(np.arange(240)), test),
                    auth={"dev1": {"port": proxy.port}}) as tb:
        tb.prepare()
        tb.start()
        # A slow board on a fast link offloads: split at the first cut.
        tb.wait(lambda m: cut_of(m) and planned[-1]["cut"] == 1, 90)
        assert planned[-1]["link_s"] < planned[-1]["device_s"]
        proxy.throttle(300_000)  # the link turns slow: 300 kB/s
        tb.wait(lambda m: cut_of(m) and planned[-1]["cut"] == n, 90)
        moved = tb.wait_event("cuts_planned", 30) if not any(
            m.kind == "event" and m.data and m.data.get("event") == "cuts_planned" for m in tb.inbox) else next(
            m.data for m in tb.inbox if m.kind == "event" and m.data and m.data.get("event") == "cuts_planned")
    assert moved["changed"]["dev1"] == [1, n]
    assert planned[-1]["link_s"] == 0 and planned[-1]["predicted_s"] > 0
