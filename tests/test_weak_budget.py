"""A weak client's budget (mqttfl/tools/bench/weak_budget.py) and part 1 of ``mqttfl bench hetero`` at a tiny
size: the costs are the CNN's multiply-accumulates counted by hand, and each arm gets what fits the budget."""

from __future__ import annotations

import argparse

import pytest

from mqttfl.tools.bench import hetero, weak_budget

# The CNN on 1x8x8, per example: conv1 8*8 positions x 32 x 25, conv2 4*4 x 64 x 32*25, fc1 256 x 512, fc2 512 x 10.
CONV1, CONV2, FC1, FC2 = 8 * 8 * 32 * 25, 4 * 4 * 64 * 32 * 25, 256 * 512, 512 * 10
FORWARD = CONV1 + CONV2 + FC1 + FC2


@pytest.fixture(scope="module")
def cnn() -> dict[str, dict[str, float]]:
    return weak_budget.costs("cnn", (1, 8, 8), 16)


def test_training_compute_is_three_forwards_where_it_trains_and_one_where_it_is_frozen(
        cnn: dict[str, dict[str, float]]) -> None:
    # The first layer needs no input gradient; a frozen input side runs its forward only.
    assert cnn["full"]["macs"] == 16 * (FORWARD + CONV1 + 2 * (CONV2 + FC1 + FC2))
    assert cnn["partial1"]["macs"] == 16 * (FORWARD + FC2)
    assert cnn["partial2"]["macs"] == 16 * (FORWARD + FC1 + 2 * FC2)
    # HeteroFL's half-width CNN: 16 and 32 channels, 256 hidden units.
    half = 8 * 8 * 16 * 25 + 4 * 4 * 32 * 16 * 25 + 128 * 256 + 256 * 10
    assert cnn["width0.5"]["macs"] == 16 * (3 * half - 8 * 8 * 16 * 25)


def test_memory_shrinks_with_the_trained_suffix_and_with_the_width(cnn: dict[str, dict[str, float]]) -> None:
    assert cnn["partial1"]["memory"] < cnn["partial2"]["memory"] < cnn["partial3"]["memory"] < cnn["full"]["memory"]
    assert cnn["width0.5"]["memory"] < cnn["width0.75"]["memory"] < cnn["width1.0"]["memory"]
    assert cnn["width1.0"]["memory_ratio"] == pytest.approx(1.0, abs=0.01)  # the derivation meets the measurement


def test_each_arm_gets_the_most_that_fits_the_budget(cnn: dict[str, dict[str, float]]) -> None:
    fit = weak_budget.match(cnn, 0.5)
    assert fit == {"budget": 0.5, "width": 0.65, "train_blocks": 1}
    for name in ("width0.65", "partial1"):
        assert cnn[name]["macs_ratio"] <= 0.5 and cnn[name]["memory_ratio"] <= 0.5
    assert max(cnn["width0.7"]["macs_ratio"], cnn["width0.7"]["memory_ratio"]) > 0.5
    assert max(cnn["partial2"]["macs_ratio"], cnn["partial2"]["memory_ratio"]) > 0.5
    # Below one frozen forward of the whole model partial training does not fit at all; width still does.
    assert weak_budget.match(cnn, 0.3)["train_blocks"] is None and weak_budget.match(cnn, 0.3)["width"]


def test_part_one_runs_every_arm_on_paired_seeds_at_a_tiny_size() -> None:
    args = argparse.Namespace(strong=2, weak="0,2", alpha=0.3, rounds=2, weak_seeds=2, budget=0.5, width=0.0,
                              train_blocks=0, weak_model="cnn")
    out = hetero.inclusive(args)
    assert (out["width"], out["train_blocks"]) == (0.65, 1)
    assert set(out["costs"]) == {"full", "partial1", "width0.65"}
    assert set(out["accuracy"]) == {"strong_only@0", "strong_only@2", "partial@2", "width@2"}
    assert all(len(v["seeds"]) == 2 and 0 < v["mean"] <= 1 for v in out["accuracy"].values())
    res = hetero.summarise({"inclusive": out, **{k: v for k, v in _canned().items() if k != "inclusive"}})
    for key in ("acc_partial_minus_width", "acc_partial_minus_strong_only"):
        assert {key, key + "_std", key + "_ci95"} <= set(res) and res[key + "_ci95"] >= 0


def _canned() -> dict[str, object]:
    from tests.test_bench_outputs import HETERO

    return dict(HETERO)
