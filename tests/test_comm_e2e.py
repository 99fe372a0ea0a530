"""Fewer bytes and other aggregation rules end to end, every agent a real process through a real broker: a
compressed split round, FedLAMA with phi = 1 equal to FedAvg to the last bit, a server optimiser, and a robust
rule dropping a poisoning device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.fl.aggregate import apply_delta, delta, weighted_average
from mqttfl.fl.fedopt import ServerOptimizer
from mqttfl.tools import testbed
from mqttfl.tools.bench import comm
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec, make_shards
from tests.helpers import schema
from tests.reference import TOL, initial_global, max_abs_diff, reference_global, train_like_device
from tests.test_split_e2e import cloud_state, digits

MLP = {"model": "mlp", "input_shape": (64,)}
BASE = {"batch_size": 64, "lr": 0.05, "momentum": 0.9, "seed": 7}


def run(root: Path, broker: Broker, spec: FleetSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(persisted cloud state, round metrics)."""
    with testbed.Testbed(root, spec, broker=broker, data=digits(spec.input_shape)) as tb:
        tb.prepare()
        tb.start()
        tb.wait_event("run_complete", 150)
        metrics = tb.round_metrics()
    return cloud_state(root), metrics


def test_a_compressed_split_round_moves_a_quarter_of_the_bytes_and_still_trains(tmp_path: Path, broker: Broker,
                                                                                 fleet: str) -> None:
    spec = FleetSpec(devices={"dev1": "edge1", "dev2": "edge1"}, **MLP, fleet=fleet,
                     cloud={**BASE, "rounds": 2, "act_encoding": "int8", "grad_encoding": "int8",
                            "model_encoding": "fp16"},
                     device_extra={"dev2": {"act_encoding": "int8c"}})
    # The measuring core of `mqttfl bench comm`'s real-process sections.
    result = comm.real_run(tmp_path, broker, spec, digits((64,)), 150)
    state, metrics, counters = cloud_state(tmp_path), result["metrics"], result["nodes"]
    assert state["round"] == 2 and all(m["participants"] == 2 for m in metrics)
    assert result["rounds"] == 2 and result["enc_bytes_act"] <= 0.3 * result["raw_bytes_act"]
    assert result["bytes_per_round"] > result["enc_bytes_act"] / 2
    for dev in ("dev1", "dev2"):
        c = counters[dev]
        assert c["enc_bytes_act"] <= 0.3 * c["raw_bytes_act"]
    e = counters["edge1"]
    assert e["enc_bytes_grad"] <= 0.3 * e["raw_bytes_grad"]
    assert e["enc_bytes_model"] <= 0.51 * e["raw_bytes_model"]  # the device parts went down in fp16
    ref, g0 = reference_global(spec, digits((64,))[0], rounds=2), initial_global(spec)
    assert max_abs_diff(state["global"], ref) < 0.25 * max_abs_diff(ref, g0)


def test_fedlama_with_phi_one_ends_on_fedavgs_model_to_the_last_bit(tmp_path: Path, broker: Broker,
                                                                   fleet: str) -> None:
    n_blocks = schema("mlp", (64,)).n_blocks
    models = []
    for name, extra in (("fedavg", {}), ("fedlama", {"fedlama_phi": 1})):
        spec = FleetSpec(devices={"dev1": "edge1", "dev2": "edge1"}, **MLP, fleet=f"{fleet}-{name}",
                         cloud={**BASE, "rounds": 3, **extra}, device_extra={"dev2": {"cut": n_blocks}})
        state, metrics = run(tmp_path / name, broker, spec)
        models.append(state["global"])
        if extra:
            assert [m["fedlama"]["traffic_ratio"] for m in metrics] == [1.0, 1.0, 1.0]
    for k, v in models[0].items():
        assert np.array_equal(v, models[1][k]), k
    assert max_abs_diff(models[0], reference_global(spec, digits((64,))[0], rounds=3)) <= TOL


def test_fedadam_steps_the_aggregated_delta_with_moments_carried_across_rounds(tmp_path: Path, broker: Broker,
                                                                              fleet: str) -> None:
    n_blocks = schema("mlp", (64,)).n_blocks
    spec = FleetSpec(devices={"dev1": "edge1", "dev2": "edge2"}, **MLP, fleet=fleet,
                     cloud={**BASE, "rounds": 3, "strategy": "fedadam", "server_lr": 0.02},
                     device_extra={"dev2": {"cut": n_blocks}})
    state, _ = run(tmp_path, broker, spec)
    train = digits((64,))[0]
    shards = make_shards(spec, train)
    g = initial_global(spec)
    opt = ServerOptimizer("adam", 0.02)
    for rnd in range(3):
        mean = weighted_average([(delta(train_like_device(g, spec, shards[d], d, rnd), g), float(len(shards[d])))
                                 for d in sorted(spec.devices)])
        g = apply_delta(g, opt.step(mean))
    assert max_abs_diff(state["global"], g) <= TOL
    assert set(state["policy"]["strategy"]["opt"]["m"]) == set(g)
    assert max_abs_diff(g, reference_global(spec, train, rounds=3)) > 100 * TOL  # not FedAvg in disguise


def test_krum_drops_a_poisoning_device_and_keeps_the_honest_devices_model(tmp_path: Path, broker: Broker,
                                                                         fleet: str) -> None:
    n_blocks = schema("mlp", (64,)).n_blocks
    devices = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2", "dev4": "edge2"}
    spec = FleetSpec(devices=devices, **MLP, fleet=fleet,
                     cloud={**BASE, "rounds": 2, "strategy": "krum", "krum_f": 1, "krum_m": 2,
                            # the rule, not the plausibility bound, is what this run tests
                            "max_update_norm": 0.0},
                     # dev4 is the attack emulation: its delta, scaled by -10, is what a poisoning client sends.
                     device_extra={**{d: {"cut": n_blocks} for d in devices}, "dev4": {"cut": n_blocks,
                                                                                      "attack_scale": -10.0}})
    state, metrics = run(tmp_path, broker, spec)
    selected = [m["aggregation"]["selected"] for m in metrics]
    assert all("dev4" in m["aggregation"]["rejected"] and len(s) == 2 for m, s in zip(metrics, selected, strict=True))
    # The model is FedAvg over the devices Krum kept, round by round: nothing of the attacker.
    expected = reference_global(spec, digits((64,))[0], rounds=selected)
    assert max_abs_diff(state["global"], expected) <= TOL
