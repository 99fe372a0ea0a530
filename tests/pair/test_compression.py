"""Compression on the wire, in memory: encodings chosen per kind and per device, visible in every message,
counted before and after; top-k error feedback whose residual survives a restart and a move."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mqttfl.protocol.messages import Activations, DeviceUpdate, Gradients, OpenRound, TrainRound
from mqttfl.runtime.memory import MemoryFleet
from tests.pair.common import N_BLOCKS, fleet_of, initial_global, max_abs_diff, reference_global, spec

SPLIT = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}


def sent(fleet: MemoryFleet, kind: type, src: str | None = None) -> list[Any]:
    return fleet.watch(lambda p: isinstance(p.msg, kind) and (src is None or p.src == src))


def test_int8_activations_and_gradients_per_device_choices_and_counted_bytes() -> None:
    s = spec(SPLIT, cloud={"act_encoding": "int8", "grad_encoding": "int8c", "model_encoding": "fp16"},
             device_extra={"dev2": {"act_encoding": "fp16", "grad_encoding": "none"}})
    fleet = fleet_of(s, start=False)
    acts, grads = sent(fleet, Activations), sent(fleet, Gradients)
    models = sent(fleet, TrainRound)
    opens = sent(fleet, OpenRound)
    fleet.start()
    assert fleet.run_to_end(max_time=600)["event"] == "run_complete"
    assert fleet.drops() == [] and fleet.job_errors == []

    def encs(hits: list[Any], node: str, end: str) -> set[str]:
        return {p.env.body.get("enc", "none") for p in hits if getattr(p, end) == node}

    # The plan's choice, and dev2's own ([device] keys) on top of it, in the body of every message.
    assert encs(acts.hits, "dev1", "src") == encs(acts.hits, "dev3", "src") == {"int8"}
    assert encs(acts.hits, "dev2", "src") == {"fp16"}
    assert encs(grads.hits, "dev1", "dst") == {"int8c"} and encs(grads.hits, "dev2", "dst") == {"none"}
    assert {p.env.body["enc"] for p in models.hits} == {"fp16"} and {p.env.body["enc"] for p in opens.hits} == {"fp16"}
    # int8 is a quarter of float32 plus its scales, fp16 half; the int64 labels travel as they are.
    c1, c2 = fleet.counts("dev1"), fleet.counts("dev2")
    assert c1["enc_bytes_act"] <= 0.3 * c1["raw_bytes_act"] and c2["enc_bytes_act"] <= 0.55 * c2["raw_bytes_act"]
    e2 = fleet.counts("edge2")  # answers dev3 only, in int8c
    assert e2["enc_bytes_grad"] <= 0.35 * e2["raw_bytes_grad"]  # 64 per-channel scales per 20-row gradient
    # Still training, close to the float32 run: quantisation noise, not a different model.
    ref, g0 = reference_global(s, 2), initial_global(s)
    assert max_abs_diff(fleet.global_state(), ref) < 0.25 * max_abs_diff(ref, g0)


def test_a_plan_with_an_encoding_a_kind_may_not_use_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="act_encoding"):
        fleet_of(spec(SPLIT, cloud={"act_encoding": "topk"}))
    with pytest.raises(ValueError, match="act"):
        fleet_of(spec(SPLIT, device_extra={"dev1": {"act_encoding": "topk"}}))


LOCAL = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}


def topk_spec(ratio: float, **cloud: Any) -> Any:
    return spec(LOCAL, cloud={"rounds": 3, "delta_encoding": "topk", "topk_ratio": ratio, **cloud},
                device_extra={d: {"cut": N_BLOCKS} for d in LOCAL})


def test_topk_with_k_equal_to_d_is_the_uncompressed_run() -> None:
    s = topk_spec(1.0)
    fleet = fleet_of(s)
    fleet.run_to_end(max_time=600)
    assert max_abs_diff(fleet.global_state(), reference_global(s, 3)) <= 1e-5


def test_topk_deltas_carry_k_entries_and_sent_plus_residual_is_the_sum_of_deltas() -> None:
    s = topk_spec(0.05)
    fleet = fleet_of(s, start=False)
    ups = sent(fleet, DeviceUpdate, "dev1")
    fleet.start()
    fleet.run_to_end(max_time=600)
    assert fleet.drops() == []
    for p in ups.hits:
        assert p.env.body["enc"] == "topk"
        for k, v in p.msg.delta.items():
            assert np.count_nonzero(v) <= int(np.ceil(0.05 * v.size)), k
    sizes = {k: v.size for k, v in fleet.global_state().items()}
    raw = sum(sizes.values()) * 4 * 3
    assert fleet.counts("dev1")["enc_bytes_delta"] < 0.12 * raw
    residual = fleet.machine("dev1").topk.residual()
    assert set(residual) == set(sizes) and max(np.abs(v).max() for v in residual.values()) > 0
    # The edge re-sends the sparse mean losslessly: a few devices' coordinates, not the dense model.
    assert fleet.counts("edge1")["enc_bytes_delta"] < 0.5 * fleet.counts("edge1")["raw_bytes_delta"]


def test_the_residual_survives_a_device_restart_and_stays_with_a_moving_device() -> None:
    s = topk_spec(0.05, rounds=4)
    plain = fleet_of(s)
    plain.run_to_end(max_time=600)

    def restarted_and_moved(keep_state: bool) -> MemoryFleet:
        fleet = fleet_of(s)
        fleet.run_until(lambda: fleet.machine("cloud").policy.completed >= 2 and fleet.machine("dev1").round is None,
                        max_time=600)
        before = fleet.machine("dev1").topk.residual()
        if not keep_state:
            fleet.nodes["dev1"].persisted = None  # a device that lost its state directory
        fleet.restart("dev1")
        if keep_state:
            after = fleet.machine("dev1").topk.residual()
            assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)
        # A local-training device moves between rounds; its residual goes with it (the device's, not the edge's).
        fleet.command("dev1", "move", edge="edge2")
        fleet.run_to_end(max_time=600)
        assert fleet.events("moved", node="dev1")
        return fleet

    # Nothing was lost or repeated: the run ends where the one without restart and move ends (to float32 rounding:
    # after the move the edges average other groups of devices); without its residual it does not.
    assert max_abs_diff(restarted_and_moved(True).global_state(), plain.global_state()) <= 1e-6
    assert max_abs_diff(restarted_and_moved(False).global_state(), plain.global_state()) > 1e-4


def test_an_operator_switches_compression_on_in_a_running_fleet() -> None:
    fleet = fleet_of(spec({"dev1": "edge1"}, cloud={"rounds": 3}), start=False)
    acts = sent(fleet, Activations)
    fleet.start()
    fleet.run_until(lambda: fleet.machine("cloud").policy.completed >= 1, max_time=600)
    reply = fleet.command("cloud", "set", act_encoding="int8", grad_encoding="fp16")
    assert reply["ok"], reply
    assert not fleet.command("cloud", "set", act_encoding="topk")["ok"]  # a kind's encodings only
    fleet.run_to_end(max_time=600)
    by_round = {p.msg.round: p.env.body.get("enc", "none") for p in acts.hits}
    assert by_round[0] == "none" and by_round[2] == "int8"
