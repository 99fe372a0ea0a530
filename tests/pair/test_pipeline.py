"""Eco-FL pipelines across helpers, in memory on virtual time (docs/design.md, "Pipeline"): S = 3 and 4 stages
equal unsplit training, the stash stays within K_s, the planner's predictions hold, a slowed stage is rebalanced,
a helper killed mid-round costs the mini-batch in progress and nothing is trained twice, a helper joins, a
pipelined device migrates, a pipelined client is one client for asynchronous groups, and chains are set by hand."""

from __future__ import annotations

from typing import Any

import pytest

from mqttfl.protocol.messages import Activations
from mqttfl.protocol.schedule import stash_bound
from mqttfl.runtime.memory import MemoryFleet, match
from mqttfl.tools.testbed import FleetSpec, make_shards
from tests.pair.common import TOL, digits, max_abs_diff
from tests.reference import initial_global, reference_global

BASE = {"rounds": 2, "batch_size": 40, "lr": 0.05, "momentum": 0.9, "seed": 7, "run": "r1", "micro_batches": 4}


def pipe_spec(helpers: list[str], *, model: str = "chain12", cloud: dict[str, Any] | None = None,
              speeds: dict[str, float] | None = None, block_ms: float = 0.0, devices: dict[str, str] | None = None,
              extra_edges: tuple[str, ...] = (), serve: dict[str, tuple[str, ...]] | None = None) -> FleetSpec:
    speeds = speeds or {}
    devices = devices or {"dev1": "edge1"}
    emulated = ({"block_ms": block_ms} if block_ms else {})
    return FleetSpec(
        devices=devices, model=model, input_shape=(64,), extra_edges=extra_edges,
        cloud={**BASE, "chains": {"dev1": helpers}, **(cloud or {})},
        helpers={h: (serve or {}).get(h, ("dev1",)) for h in helpers},
        device_extra={d: {**emulated, "slowdown": speeds.get(d, 1.0)} for d in devices},
        edge_extra={**emulated, "slowdown": speeds.get("edge1", 1.0)},
        helper_extra={h: {**emulated, "slowdown": speeds.get(h, 1.0)} for h in helpers})


def fleet_for(spec: FleetSpec, *, start: bool = True, **kw: Any) -> MemoryFleet:
    train, test = digits()
    fleet = MemoryFleet.from_spec(spec, make_shards(spec, train), test, **kw)
    if start:
        fleet.start()
    return fleet


def assert_exact(fleet: MemoryFleet, spec: FleetSpec, rounds: int = 2) -> None:
    expected = reference_global(spec, digits()[0], rounds)
    diff = max_abs_diff(fleet.global_state(), expected)
    assert diff <= TOL, f"pipelined training differs from unsplit training by {diff:.3g}"
    assert max_abs_diff(fleet.global_state(), initial_global(spec)) > 1e-2, "the run did not train"


def layouts(fleet: MemoryFleet) -> list[dict[str, Any]]:
    return fleet.metrics("pipeline", node="dev1")


def steps(fleet: MemoryFleet) -> list[dict[str, Any]]:
    return fleet.metrics("pipeline_step", node="dev1")


@pytest.mark.parametrize(("model", "helpers", "micro"), [
    ("chain12", ["h1"], 4),
    ("chain12", ["h1", "h2"], 8),
    ("mlp", ["h1", "h2"], 3),
])
def test_three_and_four_stage_pipelines_equal_unsplit_training_within_the_stash_bound(
        model: str, helpers: list[str], micro: int) -> None:
    spec = pipe_spec(helpers, model=model, cloud={"micro_batches": micro})
    fleet = fleet_for(spec)
    assert fleet.run_to_end()["event"] == "run_complete"
    assert_exact(fleet, spec)
    s = len(helpers) + 2
    layout = layouts(fleet)[-1]
    assert layout["chain"] == ["dev1", *helpers, "edge1"] and len(layout["blocks"]) == s + 1
    assert all(b > a for a, b in zip(layout["blocks"], layout["blocks"][1:], strict=False))
    bound = [stash_bound(s, micro, k) for k in range(s)]
    assert layout["stash_bound"] == bound
    peaks = [max(m["stash"][k] for m in steps(fleet)) for k in range(s)]
    assert all(p <= k for p, k in zip(peaks, bound, strict=True)), (peaks, bound)
    assert peaks[0] == bound[0]  # the first stage fills its warm-up
    report = fleet.metrics("round", node="cloud")[-1]["devices"]["dev1"]
    assert report["cut"] == layout["blocks"][-2] and report["stages"] == s and not fleet.drops()


def test_gpipe_equals_unsplit_training_too_and_stashes_the_whole_mini_batch() -> None:
    spec = pipe_spec(["h1", "h2"], cloud={"micro_batches": 5, "pipeline_schedule": "gpipe", "rounds": 1})
    fleet = fleet_for(spec)
    fleet.run_to_end()
    assert_exact(fleet, spec, rounds=1)
    peaks = [max(m["stash"][k] for m in steps(fleet)) for k in range(4)]
    assert peaks == [5, 5, 5, 1]


def _batch_times(fleet: MemoryFleet, first: int, last: int) -> float:
    """Mean seconds per mini-batch from boundary ``first`` to ``last`` of round 0."""
    t = {m["step"]: m["elapsed_s"] for m in steps(fleet) if m["round"] == 0}
    return (t[last] - t[first]) / (last - first)


def test_the_planner_predicts_the_pipelines_time_and_dp_beats_an_equal_split_on_unequal_speeds() -> None:
    speeds = {"dev1": 4.0, "h1": 2.0, "edge1": 1.0}  # stage speeds 1x, 2x, 4x
    measured = {}
    for partition in ("equal", "dp"):
        spec = pipe_spec(["h1"], cloud={"micro_batches": 8, "rounds": 1, "partition": partition}, speeds=speeds,
                         block_ms=40.0)
        fleet = fleet_for(spec, compute_s=0.0005)
        fleet.run_to_end()
        assert_exact(fleet, spec, rounds=1)
        measured[partition] = _batch_times(fleet, 1, 10)
        predicted = layouts(fleet)[0]["predicted_batch_s"]
        assert measured[partition] == pytest.approx(predicted, rel=0.1), partition
    assert measured["equal"] / measured["dp"] >= 1.3


def test_a_stage_slowed_mid_round_is_rebalanced_at_a_flush_and_training_stays_exact() -> None:
    spec = pipe_spec(["h1"], cloud={"micro_batches": 8, "rounds": 1}, block_ms=40.0)
    fleet = fleet_for(spec, compute_s=0.0005)
    fleet.run_until(lambda: any(m["step"] >= 2 for m in steps(fleet)))
    fleet.set_speed("h1", 3.0)
    fleet.run_to_end()
    assert_exact(fleet, spec, rounds=1)
    first, second = layouts(fleet)
    assert first["blocks"] == [0, 4, 8, 12] and second["blocks"][-2] == 8  # the edge's blocks stay mid-round
    assert second["blocks"] != first["blocks"] and second["reason"].startswith("slowest stage")
    assert fleet.events("pipeline_replanned", node="dev1")
    after = _batch_times(fleet, second["step"] + 1, 10)
    before = _batch_times(fleet, 1, 2)
    assert second["predicted_batch_s"] / after >= 0.9  # throughput after / predicted
    assert after < _batch_times(fleet, 3, second["step"])  # faster than while slowed
    assert before < after  # ... and still slower than before the slow-down


@pytest.mark.parametrize(("helpers", "victim", "micro"), [(["h1", "h2"], "h2", 3), (["h1"], "h1", 0)])
def test_a_helper_killed_mid_round_is_left_out_and_the_mini_batch_redone_without_training_twice(
        helpers: list[str], victim: str, micro: int) -> None:
    spec = pipe_spec(helpers, cloud={"micro_batches": 8})
    fleet = fleet_for(spec)
    grads = fleet.watch(match("grad", src=victim))
    fleet.run_until(lambda: any(p.msg.step == 3 and p.msg.micro == micro for p in grads.hits))
    fleet.kill(victim)
    assert fleet.run_to_end()["event"] == "run_complete"
    assert_exact(fleet, spec)  # every mini-batch trained exactly once
    lost = fleet.events("pipeline_stage_lost", node="dev1")
    assert lost and lost[0]["helpers"] == [victim] and lost[0]["redo_from"] == 3
    assert victim not in layouts(fleet)[-1]["chain"]
    assert fleet.counts("edge1")["grad_resent"] > 0  # what the edge had trained was answered from its cache
    assert fleet.metrics("round", node="cloud")[0]["participants"] == 1


def test_a_helper_that_comes_online_mid_round_joins_the_pipeline_at_a_flush() -> None:
    spec = pipe_spec(["h1", "h2"], cloud={"rounds": 1})
    fleet = fleet_for(spec, start=False)
    for n in ("cloud", "edge1", "h1", "dev1"):
        fleet._boot(fleet.nodes[n])
    fleet.run_until(lambda: any(m["step"] >= 2 for m in steps(fleet)))
    assert layouts(fleet)[0]["chain"] == ["dev1", "h1", "edge1"]
    fleet._boot(fleet.nodes["h2"])
    fleet.run_to_end()
    assert_exact(fleet, spec, rounds=1)
    last = layouts(fleet)[-1]
    assert last["chain"] == ["dev1", "h1", "h2", "edge1"] and last["reason"] == "h2 joined"


def test_a_pipelined_device_migrates_and_its_last_helper_follows_it_to_the_new_edge() -> None:
    spec = pipe_spec(["h1"], extra_edges=("edge2",))
    fleet = fleet_for(spec)
    fleet.run_until(lambda: any(m["step"] >= 3 for m in steps(fleet)))
    assert fleet.command("dev1", "move", edge="edge2")["ok"]
    fleet.run_to_end()
    assert_exact(fleet, spec)
    assert fleet.events("migration_done", node="dev1")
    moved = [m for m in layouts(fleet) if m["reason"] == "moved to edge2"]
    assert moved and moved[0]["chain"] == ["dev1", "h1", "edge2"]


def test_an_async_run_counts_a_pipelined_client_once_in_its_groups() -> None:
    spec = pipe_spec(["h1"], devices={"dev1": "edge1", "dev2": "edge1", "dev3": "edge1"},
                     cloud={"mode": "async", "max_versions": 4, "num_groups": 2, "profile_rounds": 1, "rounds": 1})
    fleet = fleet_for(spec)
    assert fleet.run_to_end()["event"] == "run_complete"
    groups = fleet.machine("cloud").policy.groups()
    members = sorted(d for g in groups.values() for d in g)
    assert members == ["dev1", "dev2", "dev3"]  # the helper is no client
    reports = [m["devices"]["dev1"] for m in fleet.metrics(node="cloud") if "dev1" in m.get("devices", {})]
    assert reports and layouts(fleet) and layouts(fleet)[0]["chain"] == ["dev1", "h1", "edge1"]


def test_the_chain_command_sets_a_chain_by_hand_and_the_cloud_keeps_it() -> None:
    spec = pipe_spec([], cloud={"rounds": 3})
    spec.helpers, spec.helper_extra = {"h1": ("dev1",)}, {}
    fleet = fleet_for(spec)
    fleet.run_until(lambda: fleet.metrics("round", node="cloud"))
    reply = fleet.command("cloud", "chain", device="dev1", helpers="h1")
    assert reply["ok"] and reply["result"]["helpers"] == ["h1"] and reply["result"]["online"] == ["h1"]
    fleet.run_to_end()
    assert [m["devices"]["dev1"].get("stages") for m in fleet.metrics("round", node="cloud")][-1] == 3
    assert layouts(fleet) and layouts(fleet)[0]["chain"] == ["dev1", "h1", "edge1"]
    assert fleet.command("cloud", "chain")["result"] == {"dev1": {"helpers": ["h1"], "online": ["h1"],
                                                                  "set_by": "ctl"}}
    fleet.restart("cloud")
    assert fleet.machine("cloud").chain_of("dev1") == ("h1",)
    bad = fleet.command("cloud", "chain", device="dev1", helpers=["dev1"])
    assert not bad["ok"]


def test_a_helper_that_does_not_serve_the_device_refuses_and_the_device_trains_without_it() -> None:
    spec = pipe_spec(["h1", "h2"], serve={"h2": ("dev9",)}, cloud={"rounds": 1})
    fleet = fleet_for(spec)
    fleet.run_to_end()
    assert_exact(fleet, spec, rounds=1)
    assert layouts(fleet)[-1]["chain"] == ["dev1", "h1", "edge1"]
    assert fleet.drops("h2", "not_served")


def test_the_edge_takes_a_pipelined_devices_activations_only_from_the_stage_the_device_named() -> None:
    spec = pipe_spec(["h1"], cloud={"rounds": 1})
    fleet = fleet_for(spec)
    acts = fleet.watch(match("act", dst="edge1"))
    fleet.run_until(lambda: acts.hits)
    genuine: Activations = acts.hits[0].msg
    forged = Activations(**{**genuine.__dict__, "client": "dev1"})
    fleet.inject("edge1", __import__("mqttfl.protocol.events", fromlist=["Received"]).Received("h9", forged))
    assert fleet.drops("edge1", "unknown_sender")
    fleet.run_to_end()
    assert_exact(fleet, spec, rounds=1)


def test_a_pipelined_device_of_a_weak_class_trains_the_whole_model_across_its_chain() -> None:
    """A chain wins over the device's class: the cloud sends a chained device no class model (a partial model
    cannot be pipelined), so it trains every block across its stages, exactly as unsplit training."""
    spec = pipe_spec(["h1"], cloud={"classes": {"weak": {"train": "partial", "train_blocks": 2}}})
    spec.device_extra["dev1"]["class"] = "weak"
    fleet = fleet_for(spec)
    assert fleet.run_to_end()["event"] == "run_complete"
    assert_exact(fleet, spec)
    assert layouts(fleet)[-1]["chain"] == ["dev1", "h1", "edge1"]
