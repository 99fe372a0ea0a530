"""Split training through the real broker, with every agent a real process, equals unsplit training.

The reference below replays what each device does (its shard, its batch order, its micro-batch cut) with
:class:`LocalTrainer` on the whole model, then takes flat FedAvg over the devices; the cloud's persisted
global model after the run must match it to 1e-5 (docs/design.md, "Round": split step = local step).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mqttfl.ml.data import Dataset, load_digits
from mqttfl.runtime.persist import load_state
from mqttfl.tools import testbed
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec
from tests.helpers import schema
from tests.reference import TOL, initial_global, max_abs_diff, reference_global


def digits(input_shape: tuple[int, ...]) -> tuple[Dataset, Dataset]:
    return load_digits(input_shape)


def cloud_state(root: Path) -> dict[str, Any]:
    state = load_state(root / "state" / "cloud" / "cloud.state")
    assert state is not None, "the cloud persisted nothing"
    return state


def run_fleet(root: Path, broker: Broker, spec: FleetSpec, data: tuple[Dataset, Dataset],
              timeout: float = 120.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every agent as a process until the cloud reports run_complete; (persisted state, round metrics)."""
    with testbed.Testbed(root, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_event("run_complete", timeout)
        metrics = tb.round_metrics()
    return cloud_state(root), metrics


@pytest.mark.parametrize(("model", "input_shape", "micro"), [
    ("mlp", (64,), 1),
    ("mlp", (64,), 3),
    ("cnn", (1, 8, 8), 2),
])
def test_split_training_over_broker_equals_unsplit_training(tmp_path: Path, broker: Broker, fleet: str,
                                                            model: str, input_shape: tuple[int, ...],
                                                            micro: int) -> None:
    data = digits(input_shape)
    spec = FleetSpec(devices={"dev1": "edge1"}, model=model, input_shape=input_shape, fleet=fleet,
                     cloud={"rounds": 2, "batch_size": 64, "micro_batches": micro, "lr": 0.05, "momentum": 0.9,
                            "seed": 7})
    state, metrics = run_fleet(tmp_path, broker, spec, data)
    assert state["round"] == 2
    dev = metrics[-1]["devices"]["dev1"]
    assert dev["cut"] == schema(model, input_shape).default_cut  # really split, not local
    expected = reference_global(spec, data[0], rounds=2)
    diff = max_abs_diff(state["global"], expected)
    assert diff <= TOL, f"split over MQTT differs from unsplit training by {diff:.3g}"
    # And the run did train: the model moved far beyond the tolerance.
    assert max_abs_diff(state["global"], initial_global(spec)) > 1e-2


def test_device_with_cut_at_the_end_trains_locally_like_local_trainer(tmp_path: Path, broker: Broker,
                                                                     fleet: str) -> None:
    data = digits((64,))
    n_blocks = schema("mlp", (64,)).n_blocks
    spec = FleetSpec(devices={"dev1": "edge1"}, model="mlp", input_shape=(64,), fleet=fleet,
                     device_extra={"dev1": {"cut": n_blocks}},
                     cloud={"rounds": 2, "batch_size": 50, "micro_batches": 2, "lr": 0.05, "seed": 3})
    state, metrics = run_fleet(tmp_path, broker, spec, data)
    assert metrics[-1]["devices"]["dev1"]["cut"] == n_blocks
    diff = max_abs_diff(state["global"], reference_global(spec, data[0], rounds=2))
    assert diff <= TOL, f"local training on the device differs from LocalTrainer by {diff:.3g}"


def test_split_bench_reports_every_figure(tmp_path: Path) -> None:
    """``mqttfl bench split --json`` at a tiny size: one JSON object with every figure the bench promises."""
    out = subprocess.run(
        [sys.executable, "-m", "mqttfl.tools.cli", "bench", "split", "--json", "--batches", "2", "--batch-size", "8",
         "--micro", "1,2", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    for key in ("monolithic_s", "split_s", "ratio", "ratio_m1", "best_m", "max_abs_diff", "threads", "batches",
                "batch_size", "model", "cut"):
        assert key in result, key
    assert set(result["split_s"]) == {"1", "2"}
    assert set(result["max_abs_diff"]) == {"1", "2"}
    assert max(result["max_abs_diff"].values()) <= 1e-4
