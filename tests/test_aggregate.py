"""Aggregation maths: FedAvg, two-level (edge, cloud) equivalence, masked averaging."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttfl.fl.aggregate import (
    AggregationError,
    State,
    apply_delta,
    check_compatible,
    delta,
    masked_average,
    weighted_average,
)

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36)}


def random_state(rng: np.random.Generator) -> State:
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in SHAPES.items()}


def test_weighted_average_equals_manual_sum() -> None:
    rng = np.random.default_rng(0)
    states = [random_state(rng) for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    out = weighted_average(list(zip(states, weights, strict=True)))
    for key in SHAPES:
        manual = sum(w * s[key].astype(np.float64) for s, w in zip(states, weights, strict=True)) / 100.0
        np.testing.assert_allclose(out[key], manual, rtol=1e-6, atol=1e-7)
        assert out[key].dtype == np.float32


def test_equal_weights_give_the_mean_and_one_client_gives_itself() -> None:
    rng = np.random.default_rng(1)
    states = [random_state(rng) for _ in range(4)]
    mean = weighted_average([(s, 5) for s in states])
    for key in SHAPES:
        np.testing.assert_allclose(mean[key], np.mean([s[key] for s in states], axis=0), rtol=1e-6, atol=1e-7)
    alone = weighted_average([(states[0], 17)])
    for key in SHAPES:
        np.testing.assert_array_equal(alone[key], states[0][key])


def test_zero_weight_client_does_not_count_even_if_it_holds_nan() -> None:
    rng = np.random.default_rng(2)
    good, broken = random_state(rng), random_state(rng)
    broken["conv.bias"][:] = np.nan
    out = weighted_average([(good, 3.0), (broken, 0.0)])
    np.testing.assert_array_equal(out["conv.bias"], good["conv.bias"])


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [1.0, float("nan")]])
def test_bad_weights_are_refused(weights: list[float]) -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(AggregationError):
        weighted_average([(random_state(rng), w) for w in weights])


def test_integer_buffers_stay_integer() -> None:
    a = {"bn.num_batches_tracked": np.array(10, dtype=np.int64)}
    b = {"bn.num_batches_tracked": np.array(20, dtype=np.int64)}
    out = weighted_average([(a, 1), (b, 3)])
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == 18


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    edge_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
def test_edge_then_cloud_aggregation_equals_flat_fedavg(seed: int, edge_sizes: list[int]) -> None:
    rng = np.random.default_rng(seed)
    edges = [[(random_state(rng), float(rng.integers(1, 500))) for _ in range(size)] for size in edge_sizes]
    flat = weighted_average([item for edge in edges for item in edge])
    per_edge = [(weighted_average(edge), sum(n for _, n in edge)) for edge in edges]
    two_level = weighted_average(per_edge)
    for key in SHAPES:
        np.testing.assert_allclose(two_level[key], flat[key], rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    edge_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
def test_edge_deltas_then_cloud_equals_flat_fedavg(seed: int, edge_sizes: list[int]) -> None:
    rng = np.random.default_rng(seed)
    base = random_state(rng)
    edges = [[(random_state(rng), float(rng.integers(1, 500))) for _ in range(size)] for size in edge_sizes]
    flat = weighted_average([item for edge in edges for item in edge])
    # Devices send deltas, each edge averages them and sends one delta, the cloud averages the edge deltas.
    edge_deltas = [
        (weighted_average([(delta(s, base), n) for s, n in edge]), sum(n for _, n in edge)) for edge in edges
    ]
    new_global = apply_delta(base, weighted_average(edge_deltas))
    for key in SHAPES:
        np.testing.assert_allclose(new_global[key], flat[key], rtol=1e-5, atol=1e-5)


def test_apply_delta_inverts_delta_and_scales() -> None:
    rng = np.random.default_rng(4)
    base, new = random_state(rng), random_state(rng)
    d = delta(new, base)
    back = apply_delta(base, d)
    half = apply_delta(base, d, scale=0.5)
    for key in SHAPES:
        np.testing.assert_allclose(back[key], new[key], atol=1e-6)
        np.testing.assert_allclose(half[key], (base[key] + new[key]) / 2, atol=1e-6)


def test_incompatible_states_name_the_offending_key() -> None:
    rng = np.random.default_rng(5)
    a, b = random_state(rng), random_state(rng)
    b["fc.weight"] = b["fc.weight"][:, :35].copy()
    with pytest.raises(AggregationError, match="fc.weight"):
        check_compatible([a, b])
    c = random_state(rng)
    c["conv.bias"] = c["conv.bias"].astype(np.float64)
    with pytest.raises(AggregationError, match="conv.bias"):
        weighted_average([(a, 1), (c, 1)])
    d = random_state(rng)
    del d["conv.weight"]
    with pytest.raises(AggregationError, match="conv.weight"):
        weighted_average([(a, 1), (d, 1)])


# ---------------------------------------------------------------------------------------------------------
# Masked averaging

# ---------------------------------------------------------------------------------------------------------
# Masked averaging


def test_masked_average_with_full_masks_is_fedavg() -> None:
    rng = np.random.default_rng(6)
    base = random_state(rng)
    states = [random_state(rng) for _ in range(3)]
    weights = [5.0, 1.0, 9.0]
    full = {k: np.ones(shape, dtype=bool) for k, shape in SHAPES.items()}
    expected = weighted_average(list(zip(states, weights, strict=True)))
    for masks in ([None, None, None], [full, None, full]):
        out = masked_average(list(zip(states, masks, weights, strict=True)), base)
        for key in SHAPES:
            np.testing.assert_allclose(out[key], expected[key], rtol=1e-6, atol=1e-7)


def test_parameter_no_client_covered_is_unchanged() -> None:
    rng = np.random.default_rng(7)
    base = random_state(rng)
    mask = {k: np.ones(shape, dtype=bool) for k, shape in SHAPES.items()}
    mask["conv.weight"][0] = False  # output channel 0 pruned by everyone
    items = [(random_state(rng), mask, 2.0), (random_state(rng), mask, 3.0)]
    out = masked_average(items, base)
    np.testing.assert_array_equal(out["conv.weight"][0], base["conv.weight"][0])
    expected = (2 * items[0][0]["conv.weight"][1:] + 3 * items[1][0]["conv.weight"][1:]) / 5
    np.testing.assert_allclose(out["conv.weight"][1:], expected, rtol=1e-6, atol=1e-7)


def test_partially_masked_entries_average_over_covering_clients_only() -> None:
    base = {"w": np.zeros(3, dtype=np.float32)}
    a = ({"w": np.array([1.0, 1.0, 1.0], np.float32)}, {"w": np.array([1, 1, 0])}, 1.0)
    b = ({"w": np.array([3.0, np.nan, 5.0], np.float32)}, {"w": np.array([1, 0, 1])}, 3.0)
    out = masked_average([a, b], base)
    np.testing.assert_allclose(out["w"], [(1 + 9) / 4, 1.0, 5.0])


def test_weak_clients_that_omit_frozen_layers_do_not_touch_them() -> None:
    # EmbracingFL: weak clients train only the output-side "fc" layer and leave "conv.*" out of their upload.
    rng = np.random.default_rng(8)
    base = random_state(rng)
    strong = [(random_state(rng), None, 4.0), (random_state(rng), None, 6.0)]
    weak = [({"fc.weight": random_state(rng)["fc.weight"]}, None, 50.0) for _ in range(3)]
    out = masked_average(strong + weak, base)
    strong_only = weighted_average([(s, n) for s, _, n in strong])
    for key in ("conv.weight", "conv.bias"):
        np.testing.assert_allclose(out[key], strong_only[key], rtol=1e-6, atol=1e-7)
    everyone = (
        4 * strong[0][0]["fc.weight"].astype(np.float64)
        + 6 * strong[1][0]["fc.weight"]
        + 50 * sum(w[0]["fc.weight"].astype(np.float64) for w in weak)
    ) / 160
    np.testing.assert_allclose(out["fc.weight"], everyone, rtol=1e-5, atol=1e-6)


def test_per_channel_mask_broadcasts_for_width_reduction() -> None:
    rng = np.random.default_rng(9)
    base = random_state(rng)
    narrow = random_state(rng)
    channel_mask = {
        "conv.weight": np.array([1, 1, 0, 0]).reshape(4, 1, 1, 1),
        "conv.bias": np.array([1, 1, 0, 0]),
    }
    out = masked_average([(narrow, channel_mask, 1.0)], base)
    np.testing.assert_array_equal(out["conv.weight"][2:], base["conv.weight"][2:])
    np.testing.assert_array_equal(out["conv.weight"][:2], narrow["conv.weight"][:2])
    np.testing.assert_array_equal(out["fc.weight"], narrow["fc.weight"])


def test_masked_average_refuses_unknown_keys_and_misfit_masks() -> None:
    rng = np.random.default_rng(10)
    base = random_state(rng)
    with pytest.raises(AggregationError, match="extra"):
        masked_average([({"extra": np.zeros(1, np.float32)}, None, 1.0)], base)
    with pytest.raises(AggregationError, match="conv.bias"):
        masked_average([(random_state(rng), {"conv.bias": np.ones(5)}, 1.0)], base)
