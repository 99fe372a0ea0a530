"""Streaming aggregation equals the buffered reference: the running mean against ``weighted_average``, and whole
fleets in memory that fold updates as they arrive against the same fleets holding every device's delta."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mqttfl.fl.aggregate import AggregationError, weighted_average
from mqttfl.fl.strategies import StrategyParams, make_strategy
from mqttfl.fl.streaming import RunningMean
from tests.pair.common import fleet_of, max_abs_diff, spec

DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge1", "dev4": "edge2", "dev5": "edge2"}


def states(n: int, seed: int) -> list[tuple[dict[str, np.ndarray], float]]:
    rng = np.random.default_rng(seed)
    return [({"w": rng.normal(size=(7, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32),
              "count": np.array(int(rng.integers(0, 100)), dtype=np.int64)}, float(rng.integers(0, 50)) + 1.0)
            for _ in range(n)]


def running(items: list[tuple[dict[str, np.ndarray], float]], **kw: Any) -> RunningMean:
    m = RunningMean(**kw)
    for s, w in items:
        m.add(s, w)
    return m


@pytest.mark.parametrize("seed", range(5))
def test_the_running_mean_is_weighted_average_bit_for_bit_in_the_same_order(seed: int) -> None:
    items = states(40, seed)
    got, want = running(items).mean(), weighted_average(items)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize("seed", range(5))
def test_any_arrival_order_is_within_float32_rounding_of_the_buffered_mean(seed: int) -> None:
    items = states(200, seed)
    order = np.random.default_rng(seed + 100).permutation(len(items))
    got = running([items[i] for i in order]).mean()
    assert max_abs_diff(got, weighted_average(items)) <= 1e-6


def test_zero_weights_count_but_do_not_move_the_mean() -> None:
    items = states(3, 0)
    m = running(items)
    m.add(states(1, 9)[0][0], 0.0)
    assert len(m) == 4 and m.weight == sum(w for _, w in items)
    assert max_abs_diff(m.mean(), weighted_average(items)) == 0.0


def test_a_misfit_state_is_refused_before_any_of_it_is_added() -> None:
    items = states(3, 1)
    m = running(items)
    bad = dict(items[0][0], b=np.zeros(6, dtype=np.float32))
    with pytest.raises(AggregationError, match="'b'"):
        m.add(bad, 5.0)
    with pytest.raises(AggregationError, match="weight"):
        m.add(items[0][0], float("nan"))
    with pytest.raises(AggregationError, match="missing"):
        m.add({k: v for k, v in items[0][0].items() if k != "w"}, 1.0)
    assert len(m) == 3
    assert max_abs_diff(m.mean(), weighted_average(items)) == 0.0
    with pytest.raises(AggregationError):
        RunningMean().mean()
    with pytest.raises(AggregationError, match="zero"):
        running([(items[0][0], 0.0)]).mean()


def test_squared_norms_are_the_weighted_sums_fedlama_needs() -> None:
    items = states(10, 2)
    got = running(items, sqnorms=True).sqnorms()
    for k in ("w", "b"):
        want = sum(w * float(np.sum(np.square(s[k], dtype=np.float64))) for s, w in items)
        assert got[k] == pytest.approx(want, rel=1e-12)
    assert running(items).sqnorms() == {}


def edge_rounds(fleet: Any) -> list[Any]:
    return [r for e in ("edge1", "edge2") for r in fleet.machine(e).rounds.values()]


def run_fleet(strategy: str, *, held: list[int] | None = None) -> Any:
    s = spec(DEVICES, cloud={"strategy": strategy, "rounds": 3})
    fleet = fleet_of(s)

    def some_done_not_sent() -> bool:
        return any(not r.sent and any(x.delta is not None for x in r.sessions.values()) for r in edge_rounds(fleet))

    if held is not None:
        fleet.run_until(some_done_not_sent, max_time=600)
        held += [sum(1 for x in r.sessions.values() if x.delta) for r in edge_rounds(fleet)]
    assert fleet.run_to_end(max_time=600)["event"] == "run_complete"
    assert fleet.drops() == [] and fleet.job_errors == []
    return fleet


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_fleets_that_stream_end_on_the_model_of_fleets_that_buffer(strategy: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_strategy(strategy, StrategyParams()).preaggregate
    held: list[int] = []
    streamed = run_fleet(strategy, held=held)
    # While the round is open, an edge of a linear rule holds no device's delta: each is in its running mean.
    assert held and max(held) == 0
    assert all(r.mean is not None for r in edge_rounds(streamed) if r.sent)
    # The buffered reference: the same machines, made to forward and keep every device's delta to the close.
    monkeypatch.setattr(type(make_strategy(strategy, StrategyParams())), "preaggregate", False)
    buffered = run_fleet(strategy)
    assert max_abs_diff(streamed.global_state(), buffered.global_state()) <= 1e-6
    accs = [[e["accuracy"] for e in f.metrics("round", node=f.cloud)] for f in (streamed, buffered)]
    assert accs[0] == pytest.approx(accs[1], abs=1e-9) and len(accs[0]) == 3


def test_rules_that_need_every_update_keep_buffering() -> None:
    assert not make_strategy("median", StrategyParams()).preaggregate
    held: list[int] = []
    fleet = run_fleet("median", held=held)
    assert max(held) >= 1  # the edge keeps each device's delta to forward it
    assert all(r.mean is None for r in edge_rounds(fleet))

