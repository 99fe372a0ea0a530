"""Aggregation strategies as pure state machines behind one interface and one registry (docs/async.md)."""

from __future__ import annotations

import numpy as np
import pytest

from mqttfl.fl.staleness import constant, polynomial
from mqttfl.fl.strategies import (
    REGISTRY,
    EcoFLHybrid,
    FedAsync,
    FedAT,
    FedAvg,
    FedBuff,
    Grouping,
    OneGroup,
    Strategy,
    StrategyParams,
    Update,
    UpdateRejected,
    make_strategy,
    mean_delta,
    names,
)

SHAPES = {"w": (3, 2), "b": (2,)}


def state(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def fedavg(model, deltas_and_samples):
    total = sum(n for _, n in deltas_and_samples)
    return {k: model[k] + sum(n * d[k] for d, n in deltas_and_samples) / total for k in model}


def assert_state_close(a, b, atol=1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-6)


def roundtrip(strategy, fresh):
    """A restart: the persisted state_dict loaded into a newly built strategy."""
    fresh.load_state_dict(strategy.state_dict())
    return fresh


# ---------------------------------------------------------------------------------------------- interface


ASYNC = [FedAsync(), FedBuff(), FedAT(), EcoFLHybrid({"a": 0}), OneGroup({"a": 0})]


@pytest.mark.parametrize("strategy", ASYNC, ids=lambda s: s.name)
def test_every_asynchronous_strategy_refuses_future_versions(strategy) -> None:
    assert isinstance(strategy, Strategy) and not strategy.synchronous
    with pytest.raises(UpdateRejected, match="ahead"):
        strategy.submit(state(0), Update("a", state(1), 1, base_version=5, group=0))


@pytest.mark.parametrize("strategy", [FedAsync(), FedBuff(k=1), FedAvg()], ids=lambda s: s.name)
def test_a_delta_with_other_keys_or_shapes_is_rejected_without_changing_the_version(strategy) -> None:
    # A synchronous round may aggregate some layers only (FedLAMA), never a layer the model lacks.
    bad_keys = {"w": state(1)["w"]} if not strategy.synchronous else {**state(1), "zzz": np.zeros(1, np.float32)}
    bad_shape = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    for delta in (bad_keys, bad_shape):
        with pytest.raises(UpdateRejected):
            if strategy.synchronous:
                strategy.aggregate(state(0), [Update("a", delta, 1)])
            else:
                strategy.submit(state(0), Update("a", delta, 1, base_version=0))
    assert strategy.version == 0


def test_the_registry_builds_every_strategy_by_name_and_sorts_them_by_family() -> None:
    for name in REGISTRY:
        assert make_strategy(name, StrategyParams()).name == name
    assert names(synchronous=True) == ["clip", "dpfedavg", "fedadagrad", "fedadam", "fedavg", "fednova", "fedprox",
                                       "fedyogi", "krum", "median", "trimmed"]
    assert names(synchronous=False) == ["ecofl", "fedasync", "fedat", "fedbuff", "sync"]
    with pytest.raises(ValueError, match="known"):
        make_strategy("fedmagic")
    assert {make_strategy(n).grouping for n in names(synchronous=False)} == set(Grouping)


def test_fedavg_is_the_sample_weighted_mean_of_the_deltas_added_to_the_model() -> None:
    s = FedAvg()
    x = state(0)
    items = [(state(1), 10), (state(2), 30)]
    new = s.aggregate(x, [Update(f"e{i}", d, n) for i, (d, n) in enumerate(items)])
    assert_state_close(new, fedavg(x, items))
    assert s.version == 1 and roundtrip(s, FedAvg()).version == 1
    with pytest.raises(TypeError):
        s.submit(x, Update("a", state(1), 1))


# ---------------------------------------------------------------------------------------------- FedAsync


def test_fedasync_with_alpha_one_and_constant_staleness_returns_the_latest_model() -> None:
    s = FedAsync(alpha=1.0, staleness=constant())
    x, delta = state(0), state(1)
    new, advanced = s.submit(x, Update("a", delta, 10, base_version=0))
    assert advanced and s.version == 1
    for k in x:
        np.testing.assert_array_equal(new[k], x[k] + delta[k])
        assert new[k].dtype == np.float32


def test_fedasync_mixes_the_delta_with_alpha_times_staleness() -> None:
    s = FedAsync(alpha=0.6, staleness=polynomial(0.5))
    x = state(0)
    for _ in range(3):
        x, _ = s.submit(x, Update("fast", state(9, 0.0), 1, base_version=s.version))
    delta = state(1)
    new, _ = s.submit(x, Update("slow", delta, 1, base_version=0))  # staleness 3: s = 0.5
    assert_state_close(new, {k: x[k] + 0.3 * delta[k] for k in x})


def test_fedasync_gives_staler_updates_smaller_weights() -> None:
    s = FedAsync(alpha=0.6)
    weights = [s.mixing_weight(t) for t in range(6)]
    assert weights == sorted(weights, reverse=True) and len(set(weights)) == 6


def test_fedasync_drops_updates_beyond_max_staleness() -> None:
    s = FedAsync(max_staleness=0)
    x, _ = s.submit(state(0), Update("a", state(1), 1, base_version=0))
    same, advanced = s.submit(x, Update("b", state(2), 1, base_version=0))
    assert not advanced and same is x and s.version == 1


# ---------------------------------------------------------------------------------------------- FedBuff


def test_fedbuff_with_k_one_applies_deltas_one_by_one() -> None:
    s = FedBuff(k=1, eta_g=1.0, staleness=constant())
    x = state(0)
    expected = dict(x)
    for i in range(4):
        delta = state(10 + i)
        x, advanced = s.submit(x, Update(f"c{i}", delta, 1, base_version=s.version))
        expected = {k: expected[k] + delta[k] for k in expected}
        assert advanced and s.version == i + 1
    assert_state_close(x, expected)


def test_fedbuff_version_increments_once_per_k_updates() -> None:
    s = FedBuff(k=3)
    x = state(0)
    advanced = []
    for i in range(7):
        x, adv = s.submit(x, Update(f"c{i}", state(i), 1, base_version=s.version))
        advanced.append(adv)
    assert advanced == [False, False, True, False, False, True, False]
    assert s.version == 2 and s.buffered == 1


def test_fedbuff_applies_the_staleness_weighted_sum_over_k() -> None:
    s = FedBuff(k=2, eta_g=2.0)
    s.version = 3
    x, d0, d1 = state(0), state(1), state(2)
    s.submit(x, Update("fresh", d0, 1, base_version=3))
    new, _ = s.submit(x, Update("stale", d1, 1, base_version=0))  # τ = 3, weight 1/√4
    assert_state_close(new, {k: x[k] + 2.0 * (d0[k] + 0.5 * d1[k]) / 2 for k in x})


def test_fedbuff_buffer_survives_a_restart_mid_buffer() -> None:
    deltas = [state(i) for i in range(4)]
    x = state(99)

    uninterrupted = FedBuff(k=4)
    y = x
    for i, d in enumerate(deltas):
        y, _ = uninterrupted.submit(y, Update(f"c{i}", d, 1, base_version=0))

    s = FedBuff(k=4)
    for i, d in enumerate(deltas[:2]):
        s.submit(x, Update(f"c{i}", d, 1, base_version=0))
    s = roundtrip(s, FedBuff(k=4))
    assert s.buffered == 2
    z = x
    for i, d in enumerate(deltas[2:], start=2):
        z, _ = s.submit(z, Update(f"c{i}", d, 1, base_version=0))
    assert s.version == 1
    assert_state_close(z, y, atol=0)


# ---------------------------------------------------------------------------------------------- FedAT


def test_fedat_with_one_tier_equals_fedavg() -> None:
    s = FedAT()
    x = state(0)
    items = [(state(1), 10), (state(2), 30), (state(3), 60)]
    tier = mean_delta([Update(c, d, n) for c, (d, n) in zip("abc", items, strict=True)])
    new, advanced = s.submit(x, Update("tier-0", tier, 100, base_version=0, group=0))
    assert advanced and s.version == 1
    assert_state_close(new, fedavg(x, items))


def test_fedat_tier_weights_sum_to_one_and_favour_the_rarely_updated_tier() -> None:
    s = FedAT()
    x = state(0)
    for tier, times in ((0, 6), (1, 3), (2, 1)):
        for _ in range(times):
            x, _ = s.submit(x, Update(f"tier-{tier}", state(s.version, 0.1), 1, base_version=s.version, group=tier))
    weights = s.tier_weights()
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights == pytest.approx({0: 1 / 10, 1: 3 / 10, 2: 6 / 10})


def test_fedat_global_is_the_weighted_average_of_tier_models_and_survives_a_restart() -> None:
    s = FedAT()
    x0 = state(0)
    x1, _ = s.submit(x0, Update("fast", state(1), 1, base_version=0, group=0))
    s = roundtrip(s, FedAT())
    x2, _ = s.submit(x1, Update("fast", state(2), 1, base_version=1, group=0))
    x3, _ = s.submit(x2, Update("slow", state(3), 1, base_version=0, group=1))
    fast_model = {k: x1[k] + state(2)[k] for k in x1}
    slow_model = {k: x2[k] + state(3)[k] for k in x2}
    # T_fast = 2, T_slow = 1: the fast tier gets 1/3, the slow one 2/3.
    assert_state_close(x3, {k: fast_model[k] / 3 + 2 * slow_model[k] / 3 for k in x3}, atol=1e-5)
    with pytest.raises(UpdateRejected):
        s.submit(x3, Update("stranger", state(3), 4, base_version=0))


# ---------------------------------------------------------------------------------------------- Eco-FL


def test_ecofl_with_one_group_and_alpha_one_is_synchronous_fedavg() -> None:
    members = {"a": 0, "b": 0, "c": 0}
    eco, sync, fed = EcoFLHybrid(members, alpha=1.0, staleness=constant()), OneGroup(members), FedAvg()
    x_eco = x_sync = x_fed = state(0)
    for r in range(3):
        updates = [Update(c, state(10 * r + i, 0.1), 10 + i) for i, c in enumerate(members)]
        group = Update("group-0", mean_delta(updates), sum(u.num_samples for u in updates),
                       base_version=eco.version, group=0)
        x_eco, advanced = eco.submit(x_eco, group)
        x_sync, _ = sync.submit(x_sync, group)
        x_fed = fed.aggregate(x_fed, updates)
        assert advanced
    assert eco.version == sync.version == fed.version == 3
    assert_state_close(x_eco, x_fed)
    assert_state_close(x_sync, x_fed)


def test_ecofl_damps_a_stale_group_update() -> None:
    eco = EcoFLHybrid({"a": 0, "b": 1}, alpha=0.5)
    x = state(0)
    x, _ = eco.submit(x, Update("group-0", state(1, 0.0), 1, base_version=0, group=0))
    d = state(2)
    new, _ = eco.submit(x, Update("group-1", d, 1, base_version=0, group=1))  # staleness 1
    assert_state_close(new, {k: x[k] + 0.5 * 2**-0.5 * d[k] for k in x})


def test_ecofl_refuses_per_client_and_unknown_group_updates() -> None:
    eco = EcoFLHybrid({"a": 0, "b": -1})
    for upd in (Update("a", state(1), 1, 0), Update("group-9", state(1), 1, 0, group=9)):
        with pytest.raises(UpdateRejected):
            eco.submit(state(0), upd)
    eco.set_groups({"a": 0, "b": 1})
    _, advanced = eco.submit(state(0), Update("group-1", state(1), 1, 0, group=1))
    assert advanced and roundtrip(eco, EcoFLHybrid({})).groups == {"a": 0, "b": 1}


def _persistable(value) -> bool:
    """str/int/float/bool/None, lists, str-keyed dicts and numpy arrays: what the cloud's codec persists."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _persistable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_persistable(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool | np.ndarray)


def test_state_dicts_hold_only_persistable_values_mid_round() -> None:
    x = state(0)
    for s in [FedAsync(), FedBuff(k=3), FedAT(), EcoFLHybrid({"a": 0}), OneGroup({"a": 0})]:
        s.submit(x, Update("a", state(1), 2, base_version=0, group=0))
        assert _persistable(s.state_dict()), s.name
