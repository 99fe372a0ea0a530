"""The pipeline partitioner (mqttfl.fl.pipeline_plan): the DP equals brute force, memory is respected, the
equal split, predictions, and the rebalancing trigger (docs/algorithms.md, "Pipeline")."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttfl.fl.pipeline_plan import (
    Drift,
    StageCost,
    brute_force,
    equal,
    evaluate,
    link_cost,
    plan,
    rescaled,
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[StageCost], list[int], tuple[int, ...], tuple[float, ...]]:
    n = draw(st.integers(2, 8))
    s = draw(st.integers(1, min(4, n)))
    times = st.floats(0.001, 5.0, allow_nan=False)
    costs = []
    for _ in range(s):
        block_s = tuple(draw(st.lists(times, min_size=n, max_size=n)))
        params = tuple(draw(st.lists(st.integers(0, 100), min_size=n, max_size=n)))
        acts = tuple(draw(st.lists(st.integers(0, 20), min_size=n, max_size=n)))
        memory = draw(st.sampled_from([0, 0, 150, 300, 600]))
        costs.append(StageCost(block_s, params, acts, memory))
    stash = [draw(st.integers(1, 4)) for _ in range(s)]
    boundary = tuple(draw(st.lists(st.integers(0, 1000), min_size=n + 1, max_size=n + 1)))
    bandwidth = tuple(draw(st.lists(st.sampled_from([math.inf, 1000.0, 5000.0]), min_size=s - 1, max_size=s - 1)))
    return costs, stash, boundary, bandwidth


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_dp_finds_the_brute_force_optimum_within_every_stages_memory(case: tuple) -> None:
    costs, stash, boundary, bandwidth = case
    dp = plan(costs, stash, boundary_bytes=boundary, bandwidth=bandwidth)
    bf = brute_force(costs, stash, boundary_bytes=boundary, bandwidth=bandwidth)
    assert (dp is None) == (bf is None)
    if dp is None or bf is None:
        return
    assert dp.bottleneck_s == pytest.approx(bf.bottleneck_s, rel=1e-12, abs=1e-12)
    n = len(costs[0].block_s)
    assert dp.bounds[0] == 0 and dp.bounds[-1] == n and len(dp.bounds) == len(costs) + 1
    for k, (a, b) in enumerate(dp.ranges()):
        assert a < b, "every stage gets at least one block"
        assert costs[k].fits(a, b, stash[k])
    assert dp == evaluate(costs, dp.bounds, boundary_bytes=boundary, bandwidth=bandwidth)


def test_faster_stages_get_more_blocks_and_the_split_beats_an_equal_one() -> None:
    # Stage speeds 1x, 2x, 4x over 12 equal blocks: the slowest stage gets the fewest.
    costs = [StageCost((4.0,) * 12), StageCost((2.0,) * 12), StageCost((1.0,) * 12)]
    p = plan(costs, [3, 3, 1])
    assert p is not None and [b - a for a, b in p.ranges()] in ([2, 3, 7], [1, 4, 7], [2, 4, 6], [1, 3, 8])
    eq = evaluate(costs, equal(12, 3))
    assert eq.bottleneck_s == 16.0 and p.bottleneck_s == 8.0


def test_memory_moves_blocks_off_a_small_stage_or_refuses_a_plan_that_cannot_fit() -> None:
    fast_small = StageCost((1.0,) * 4, param_bytes=(10,) * 4, act_bytes=(5,) * 4, memory_bytes=15)
    slow_big = StageCost((3.0,) * 4, param_bytes=(10,) * 4, act_bytes=(5,) * 4, memory_bytes=0)
    p = plan([fast_small, slow_big], [1, 1])  # one block plus one stashed micro-batch is all the first holds
    assert p is not None and p.bounds == (0, 1, 4)
    assert plan([fast_small, slow_big], [2, 1]) is None  # with 2 stashed it holds nothing
    assert brute_force([fast_small, slow_big], [2, 1]) is None


def test_a_fixed_boundary_stays_where_it_is() -> None:
    costs = [StageCost((1.0,) * 6), StageCost((3.0,) * 6), StageCost((1.0,) * 6)]
    free = plan(costs, [3, 3, 1])
    fixed = plan(costs, [3, 3, 1], fixed={2: 4})
    assert free is not None and fixed is not None
    assert fixed.bounds[2] == 4 and fixed.bottleneck_s >= free.bottleneck_s


def test_links_cost_twice_the_activations_over_the_bandwidth_and_can_be_the_bottleneck() -> None:
    assert link_cost((0, 1000, 0), (500.0,), 0, 1) == 4.0
    assert link_cost((0, 1000, 0), (math.inf,), 0, 1) == 0.0
    costs = [StageCost((1.0, 1.0, 1.0)), StageCost((1.0, 1.0, 1.0))]
    p = plan(costs, [1, 1], boundary_bytes=(0, 100_000, 1, 0), bandwidth=(1000.0,))
    assert p is not None and p.bounds == (0, 2, 3)  # the cut avoids the boundary with big activations


def test_equal_split_and_the_batch_time_and_bubble_predictions() -> None:
    assert equal(12, 3) == (0, 4, 8, 12) and equal(5, 3) == (0, 2, 4, 5) and equal(4, 4) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError):
        equal(2, 3)
    p = evaluate([StageCost((1.0,) * 6)] * 3, equal(6, 3))
    # 1F1B with M = 8 over 3 equal stages of 2 s: the first micro-batch crosses all (6 s), 7 follow at 2 s.
    assert p.batch_s(8) == 20.0 and p.bubble(8) == pytest.approx(1 - 8 * 6 / (3 * 20))
    assert p.batch_s(1) == 6.0


def test_drift_triggers_after_windows_in_a_row_beyond_the_threshold_and_rescales_the_profile() -> None:
    d = Drift(0.15, 3)
    assert not d.observe(1.1, 1.0)  # within the threshold
    assert [d.observe(1.2, 1.0) for _ in range(3)] == [False, False, True]
    assert not d.observe(1.2, 1.0) and d.count == 1  # counting again from zero
    assert not d.observe(1.0, 1.0) and d.count == 0  # a good window resets it
    assert not Drift(0.0, 1).observe(100.0, 1.0)  # threshold 0: never
    costs = [StageCost((1.0,) * 4), StageCost((1.0,) * 4)]
    scaled = rescaled(costs, (0, 2, 4), (2.0, 6.0))
    assert scaled[0].block_s == (1.0,) * 4 and scaled[1].block_s == (3.0,) * 4
