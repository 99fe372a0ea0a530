"""Server strategies in a whole fleet, in memory: edges forward each device's delta when the rule needs them,
robust rules keep a run on track with a poisoning device, FedProx's term reaches local training, server
optimiser and privacy state survive a cloud restart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mqttfl.protocol.events import Received
from mqttfl.protocol.messages import EdgeUpdate, Report, TrainRound
from mqttfl.runtime.memory import MemoryFleet
from tests.pair.common import N_BLOCKS, fleet_of, initial_global, max_abs_diff, reference_global, round_entries, spec

DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge1", "dev4": "edge2", "dev5": "edge2"}


def run(strategy: str, *, attacker: str | None = None, scale: float = -20.0, split: bool = False,
        **cloud: Any) -> MemoryFleet:
    extra: dict[str, dict[str, Any]] = {d: {} if split and d in ("dev1", "dev4") else {"cut": N_BLOCKS}
                                        for d in DEVICES}
    if attacker:
        extra[attacker]["attack_scale"] = scale
        # The plausibility bound would refuse the scaled delta before any rule saw it: these runs test the rule.
        cloud.setdefault("max_update_norm", 0.0)
    s = spec(DEVICES, cloud={"strategy": strategy, "rounds": 3, **cloud}, device_extra=extra)
    fleet = fleet_of(s)
    assert fleet.run_to_end(max_time=600)["event"] == "run_complete"
    assert fleet.drops() == [] and fleet.job_errors == []
    return fleet


def dist(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2) for k in a)))


def test_robust_rules_make_edges_forward_each_devices_delta() -> None:
    s = spec(DEVICES, cloud={"strategy": "median", "rounds": 1},
             device_extra={"dev1": {}, **{d: {"cut": N_BLOCKS} for d in ("dev2", "dev3", "dev4", "dev5")}})
    fleet = fleet_of(s, start=False)
    ups = fleet.watch(lambda p: isinstance(p.msg, EdgeUpdate))
    plans = fleet.watch(lambda p: isinstance(p.msg, TrainRound))
    fleet.start()
    fleet.run_to_end(max_time=600)
    assert {p.msg.plan.preaggregate for p in plans.hits} == {False}
    by_edge = {p.src: p.msg for p in ups.hits}
    assert set(by_edge["edge1"].deltas) == {"dev1", "dev2", "dev3"} and set(by_edge["edge2"].deltas) == {"dev4", "dev5"}
    assert by_edge["edge1"].delta == {}
    # The split device's forwarded delta covers the whole model: its part plus the edge's part.
    assert set(by_edge["edge1"].deltas["dev1"]) == set(fleet.global_state())


def test_median_with_identical_shards_and_one_device_equals_fedavg() -> None:
    one = {"dev1": "edge1"}
    for strategy in ("median", "krum", "trimmed", "clip", "fednova"):
        s = spec(one, cloud={"strategy": strategy, "rounds": 2}, device_extra={"dev1": {"cut": N_BLOCKS}})
        fleet = fleet_of(s)
        fleet.run_to_end(max_time=600)
        assert max_abs_diff(fleet.global_state(), reference_global(s, 2)) <= 1e-5, strategy


@pytest.mark.parametrize("strategy", ["median", "trimmed", "krum", "clip"])
def test_a_poisoning_device_derails_fedavg_but_not_a_robust_rule(strategy: str) -> None:
    params = {"trim_beta": 0.2, "krum_f": 1, "krum_m": 3}
    g0 = initial_global(spec(DEVICES))
    clean = run("fedavg").global_state()
    # Distances over the whole model (L2): how far training moved it, and how far an attack pushes it off.
    assert dist(run("fedavg", attacker="dev2").global_state(), clean) > 5 * dist(clean, g0)
    robust_clean = run(strategy, **params).global_state()
    robust = run(strategy, attacker="dev2", **params)
    # Bounded: less than what training itself moved the model (the attack on FedAvg: more than five times that).
    assert dist(robust.global_state(), robust_clean) < dist(robust_clean, g0)
    if strategy == "krum":
        assert all("dev2" in e["aggregation"]["rejected"] for e in round_entries(robust))


def test_fedprox_mu_zero_is_fedavg_and_a_large_mu_holds_devices_near_the_global_model() -> None:
    base = run("fedavg", split=True)
    assert max_abs_diff(run("fedprox", mu=0.0, split=True).global_state(), base.global_state()) == 0.0
    g0 = initial_global(spec(DEVICES))
    strong = run("fedprox", mu=5.0, split=True)
    assert 0 < max_abs_diff(strong.global_state(), g0) < 0.7 * max_abs_diff(base.global_state(), g0)


def test_server_optimizer_and_privacy_state_survive_a_cloud_restart() -> None:
    for strategy, cloud in (("fedadam", {"server_lr": 0.05}), ("dpfedavg", {"dp_noise": 0.0, "dp_clip": 100.0})):
        plain = run(strategy, rounds=3, **cloud)
        s = spec(DEVICES, cloud={"strategy": strategy, "rounds": 3, **cloud},
                 device_extra={d: {"cut": N_BLOCKS} for d in DEVICES})
        fleet = fleet_of(s)
        fleet.run_until(lambda f=fleet: f.machine("cloud").policy.completed >= 1, max_time=600)
        fleet.restart("cloud")
        fleet.run_to_end(max_time=600)
        # The round in flight at the restart is retried from the same model and moments: the same end.
        assert max_abs_diff(fleet.global_state(), plain.global_state()) <= 1e-6, strategy
        entries = round_entries(fleet)
        if strategy == "dpfedavg":
            assert entries[-1]["aggregation"]["dp_rounds"] == 3


def test_the_cloud_refuses_an_edge_mean_when_the_rule_needs_each_devices_delta() -> None:
    s = spec({"dev1": "edge1"}, cloud={"strategy": "median", "rounds": 1, "autostart": False},
             device_extra={"dev1": {"cut": N_BLOCKS}})
    fleet = fleet_of(s)
    fleet.run_until(lambda: fleet.machine("cloud").eligible(), max_time=60)
    fleet.command("cloud", "start")
    fleet.run_until(lambda: fleet.machine("cloud").policy.current is not None, max_time=60)
    plan = fleet.machine("cloud").policy.current.plan
    mean = EdgeUpdate(run=plan.run, round=plan.round, attempt=plan.attempt, missing=(),
                      reports={"dev1": Report(samples=10)},
                      delta={k: np.zeros_like(v) for k, v in fleet.global_state().items()})
    fleet.inject("cloud", Received("edge1", mean))
    assert [d["reason"] for d in fleet.drops(node="cloud")] == ["bad_field"]
