"""Asynchronous aggregation strategies as pure state machines (ALGORITHMS §4 grouping, §5)."""

from __future__ import annotations

import numpy as np
import pytest

from mqttfl.fl.staleness import constant, polynomial
from mqttfl.fl.strategies import (
    EcoFLHybrid,
    FedAsync,
    FedAT,
    FedBuff,
    GroupRound,
    Strategy,
    SyncFedAvg,
    Update,
    UpdateRejected,
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


# ---------------------------------------------------------------------------------------------- protocol


@pytest.mark.parametrize(
    "strategy",
    [FedAsync(), FedBuff(), FedAT({"a": 0}), EcoFLHybrid({"a": 0}), SyncFedAvg(["a"])],
    ids=lambda s: s.name,
)
def test_every_strategy_satisfies_the_protocol_and_refuses_future_versions(strategy) -> None:
    assert isinstance(strategy, Strategy)
    with pytest.raises(UpdateRejected, match="ahead"):
        strategy.submit(state(0), Update("a", state(1), 1, base_version=5, group=0))


@pytest.mark.parametrize("strategy", [FedAsync(), FedBuff(k=1), SyncFedAvg(["a"])], ids=lambda s: s.name)
def test_a_delta_with_other_keys_or_shapes_is_rejected_without_changing_the_version(strategy) -> None:
    bad_keys = {"w": state(1)["w"]}
    bad_shape = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    for delta in (bad_keys, bad_shape):
        with pytest.raises(UpdateRejected):
            strategy.submit(state(0), Update("a", delta, 1, base_version=0))
    assert strategy.version == 0


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
    s = FedAT({"a": 0, "b": 0, "c": 0})
    x = state(0)
    items = [(state(1), 10), (state(2), 30), (state(3), 60)]
    for client, (d, n) in zip("ab", items[:2], strict=True):
        same, advanced = s.submit(x, Update(client, d, n, base_version=0))
        assert not advanced and same is x
    new, advanced = s.submit(x, Update("c", *items[2], base_version=0))
    assert advanced and s.version == 1
    assert_state_close(new, fedavg(x, items))


def test_fedat_tier_weights_sum_to_one_and_favour_the_rarely_updated_tier() -> None:
    s = FedAT({"fast": 0, "mid": 1, "slow": 2})
    x = state(0)
    for client, times in (("fast", 6), ("mid", 3), ("slow", 1)):
        for _ in range(times):
            x, _ = s.submit(x, Update(client, state(s.version, 0.1), 1, base_version=s.version))
    weights = s.tier_weights()
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights == pytest.approx({0: 1 / 10, 1: 3 / 10, 2: 6 / 10})


def test_fedat_global_is_the_weighted_average_of_tier_models() -> None:
    s = FedAT({"fast": 0, "slow": 1})
    x0 = state(0)
    x1, _ = s.submit(x0, Update("fast", state(1), 1, base_version=0))
    x2, _ = s.submit(x1, Update("fast", state(2), 1, base_version=1))
    x3, _ = s.submit(x2, Update("slow", state(3), 1, base_version=0))
    fast_model = {k: x1[k] + state(2)[k] for k in x1}
    slow_model = {k: x2[k] + state(3)[k] for k in x2}
    # T_fast = 2, T_slow = 1: the fast tier gets 1/3, the slow one 2/3.
    assert_state_close(x3, {k: fast_model[k] / 3 + 2 * slow_model[k] / 3 for k in x3}, atol=1e-5)


def test_fedat_accepts_a_group_round_as_the_tier_update_and_restores_pending_members() -> None:
    s = FedAT({"a": 0, "b": 0, "z": 1})
    x = state(0)
    s.submit(x, Update("a", state(1), 5, base_version=0))
    s = roundtrip(s, FedAT({"placeholder": 7}))
    new, advanced = s.submit(x, Update("b", state(2), 15, base_version=0))
    assert advanced
    assert_state_close(new, fedavg(x, [(state(1), 5), (state(2), 15)]))
    newer, advanced = s.submit(new, Update("group-1", state(3), 4, base_version=1, group=1))
    assert advanced and s.counts == {0: 1, 1: 1}
    with pytest.raises(UpdateRejected):
        s.submit(newer, Update("stranger", state(3), 4, base_version=0))


# ---------------------------------------------------------------------------------------------- Eco-FL


def test_ecofl_with_one_group_and_alpha_one_is_synchronous_fedavg() -> None:
    members = {"a": 0, "b": 0, "c": 0}
    eco = EcoFLHybrid(members, alpha=1.0, staleness=constant())
    sync = SyncFedAvg(members)
    x_eco = x_sync = state(0)
    for r in range(3):
        rnd = GroupRound(0, members, base_version=eco.version, opened_at=0.0, deadline_s=10.0)
        for i, c in enumerate(members):
            d, n = state(10 * r + i, 0.1), 10 + i
            rnd.add(c, d, n)
            x_sync, _ = sync.submit(x_sync, Update(c, d, n, base_version=sync.version))
        assert rnd.ready(now=1.0)
        x_eco, advanced = eco.submit(x_eco, rnd.close())
        assert advanced
    assert eco.version == sync.version == 3
    assert_state_close(x_eco, x_sync)


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


# ---------------------------------------------------------------------------------------------- SyncFedAvg


def test_sync_fedavg_waits_for_everyone_and_ignores_duplicates_and_late_answers() -> None:
    s = SyncFedAvg(["a", "b"])
    x = state(0)
    assert s.submit(x, Update("a", state(1), 1, 0)) == (x, False)
    assert s.submit(x, Update("a", state(5), 1, 0)) == (x, False)
    assert s.missing() == {"b"}
    new, advanced = s.submit(x, Update("b", state(2), 3, 0))
    assert advanced and s.version == 1
    assert_state_close(new, fedavg(x, [(state(1), 1), (state(2), 3)]))
    assert s.submit(new, Update("a", state(3), 1, 0)) == (new, False)


def test_sync_fedavg_flush_closes_a_round_with_whoever_answered() -> None:
    s = SyncFedAvg(["a", "b"])
    x = state(0)
    assert s.flush(x) == (x, False)
    s.submit(x, Update("a", state(1), 4, 0))
    s = roundtrip(s, SyncFedAvg(["other"]))
    new, advanced = s.flush(x)
    assert advanced and s.version == 1
    assert_state_close(new, {k: x[k] + state(1)[k] for k in x})


# ---------------------------------------------------------------------------------------------- GroupRound


def test_group_round_is_the_sample_weighted_mean_of_its_members() -> None:
    rnd = GroupRound(2, ["a", "b", "c"], base_version=7, opened_at=100.0, deadline_s=5.0)
    assert rnd.add("a", state(1), 1)
    assert not rnd.add("a", state(9), 1)
    assert not rnd.add("outsider", state(9), 1)
    assert rnd.add("b", state(2), 3)
    assert rnd.missing() == {"c"}
    assert not rnd.ready(now=104.9)
    assert rnd.ready(now=105.0)
    upd = rnd.close()
    assert upd is not None
    assert (upd.client, upd.group, upd.base_version, upd.num_samples) == ("group-2", 2, 7, 4)
    zero = {k: np.zeros_like(v) for k, v in state(0).items()}
    assert_state_close(upd.delta, fedavg(zero, [(state(1), 1), (state(2), 3)]))
    assert not rnd.add("c", state(3), 1)


def test_group_round_with_everyone_in_is_ready_before_the_deadline() -> None:
    rnd = GroupRound(0, ["a", "b"], base_version=0, opened_at=0.0, deadline_s=60.0)
    rnd.add("a", state(1), 1)
    assert not rnd.ready(now=1.0)
    rnd.add("b", state(2), 1)
    assert rnd.ready(now=1.0)


def test_group_round_quorum_allows_closing_early() -> None:
    members = [f"c{i}" for i in range(10)]
    rnd = GroupRound(0, members, base_version=0, opened_at=0.0, deadline_s=60.0, quorum=0.7)
    for i in range(6):
        rnd.add(f"c{i}", state(i), 1)
    assert not rnd.ready(now=1.0)
    rnd.add("c6", state(6), 1)
    assert rnd.ready(now=1.0)


def test_group_round_nobody_answered_is_never_ready_and_closes_to_none() -> None:
    rnd = GroupRound(0, ["a"], base_version=0, opened_at=0.0, deadline_s=1.0)
    assert not rnd.ready(now=1e9)
    assert rnd.close() is None
    with pytest.raises(RuntimeError):
        rnd.close()


def _persistable(value) -> bool:
    """str/int/float/bool/None, lists, str-keyed dicts and numpy arrays: what the cloud's codec persists."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _persistable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_persistable(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool | np.ndarray)


def test_state_dicts_hold_only_persistable_values_mid_round() -> None:
    x = state(0)
    strategies = [
        FedAsync(),
        FedBuff(k=3),
        FedAT({"a": 0, "b": 0, "c": 1}),
        EcoFLHybrid({"a": 0}),
        SyncFedAvg("ab"),
    ]
    for s in strategies:
        s.submit(x, Update("a", state(1), 2, base_version=0, group=0 if s.name == "ecofl" else None))
        assert _persistable(s.state_dict()), s.name
