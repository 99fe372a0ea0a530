"""Heterogeneous devices in memory (docs/algorithms.md, "Heterogeneous devices", "Deadlines", "Split-point
planning"): mixed device classes in one round end on the masked mean of their updates; a cutoff returns partial
work weighted by the examples processed; profiles reach the cloud and a slower link moves a device's cut."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from mqttfl.protocol import stage
from mqttfl.protocol.messages import DeviceProfile, DeviceUpdate, EdgeProfile, EdgeUpdate, Probe
from mqttfl.runtime.memory import match
from tests.pair.common import N_BLOCKS, SCHEMA, digits, fleet_of, round_entries, spec
from tests.reference import TOL, hetero_reference, initial_global, max_abs_diff

CLASSES: dict[str, dict[str, Any]] = {
    "weak": {"train": "partial", "train_blocks": 2, "power_w": 2.0},
    "pruned": {"train": "pruned", "prune": 0.6},
    "channels": {"train": "pruned", "prune": 0.5, "prune_by": "channel"},
    "narrow": {"train": "width", "width": 0.5},
    "half": {"precision": "fp16"},
    "int8": {"precision": "int8"},
}
MIXED = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge1", "dev4": "edge1", "dev5": "edge2", "dev6": "edge2",
         "dev7": "edge2"}
CLASS_OF = {"dev2": "weak", "dev3": "pruned", "dev4": "narrow", "dev5": "half", "dev6": "channels", "dev7": "int8"}


def test_mixed_classes_in_one_round_end_on_the_masked_mean_of_their_updates() -> None:
    s = spec(MIXED, cloud={"rounds": 2, "classes": CLASSES},
             device_extra={d: {"class": c} for d, c in CLASS_OF.items()})
    fleet = fleet_of(s)
    updates = fleet.watch(match("delta", msg_type=DeviceUpdate))
    edge_updates = fleet.watch(match("delta", msg_type=EdgeUpdate))
    assert fleet.run_to_end()["event"] == "run_complete"
    diff = max_abs_diff(fleet.global_state(), hetero_reference(s, digits()[0], CLASSES, rounds=2))
    assert diff <= TOL, f"masked aggregation differs from its reference by {diff:.3g}"
    first = {p.src: p.msg for p in updates.hits if p.msg.round == 0}
    # What travelled: a partial model only its trained blocks; a masked one its kept entries and packed masks.
    weak = first["dev2"]
    assert sorted({k.split(".")[0] for k in weak.delta}) == [str(N_BLOCKS - 2), str(N_BLOCKS - 1)]
    assert not weak.masks and not first["dev1"].masks and not first["dev5"].masks
    pruned = first["dev3"]
    kept = {k: v.size for k, v in pruned.delta.items() if k in pruned.masks}
    full = {k: math.prod(SCHEMA.specs()[k].shape) for k in kept}
    assert kept and all(kept[k] == pytest.approx(0.4 * full[k], abs=1) for k in kept)
    assert all(m.dtype == np.uint8 and m.size == (full[k] + 7) // 8 for k, m in pruned.masks.items())
    # Edge1's mean names the samples behind each entry that not every device trained; the partial device's
    # samples stand behind none of its frozen blocks.
    edge1 = next(p.msg for p in edge_updates.hits if p.src == "edge1" and p.msg.round == 0)
    samples = {d: r.samples for d, r in edge1.reports.items()}
    assert edge1.coverage and edge1.coverage["0.1.weight"].max() == sum(samples.values()) - samples["dev2"]
    entry = round_entries(fleet)[-1]
    assert set(entry["classes"]) == {"default", *CLASS_OF.values()}
    weak_costs = entry["classes"]["weak"]
    assert weak_costs["devices"] == 1 and weak_costs["T"] >= weak_costs["T_local"] > 0
    assert weak_costs["energy_j"] == pytest.approx(2.0 * entry["devices"]["dev2"]["cpu_s"], rel=1e-3)
    assert entry["classes"]["default"]["energy_j"] is None  # no power configured, no sensor
    # Stored activations: none for the frozen side, int8 for the quantised device.
    mem = {c: v["train_mem_mb"] for c, v in entry["classes"].items()}
    assert mem["weak"] < mem["narrow"] and mem["int8"] < mem["narrow"]


def test_a_weak_devices_frozen_blocks_stay_bit_identical_and_an_uncovered_parameter_is_unchanged() -> None:
    # Every device partial: the input-side blocks are trained by nobody, so the global model keeps them exactly.
    devices = {"dev1": "edge1", "dev2": "edge1"}
    s = spec(devices, cloud={"rounds": 2, "classes": {"weak": {"train": "partial"}}},
             device_extra={d: {"class": "weak"} for d in devices})
    fleet = fleet_of(s)
    assert fleet.run_to_end()["event"] == "run_complete"
    start, now = initial_global(s), fleet.global_state()
    frozen = [k for k in start if int(k.split(".")[0]) < N_BLOCKS - 1]
    assert frozen and all(np.array_equal(now[k], start[k]) for k in frozen)
    assert any(not np.array_equal(now[k], start[k]) for k in start if k not in frozen)


def test_a_cutoff_returns_partial_work_weighted_by_the_examples_processed() -> None:
    devices = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}

    def compute(job: stage.Job) -> float:
        return 1.0 if isinstance(job, stage.LocalBatch) else 0.001

    classes = {"slow": {"tau_s": 2.5}}
    s = spec(devices, cloud={"rounds": 1, "classes": classes, "cut": N_BLOCKS},
             device_extra={"dev2": {"class": "slow"}})
    fleet = fleet_of(s, compute_s=compute)
    assert fleet.run_to_end()["event"] == "run_complete"
    costs = round_entries(fleet)[-1]["devices"]
    slow = costs["dev2"]
    # Checked after every mini-batch: at 1, 2 and 3 s of training; the third is past 2.5 s, so three batches.
    assert slow["cutoff"] == 1 and slow["steps"] == 3 and slow["seen"] == 3 * 20
    assert slow["samples"] == 60 and costs["dev1"]["steps"] > 3 and costs["dev1"]["cutoff"] == 0
    assert 2.5 <= slow["T_local"] < 2.5 + 1.0 + 0.1  # at most one mini-batch late
    expected = hetero_reference(s, digits()[0], classes, steps={"dev2": [3]})
    assert max_abs_diff(fleet.global_state(), expected) <= TOL


def test_profiles_reach_the_cloud_and_a_slower_link_moves_the_cut_between_rounds() -> None:
    devices = {"dev1": "edge1", "dev2": "edge1"}
    slow_device = (0.05,) * N_BLOCKS
    fast_edge = (0.005,) * N_BLOCKS

    def profile_s(node: str, plan: Any) -> tuple[float, ...]:
        return fast_edge if node.startswith("edge") else slow_device

    s = spec(devices, cloud={"rounds": 5, "plan_cuts": True, "cut": N_BLOCKS},
             device_extra={"dev2": {"cut": 2}})  # a configured cut wins over the planner
    fleet = fleet_of(s, start=False, profile_s=profile_s)
    fleet.set_bandwidth("dev1", "edge1", 1e9)
    fleet.set_bandwidth("dev2", "edge1", 1e9)
    profiles = fleet.watch(match("profile", msg_type=EdgeProfile))
    probes = fleet.watch(match("profile", msg_type=Probe))
    fleet.start()
    fleet.run_until(lambda: len(round_entries(fleet)) >= 2)
    fleet.set_bandwidth("dev1", "edge1", 2e4)  # the link degrades to 20 kB/s
    assert fleet.run_to_end()["event"] == "run_complete"
    entries = round_entries(fleet)
    cuts = [e["devices"]["dev1"]["cut"] for e in entries]
    # Round 0 before any profile: [cloud] cut. Then split at cut 1 while the link is fast, local once it is slow.
    assert cuts[0] == N_BLOCKS and cuts[1] == 1 and cuts[-1] == N_BLOCKS, cuts
    assert all(e["devices"]["dev2"]["cut"] == 2 for e in entries)
    plan = entries[1]["cut_plan"]["devices"]
    assert plan["dev1"]["why"] == "planned" and plan["dev2"]["why"] == "configured"
    assert 0 < plan["dev1"]["predicted_s"] <= entries[1]["cut_plan"]["predicted_round_s"]
    assert fleet.events("cuts_planned")
    measured = [p.msg for p in profiles.hits if isinstance(p.msg, DeviceProfile) and p.src == "dev1"]
    assert measured[0].bandwidth > 1e7 and measured[-1].bandwidth == pytest.approx(2e4, rel=0.05)
    assert {p.src for p in profiles.hits if not isinstance(p.msg, DeviceProfile)} == {"edge1"}
    # dev1 probed in its first round and, once its split round trips grew, again (not in every round).
    drift = fleet.events("link_drift")
    assert drift and {e["device"] for e in drift} == {"dev1"} and drift[0]["wait_over_last"] > 2
    assert 4 * 2 <= len(probes.hits) < 4 * len(entries)


@pytest.mark.parametrize("every", [1, 2])
def test_a_link_measurement_serves_probe_every_rounds(every: int) -> None:
    s = spec({"dev1": "edge1"}, cloud={"rounds": 5, "plan_cuts": True, "probe_every": every})
    fleet = fleet_of(s, start=False)
    fleet.set_bandwidth("dev1", "edge1", 1e8)
    probes = fleet.watch(match("profile", msg_type=Probe))
    profiles = fleet.watch(match("profile", msg_type=DeviceProfile))
    fleet.start()
    assert fleet.run_to_end()["event"] == "run_complete"
    assert len(probes.hits) == 4 * len(range(0, 5, every))  # four round trips in rounds 0, every, 2 every, ...
    assert [p.msg.round for p in profiles.hits] == list(range(5))  # the last measurement goes out every round
    assert not fleet.events("link_drift")
