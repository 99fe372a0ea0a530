"""Eco-FL pipelines with every agent a real process and a real broker (docs/design.md, "Pipeline"): a device, its
helpers (device agents with ``[device] serve``) and its edge train the unsplit model's weights (S = 3 and 4); a
stage slowed mid-run is rebalanced and training stays exact; a helper killed with SIGKILL mid-round is left out
and the mini-batch redone, nothing trained twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from mqttfl.ml.data import load_digits
from mqttfl.runtime.persist import load_state
from mqttfl.runtime.transport import Inbound
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec, Testbed
from tests.reference import TOL, initial_global, max_abs_diff, reference_global

SHAPE = (64,)


def spec_of(fleet: str, helpers: list[str], *, block_ms: float = 0.0, rounds: int = 2) -> FleetSpec:
    emulated = {"block_ms": block_ms} if block_ms else {}
    return FleetSpec(devices={"dev1": "edge1"}, model="chain12", input_shape=SHAPE, fleet=fleet,
                     cloud={"rounds": rounds, "batch_size": 128, "micro_batches": 4, "lr": 0.05, "momentum": 0.9,
                            "seed": 5, "autostart": False, "chains": {"dev1": helpers}, "deadline_s": 300.0},
                     helpers={h: ("dev1",) for h in helpers}, device_extra={"dev1": dict(emulated)},
                     edge_extra=dict(emulated), helper_extra={h: dict(emulated) for h in helpers})


def pipeline_metrics(tb: Testbed, kind: str) -> list[dict[str, Any]]:
    return [m.data for m in tb.inbox if m.kind == "metrics" and m.data and m.data.get("kind") == kind
            and m.src == "dev1"]


def started(tb: Testbed, spec: FleetSpec) -> None:
    tb.prepare()
    tb.start()
    tb.wait_online(["cloud", "edge1", "dev1", *spec.helpers], timeout=120)
    assert tb.ctl("cloud", "start")["ok"]


def finished(tb: Testbed, root: Path, spec: FleetSpec, timeout: float = 240.0) -> dict[str, Any]:
    """The run's end (``timeout`` 0: it was already seen) and its model against unsplit training."""
    if timeout:
        tb.wait_event("run_complete", timeout)
    state = load_state(root / "state" / "cloud" / "cloud.state")
    assert state is not None and state["round"] == spec.cloud["rounds"]
    train, _ = load_digits(SHAPE)
    expected = reference_global(spec, train, spec.cloud["rounds"])
    diff = max_abs_diff(state["global"], expected)
    assert diff <= TOL, f"pipelined training through the broker differs from unsplit training by {diff:.3g}"
    assert max_abs_diff(state["global"], initial_global(spec)) > 1e-2
    return state


def test_three_stages_through_the_broker_equal_unsplit_training(tmp_path: Path, broker: Broker, fleet: str) -> None:
    spec = spec_of(fleet, ["h1"])
    with Testbed(tmp_path, spec, broker=broker) as tb:
        started(tb, spec)
        finished(tb, tmp_path, spec)
        layouts = pipeline_metrics(tb, "pipeline")
        rounds = tb.round_metrics()
    assert layouts and all(m["chain"] == ["dev1", "h1", "edge1"] for m in layouts)
    assert [r["devices"]["dev1"]["stages"] for r in rounds] == [3, 3]


def test_four_stages_rebalanced_mid_run_stay_equal_to_unsplit_training(tmp_path: Path, broker: Broker,
                                                                       fleet: str) -> None:
    spec = spec_of(fleet, ["h1", "h2"], block_ms=20.0)
    slowed: list[bool] = []

    def slow_h1(m: Inbound) -> None:
        d = m.data or {}
        if not slowed and m.kind == "metrics" and d.get("kind") == "pipeline_step" and d.get("step", 0) >= 3:
            slowed.append(True)
            tb.send_ctl("h1", "emulate", slowdown=3)

    with Testbed(tmp_path, spec, broker=broker) as tb:
        started(tb, spec)
        tb.wait_event("run_complete", 240, on_message=slow_h1)
        finished(tb, tmp_path, spec, timeout=0)
        layouts = pipeline_metrics(tb, "pipeline")
    assert slowed
    moves = [m for m in layouts if m["reason"].startswith("slowest stage")]
    assert moves, [m["reason"] for m in layouts]
    assert moves[0]["chain"] == ["dev1", "h1", "h2", "edge1"]
    first = layouts[0]["blocks"]
    h1_blocks = [b - a for a, b in zip(moves[0]["blocks"], moves[0]["blocks"][1:], strict=False)][1]
    assert h1_blocks < first[2] - first[1]  # the slowed helper gave blocks away


def test_a_helper_killed_mid_round_is_left_out_without_training_twice(tmp_path: Path, broker: Broker,
                                                                      fleet: str) -> None:
    spec = spec_of(fleet, ["h1", "h2"], block_ms=10.0)
    killed: list[int] = []

    def kill_h2(m: Inbound) -> None:
        d = m.data or {}
        if not killed and m.kind == "metrics" and d.get("kind") == "pipeline_step" and d.get("step", 0) >= 3 \
                and d.get("round") == 0:
            killed.append(d["step"])
            tb.kill("h2", signal.SIGKILL)

    with Testbed(tmp_path, spec, broker=broker) as tb:
        started(tb, spec)
        tb.wait_event("pipeline_stage_lost", 120, on_message=kill_h2)
        finished(tb, tmp_path, spec)
        layouts = pipeline_metrics(tb, "pipeline")
        rounds = tb.round_metrics()
        retried = [m for m in tb.inbox if m.kind == "event" and (m.data or {}).get("event") == "quorum_not_met"]
    assert killed
    assert layouts[-1]["chain"] == ["dev1", "h1", "edge1"]
    assert [r["devices"]["dev1"]["stages"] for r in rounds] == [3, 3]  # the stages it ended each round with
    assert rounds[0]["participants"] == 1 and not retried  # recovered within the round


def test_the_pipeline_bench_measures_every_figure_at_a_tiny_size(tmp_path: Path) -> None:
    """``mqttfl bench pipeline --small --json``: one JSON object with the issue's figures; every run of it (S = 2, 3,
    4, GPipe, unequal speeds, a helper slowed mid-run) ends on the unsplit model's weights."""
    out = subprocess.run(
        [sys.executable, "-m", "mqttfl.tools.cli", "bench", "pipeline", "--small", "--json", "--workdir",
         str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    for key in ("speedup_s3", "dp_vs_equal", "rebalance_recovery", "max_abs_diff", "stash_max", "throughput",
                "speedup_s2", "speedup_s4", "stash_bound", "rebalance", "plot"):
        assert key in r, key
    assert r["max_abs_diff"] <= TOL and len(r["max_abs_diff_by_run"]) == 8
    assert r["stash_within_bound"] and r["stash_max"]["gpipe"] == [4, 4, 4, 1]
    assert (tmp_path / "out" / "results.json").exists() and Path(r["plot"]).exists()
