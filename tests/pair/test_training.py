"""Training as the plan configures it, in memory: optimizers, losses, learning-rate schedules and clipping all
keep split = unsplit, regression and multi-label runs report their task's metrics, and Adam's state (moments and
its scalar step) moves with a migrating device."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mqttfl.ml.data import Dataset
from mqttfl.protocol.messages import Transfer
from mqttfl.protocol.plan import Training, round_lr
from mqttfl.runtime.memory import MemoryFleet, match
from mqttfl.tools.testbed import FleetSpec, make_shards
from tests import reference
from tests.pair.common import N_BLOCKS, TOL, assert_reference, digits, fleet_of, max_abs_diff, round_entries, spec
from tests.pair.test_moves import DEVICES, FAST, in_round, move_mid_round

DEVS = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}
LOCAL = {"dev2": {"cut": N_BLOCKS}}  # one device trains the whole model: both paths are compared


@pytest.mark.parametrize("cloud", [
    {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3},
    {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.05, "beta1": 0.8, "eps": 1e-6},
    {"optimizer": "sgd", "nesterov": True, "clip_value": 0.05, "lr_schedule": "step", "lr_gamma": 0.5,
     "lr_step_rounds": 1},
    {"optimizer": "adam", "lr": 0.02, "clip_norm": 0.1, "lr_schedule": "cosine", "lr_min": 0.001, "rounds": 3},
], ids=["adam", "adamw", "sgd-nesterov-step-clip-value", "adam-cosine-clip-norm"])
def test_every_optimizer_schedule_and_clipping_keeps_split_equal_to_unsplit(cloud: dict[str, Any]) -> None:
    s = spec(DEVS, cloud=cloud, device_extra=LOCAL)
    fleet = fleet_of(s)
    fleet.run_to_end(max_time=600)
    rounds = int(cloud.get("rounds", 2))
    assert_reference(fleet, s, rounds=rounds)
    entries = round_entries(fleet)
    t, horizon = reference.training_of(s)
    # The cloud stamps the schedule's rate into each round's plan, and reports it.
    assert [e["lr"] for e in entries] == pytest.approx([round_lr(t, r, horizon) for r in range(rounds)])
    assert fleet.drops() == [] and fleet.job_errors == []


def test_a_schedule_changes_the_rate_round_by_round() -> None:
    t = Training(lr=0.1, lr_schedule="step", lr_gamma=0.5, lr_step_rounds=2)
    assert [round_lr(t, r, 10) for r in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
    cos = Training(lr=0.1, lr_schedule="cosine", lr_min=0.0)
    rates = [round_lr(cos, r, 4) for r in range(6)]
    assert rates[0] == 0.1 and rates[1] > rates[2] > rates[3] > 0 and rates[4] == rates[5] == rates[3]
    assert round_lr(Training(lr=0.1, lr_schedule="exponential", lr_gamma=0.9), 2, 10) == pytest.approx(0.081)
    assert Training(optimizer="rmsprop").problems() and Training(loss="hinge").problems()
    assert Training(nesterov=True, momentum=0.0).problems() and Training(lr_schedule="cosine", lr_min=0.5,
                                                                          lr=0.1).problems()


def _task_data(loss: str) -> tuple[Dataset, Dataset, int]:
    """The digits as a regression (the digit / 9) or a multi-label task (the digit's four bits)."""
    train, test = digits()

    def targets(ds: Dataset) -> Dataset:
        if loss == "mse":
            y = (ds.y.astype(np.float32) / 9.0).reshape(-1, 1)
        else:
            y = ((ds.y[:, None] >> np.arange(4)) & 1).astype(np.float32)
        return Dataset(ds.x, y)

    return targets(train), targets(test), 1 if loss == "mse" else 4


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits"])
def test_regression_and_multi_label_runs_train_split_and_report_their_metrics(loss: str) -> None:
    train, test, outputs = _task_data(loss)
    s = FleetSpec(devices=dict(DEVS), model="mlp", input_shape=(64,), device_extra=LOCAL,
                  cloud={"rounds": 2, "batch_size": 20, "lr": 0.01, "optimizer": "adam", "seed": 7, "run": "r1",
                         "loss": loss, "num_classes": outputs})
    fleet = MemoryFleet.from_spec(s, make_shards(s, train), test)
    fleet.start()
    fleet.run_to_end(max_time=600)
    expected = reference.reference_global(s, train, 2)
    assert max_abs_diff(fleet.global_state(), expected) <= TOL
    entries = round_entries(fleet)
    if loss == "mse":
        assert entries[-1]["accuracy"] is None and entries[-1]["mse"] == entries[-1]["loss"]
        assert 0 < entries[-1]["mae"] and entries[-1]["mse"] < entries[0]["mse"]
    else:
        assert 0.5 < entries[-1]["accuracy"] <= 1 and 0 <= entries[-1]["exact_match"] <= entries[-1]["accuracy"]
    # The best model by the task's metric (lowest mse, highest per-label accuracy) is kept apart.
    best = fleet.models[("r1", "best")]
    assert best.info["task"] == ("regression" if loss == "mse" else "multilabel")
    assert fleet.drops() == [] and fleet.job_errors == []


def test_adams_moments_and_step_move_with_a_migrating_device_and_the_run_ends_as_without_the_move() -> None:
    s = spec(DEVICES, cloud={"optimizer": "adam", "lr": 0.01},
             device_extra={d: dict(FAST) for d in DEVICES})
    still = fleet_of(s)
    still.run_to_end(max_time=600)
    assert_reference(still, s, rounds=2)

    moved = fleet_of(s)
    transfers = moved.watch(match("ckpt", msg_type=Transfer))
    move_mid_round(moved, "direct", at_step=2)
    moved.run_to_end(max_time=600)
    (done,) = moved.events("migration_done")
    assert done["step"] == 2 and done["destination"] == "edge2"
    (t,) = transfers.hits
    states = {k.rpartition("|")[2] for k in t.msg.checkpoint_tensors if k.startswith("o/")}
    assert states == {"exp_avg", "exp_avg_sq", "step"}
    steps = [v for k, v in t.msg.checkpoint_tensors.items() if k.endswith("|step")]
    assert all(v.shape == () and float(v) == 2.0 for v in steps), "two optimizer steps at the source"
    assert max_abs_diff(moved.global_state(), still.global_state()) <= 1e-6
    assert not in_round(moved, "dev1", 1)
