"""FedLAMA layer-wise aggregation intervals (arXiv 2110.10302), properties from ALGORITHMS §6."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttfl.fl.fedlama import FedLAMA

SHAPES = {"conv.weight": (4, 3), "conv.bias": (3,), "norm.weight": (3,), "fc.weight": (3, 2), "fc.bias": (2,)}


def discrepancy(global_l, client_ls, tau_l):
    """d_l = (1/m)·Σ_i ‖u_l − x_l^i‖² / (τ_l·dim_l), as the paper defines it."""
    u = np.asarray(global_l, np.float64)
    total = sum(float(np.sum((u - np.asarray(x, np.float64)) ** 2)) for x in client_ls)
    return total / len(client_ls) / (tau_l * max(1, u.size))


def simulate(shapes, targets, steps, average_now, lr=0.3):
    """Local SGD on per-client quadratics ½‖x − target_i‖²; ``average_now(step, names, clients)`` decides
    which parameters are averaged after each step and returns them."""
    clients = [{n: np.zeros(s, np.float32) for n, s in shapes.items()} for _ in targets]
    for step in range(1, steps + 1):
        for x, t in zip(clients, targets, strict=True):
            for n in x:
                x[n] = (x[n] - np.float32(lr) * (x[n] - t[n])).astype(np.float32)
        for n in average_now(step, clients):
            u = np.mean([x[n] for x in clients], axis=0, dtype=np.float32)
            for x in clients:
                x[n] = u.copy()
    return clients


def random_targets(shapes, m, seed, agree=()):
    rng = np.random.default_rng(seed)
    shared = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    return [
        {n: shared[n] if n in agree else rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        for _ in range(m)
    ]


def fedlama_driver(sched: FedLAMA):
    def average_now(step, clients):
        names = sched.due(step)
        for n in names:
            copies = [x[n] for x in clients]
            sched.observe(n, discrepancy(np.mean(copies, axis=0), copies, sched.intervals[n]))
        sched.after_step(step)
        return names

    return average_now


def test_discrepancy_is_mean_squared_distance_per_step_and_element() -> None:
    u = np.zeros((2, 2))
    copies = [np.ones((2, 2)), 3 * np.ones((2, 2))]
    # (4·1 + 4·9) / 2 clients / (τ = 5 · dim = 4)
    assert discrepancy(u, copies, 5) == pytest.approx(20 / 20)


def test_phi_one_is_bit_identical_to_fedavg() -> None:
    targets = random_targets(SHAPES, 4, seed=1)
    sched = FedLAMA(SHAPES, tau=5, phi=1)
    lama = simulate(SHAPES, targets, 60, fedlama_driver(sched))
    fedavg = simulate(SHAPES, targets, 60, lambda step, _: list(SHAPES) if step % 5 == 0 else [])
    for a, b in zip(lama, fedavg, strict=True):
        for n in SHAPES:
            np.testing.assert_array_equal(a[n], b[n])
    assert sched.traffic_ratio() == 1.0


def test_layers_whose_copies_agree_are_averaged_less_often() -> None:
    shapes = {"big.weight": (20, 20), "small.weight": (2, 2), "small.bias": (2,)}
    targets = random_targets(shapes, 3, seed=2, agree={"big.weight", "small.bias"})
    sched = FedLAMA(shapes, tau=10, phi=2)
    simulate(shapes, targets, 20, fedlama_driver(sched))
    assert sched.relaxed() == ["big.weight"]
    assert sched.due(10) == ["small.weight", "small.bias"]
    assert sched.due(20) == list(shapes)
    assert sched.traffic_ratio() == pytest.approx((400 / 20 + 6 / 10) / (406 / 10))


def test_intervals_stay_at_tau_during_warmup_and_without_discrepancies() -> None:
    sched = FedLAMA(SHAPES, tau=10, phi=2, warmup_windows=2)
    for n in SHAPES:
        sched.observe(n, 0.0)
    assert not sched.after_step(20)
    assert sched.relaxed() == []
    assert sched.after_step(40)
    assert sched.relaxed() == ["conv.weight", "fc.weight"]

    unmeasured = FedLAMA(SHAPES, tau=10, phi=2)
    unmeasured.observe("conv.weight", 0.0)
    assert unmeasured.adjust() == [] and unmeasured.traffic_ratio() == 1.0


layer_sets = st.lists(
    st.tuples(st.integers(1, 4), st.integers(1, 50), st.floats(0.0, 10.0)), min_size=1, max_size=8
)


@settings(max_examples=100, deadline=None)
@given(layer_sets, st.integers(1, 4))
def test_adjust_relaxes_an_ascending_prefix_of_weight_layers_within_the_traffic_bounds(layers, phi) -> None:
    shapes, d = {}, {}
    for i, (ndim, size, d_l) in enumerate(layers):
        name = f"p{i}"
        shapes[name] = (size,) if ndim == 1 else (size,) + (2,) * (ndim - 1)
        d[name] = d_l
    sched = FedLAMA(shapes, tau=3, phi=phi)
    for n, v in d.items():
        sched.observe(n, v)
    relaxed = sched.adjust()
    assert set(relaxed) == set(sched.relaxed())
    if relaxed:
        assert relaxed == sched.last_order[: len(relaxed)]
        assert all(d[a] <= d[b] for a, b in zip(relaxed, relaxed[1:], strict=False))
    for n, s in shapes.items():
        if len(s) < 2:
            assert sched.intervals[n] == 3
        assert sched.intervals[n] in {3, 3 * phi}
    assert 1 / phi - 1e-12 <= sched.traffic_ratio() <= 1 + 1e-12


def test_custom_weight_predicate_decides_what_may_be_relaxed() -> None:
    sched = FedLAMA(SHAPES, is_weight=lambda name, shape: name.startswith("fc"), tau=2, phi=3)
    for n in SHAPES:
        sched.observe(n, 0.0)
    assert sorted(sched.adjust()) == ["fc.bias", "fc.weight"]


def test_state_dict_restores_the_schedule() -> None:
    sched = FedLAMA(SHAPES, tau=10, phi=2)
    for i, n in enumerate(SHAPES):
        sched.observe(n, float(i))
    sched.adjust()
    restored = FedLAMA(SHAPES, tau=10, phi=2)
    restored.load_state_dict(sched.state_dict())
    assert restored.intervals == sched.intervals and restored.discrepancies == sched.discrepancies
    assert [restored.due(s) for s in range(1, 41)] == [sched.due(s) for s in range(1, 41)]

    forged = sched.state_dict()
    forged["intervals"] = {**forged["intervals"], "conv.bias": 20}
    with pytest.raises(ValueError, match="never sets"):
        restored.load_state_dict(forged)
    with pytest.raises(ValueError, match="tau"):
        FedLAMA(SHAPES, tau=5, phi=2).load_state_dict(sched.state_dict())


def test_steps_count_from_one() -> None:
    with pytest.raises(ValueError):
        FedLAMA(SHAPES).due(0)
