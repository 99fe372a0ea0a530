"""Update compression (ALGORITHMS §8): unbiased int8, bounded fp16, lossless top-k error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from mqttfl.wire.compress import (
    CompressionError,
    TopK,
    decode,
    decode_int8,
    decode_topk,
    dequantize_int8,
    encode,
    encode_fp16,
    encode_int8,
    quantize_int8,
)


def test_stochastic_int8_is_unbiased_within_three_sigma() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200)
    trials = 4000
    samples = np.stack([dequantize_int8(*quantize_int8(x, rng)).astype(np.float64) for _ in range(trials)])
    s = float(quantize_int8(x, rng)[1])
    # Each dequantisation is x rounded to one of its two neighbours on the grid s*Z: a Bernoulli variable.
    frac = x / s - np.floor(x / s)
    var = s**2 * frac * (1 - frac) / trials
    error = samples.mean(axis=0) - x
    # One statistic for the whole tensor, so 3 sigma is an honest bound rather than 200 separate ones...
    assert abs(error.sum()) <= 3 * np.sqrt(var.sum())
    # ...and per element, with the threshold widened for 200 comparisons (Bonferroni).
    assert np.all(np.abs(error) <= 4.5 * np.sqrt(var) + 1e-12)


def test_stochastic_mean_is_closer_than_nearest_rounding() -> None:
    # Nearest rounding of a value between grid points has a fixed error that averaging never removes.
    x = np.array([1.0, 0.3])
    _, s = quantize_int8(x, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    mean = np.mean([dequantize_int8(*quantize_int8(x, rng))[1] for _ in range(4000)])
    nearest = np.round(0.3 / float(s)) * float(s)
    assert abs(mean - 0.3) < abs(nearest - 0.3)


def test_int8_error_never_exceeds_the_scale() -> None:
    rng = np.random.default_rng(1)
    for scale in (1e-6, 1.0, 3e4):
        x = rng.standard_normal((7, 13)) * scale
        q, s = quantize_int8(x, rng)
        assert q.dtype == np.int8 and q.shape == x.shape and s.dtype == np.float32
        assert int(np.abs(q.astype(np.int64)).max()) <= 127
        assert np.all(np.abs(dequantize_int8(q, s) - x) <= float(s) * (1 + 1e-6))


def test_int8_all_zero_tensor_round_trips_to_zero() -> None:
    q, s = quantize_int8(np.zeros((3, 3)), np.random.default_rng(0))
    np.testing.assert_array_equal(dequantize_int8(q, s), np.zeros((3, 3), np.float32))


def test_int8_envelope_tensors_round_trip_by_name() -> None:
    rng = np.random.default_rng(2)
    state = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "fc.bias": np.ones(10, np.float32),
    }
    tensors = encode_int8(state, rng)
    assert set(tensors) == {"conv.weight.q", "conv.weight.s", "fc.bias.q", "fc.bias.s"}
    assert tensors["conv.weight.q"].dtype == np.int8 and tensors["conv.weight.s"].shape == ()
    back = decode(tensors, "int8")
    assert set(back) == set(state)
    for key, x in state.items():
        assert back[key].dtype == np.float32 and back[key].shape == x.shape
        assert np.all(np.abs(back[key] - x) <= float(tensors[key + ".s"]) * (1 + 1e-6))


def test_int8_decode_refuses_missing_scale_or_wrong_dtype() -> None:
    with pytest.raises(CompressionError, match="lacks"):
        decode_int8({"w.q": np.zeros(3, np.int8)})
    with pytest.raises(CompressionError, match="int8"):
        decode_int8({"w.q": np.zeros(3, np.int16), "w.s": np.float32(1.0)})
    with pytest.raises(CompressionError):
        quantize_int8(np.array([1.0, np.inf]), np.random.default_rng(0))


def test_fp16_round_trip_error_is_within_half_precision() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-8, 4, 1000)).astype(np.float32)
    back = decode(encode({"w": x}, "fp16"), "fp16")["w"]
    assert back.dtype == np.float32
    # Relative 2^-11 for normal float16 numbers, absolute 2^-25 in the subnormal range.
    assert np.all(np.abs(back - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))


def test_fp16_refuses_values_it_would_turn_into_infinity() -> None:
    with pytest.raises(CompressionError, match="float16 range"):
        encode_fp16({"w": np.array([1e6], np.float32)})


def test_topk_sends_the_largest_magnitudes() -> None:
    topk = TopK(ratio=0.25)
    d = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 0.05, 1.0], np.float32)
    tensors = topk.encode({"w": d})
    np.testing.assert_array_equal(tensors["w.idx"], [1, 3])
    np.testing.assert_array_equal(tensors["w.val"], [-5.0, 3.0])
    np.testing.assert_array_equal(tensors["w.shape"], [8])
    dense = decode_topk(tensors)["w"]
    np.testing.assert_array_equal(dense, [0, -5.0, 0, 3.0, 0, 0, 0, 0])


def test_topk_sent_plus_residual_equals_sum_of_deltas() -> None:
    rng = np.random.default_rng(4)
    topk = TopK(ratio=0.1)
    total_delta = np.zeros((6, 5))
    total_sent = np.zeros((6, 5))
    for _ in range(8):
        d = rng.standard_normal((6, 5)).astype(np.float32)
        total_delta += d
        total_sent += decode(encode({"w": d}, "topk", topk=topk), "topk")["w"]
    np.testing.assert_allclose(total_sent + topk.residual()["w"], total_delta, atol=1e-9)
    assert np.abs(topk.residual()["w"]).max() > 0


def test_topk_residual_is_fed_back_into_later_steps() -> None:
    topk = TopK(ratio=0.5)
    topk.encode({"w": np.array([1.0, 0.4], np.float32)})  # sends 1.0, keeps 0.4
    tensors = topk.encode({"w": np.array([0.5, 0.3], np.float32)})  # p = [0.5, 0.7]
    np.testing.assert_array_equal(tensors["w.idx"], [1])
    np.testing.assert_allclose(tensors["w.val"], [0.7], rtol=1e-6)


def test_topk_with_k_equal_to_d_leaves_no_residual() -> None:
    rng = np.random.default_rng(5)
    topk = TopK(ratio=1.0)
    for _ in range(3):
        d = rng.standard_normal((4, 4)).astype(np.float32)
        dense = decode_topk(topk.encode({"w": d}))["w"]
        np.testing.assert_array_equal(dense, d)
        np.testing.assert_array_equal(topk.residual()["w"], np.zeros((4, 4)))


def test_topk_residual_survives_a_checkpoint() -> None:
    rng = np.random.default_rng(6)
    deltas = [{"w": rng.standard_normal(20).astype(np.float32)} for _ in range(3)]
    original = TopK(ratio=0.2)
    original.encode(deltas[0])
    moved = TopK(ratio=0.2)
    moved.load_residual(original.residual())
    for d in deltas[1:]:
        a, b = original.encode(d), moved.encode(d)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_topk_decode_refuses_out_of_range_or_repeated_indices() -> None:
    base = {"w.val": np.ones(2, np.float32), "w.shape": np.array([4], np.int64)}
    with pytest.raises(CompressionError, match="out of range"):
        decode_topk({**base, "w.idx": np.array([0, 4], np.int64)})
    with pytest.raises(CompressionError, match="repeated"):
        decode_topk({**base, "w.idx": np.array([1, 1], np.int64)})


def test_unknown_scheme_and_missing_helpers_are_refused() -> None:
    with pytest.raises(CompressionError, match="unknown"):
        decode({}, "zstd")
    with pytest.raises(ValueError, match="rng"):
        encode({"w": np.zeros(2)}, "int8")
    with pytest.raises(ValueError, match="TopK"):
        encode({"w": np.zeros(2)}, "topk")
