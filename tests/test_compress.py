"""Compression maths and the wire encodings built on it (docs/algorithms.md, "Compression"): unbiased int8 per
tensor and per channel, bounded fp16, lossless sparse coordinates, top-k with error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from mqttfl.wire import encoding
from mqttfl.wire.codec import CodecError, Envelope, decode, encode
from mqttfl.wire.compress import CompressionError, TopK, dense, dequantize_int8, quantize_int8, sparse


def _round_trip(name: str, tensors: dict) -> dict:
    """Through the encoding and the real codec, as a message travels."""
    body: dict = {"op": "micro"}
    wire = encoding.encode_tensors(name, body, tensors)
    env = decode(encode(Envelope(kind="delta", src="a", dst="b", body=body, tensors=wire)))
    return encoding.decode_tensors(env.body, env.tensors)


def test_stochastic_int8_is_unbiased_within_three_sigma() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200)
    trials = 4000
    samples = np.stack([dequantize_int8(*quantize_int8(x, rng)).astype(np.float64) for _ in range(trials)])
    s = float(quantize_int8(x, rng)[1])
    frac = x / s - np.floor(x / s)  # each dequantisation is a Bernoulli between two grid neighbours
    var = s**2 * frac * (1 - frac) / trials
    error = samples.mean(axis=0) - x
    assert abs(error.sum()) <= 3 * np.sqrt(var.sum())
    assert np.all(np.abs(error) <= 4.5 * np.sqrt(var) + 1e-12)  # per element, Bonferroni-widened


def test_stochastic_mean_is_closer_than_nearest_rounding() -> None:
    x = np.array([1.0, 0.3])
    _, s = quantize_int8(x, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    mean = np.mean([dequantize_int8(*quantize_int8(x, rng))[1] for _ in range(4000)])
    assert abs(mean - 0.3) < abs(np.round(0.3 / float(s)) * float(s) - 0.3)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_error_never_exceeds_the_scale(per_channel: bool) -> None:
    rng = np.random.default_rng(1)
    for scale in (1e-6, 1.0, 3e4):
        x = rng.standard_normal((7, 13, 3)) * scale
        q, s = quantize_int8(x, rng, per_channel=per_channel)
        assert q.dtype == np.int8 and q.shape == x.shape and s.dtype == np.float32
        assert s.shape == ((1, 13, 1) if per_channel else ())
        assert int(np.abs(q.astype(np.int64)).max()) <= 127
        assert np.all(np.abs(dequantize_int8(q, s) - x) <= np.broadcast_to(s, x.shape) * (1 + 1e-6))


def test_per_channel_scales_follow_each_channel() -> None:
    # One loud channel would flatten a quiet one to zero under one scale; per channel it keeps its detail.
    x = np.stack([np.full((4, 4), 1000.0), np.linspace(-0.01, 0.01, 16).reshape(4, 4)], axis=1)  # [4, 2, 4]
    rng = np.random.default_rng(0)
    quiet_tensor = dequantize_int8(*quantize_int8(x, rng))[:, 1]
    quiet_channel = dequantize_int8(*quantize_int8(x, rng, per_channel=True))[:, 1]
    assert np.abs(quiet_channel - x[:, 1]).max() < 0.01 / 127 * 1.01
    assert np.abs(quiet_tensor - x[:, 1]).max() > 10 * np.abs(quiet_channel - x[:, 1]).max()


def test_int8_all_zero_tensor_round_trips_to_zero() -> None:
    for pc in (False, True):
        q, s = quantize_int8(np.zeros((3, 3)), np.random.default_rng(0), per_channel=pc)
        np.testing.assert_array_equal(dequantize_int8(q, s), np.zeros((3, 3), np.float32))


def test_fp16_round_trip_error_is_within_half_precision_and_out_of_range_stays_float32() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-8, 4, 1000)).astype(np.float32)
    back = _round_trip("fp16", {"w": x, "big": np.array([1e6, 1.0], np.float32)})
    assert back["w"].dtype == np.float32
    assert np.all(np.abs(back["w"] - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))
    np.testing.assert_array_equal(back["big"], [1e6, 1.0])


@pytest.mark.parametrize("name", ["none", "fp16", "int8", "int8c", "topk"])
def test_every_encoding_round_trips_through_the_codec_and_leaves_labels_alone(name: str) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    y = np.arange(5, dtype=np.int64)
    back = _round_trip(name, {"x": x, "y": y})
    assert set(back) == {"x", "y"} and back["x"].dtype == np.float32 and back["x"].shape == x.shape
    np.testing.assert_array_equal(back["y"], y)
    tol = {"none": 0.0, "topk": 0.0, "fp16": 2e-3 * np.abs(x).max()}.get(name, 2 * np.abs(x).max() / 127)
    assert np.abs(back["x"] - x).max() <= tol


def test_encoded_sizes() -> None:
    x = np.random.default_rng(5).standard_normal((100, 64, 16, 16)).astype(np.float32)
    raw = encoding.tensor_bytes({"x": x})
    for name, ratio in (("fp16", 0.5), ("int8", 0.25), ("int8c", 0.25)):
        wire = encoding.encode_tensors(name, {}, {"x": x})
        assert encoding.tensor_bytes(wire) <= ratio * raw + 64 * 4 + 8
    sparse_delta = np.zeros(10_000, np.float32)
    sparse_delta[::100] = 1.0
    wire = encoding.encode_tensors("topk", {}, {"d": sparse_delta})
    assert encoding.tensor_bytes(wire) == 100 * 8 + 8
    dense_one = encoding.encode_tensors("topk", {}, {"d": np.ones(10, np.float32)})
    assert set(dense_one) == {"d"}, "a dense tensor travels dense under topk"


def test_bad_wire_tensors_are_refused_as_bad_encoding() -> None:
    bad = [
        ("int8", {"w.q": np.zeros(3, np.int8)}),  # no scale
        ("int8", {"w.q": np.zeros(3, np.int16), "w.s": np.float32(1.0)}),
        ("int8", {"w.q": np.zeros((2, 3), np.int8), "w.s": np.ones((1, 4), np.float32)}),  # scales do not fit
        ("int8", {"w.q": np.zeros(3, np.int8), "w.s": np.float32(-1.0)}),
        ("int8", {"w": np.zeros(3, np.float32)}),  # a float tensor that was not encoded
        ("topk", {"w.idx": np.array([0, 4], np.int32), "w.val": np.ones(2, np.float32),
                  "w.shape": np.array([4], np.int64)}),  # out of range
        ("topk", {"w.idx": np.array([1, 1], np.int32), "w.val": np.ones(2, np.float32),
                  "w.shape": np.array([4], np.int64)}),  # repeated
        ("topk", {"w.idx": np.array([1], np.int64), "w.val": np.ones(1, np.float32),
                  "w.shape": np.array([4], np.int64)}),  # wrong index dtype
        ("topk", {"w.idx": np.array([1], np.int32), "w.val": np.ones(1, np.float32),
                  "w.shape": np.array([1 << 20, 1 << 20], np.int64)}),  # a huge dense allocation
    ]
    for name, tensors in bad:
        with pytest.raises(CodecError) as e:
            encoding.decode_tensors({"enc": name}, tensors)
        assert e.value.code == "bad_encoding", tensors


def test_sparse_coordinates_are_lossless() -> None:
    x = np.zeros((3, 4), np.float32)
    x[1, 2], x[2, 0] = -2.5, 7.0
    idx, val = sparse(x)
    np.testing.assert_array_equal(idx, [6, 8])
    np.testing.assert_array_equal(dense(idx, val, (3, 4)), x)
    with pytest.raises(CompressionError):
        dense(idx[::-1].copy(), val, (3, 4))


def test_topk_keeps_the_largest_magnitudes() -> None:
    d = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 0.05, 1.0], np.float32)
    kept = TopK(ratio=0.25).select({"w": d})["w"]
    np.testing.assert_array_equal(kept, [0, -5.0, 0, 3.0, 0, 0, 0, 0])


def test_topk_sent_plus_residual_equals_sum_of_deltas() -> None:
    rng = np.random.default_rng(4)
    topk = TopK(ratio=0.1)
    total_delta, total_sent = np.zeros((6, 5)), np.zeros((6, 5))
    for _ in range(8):
        d = rng.standard_normal((6, 5)).astype(np.float32)
        total_delta += d
        total_sent += _round_trip("topk", topk.select({"w": d}))["w"]
    np.testing.assert_allclose(total_sent + topk.residual()["w"], total_delta, atol=1e-9)
    assert np.abs(topk.residual()["w"]).max() > 0


def test_topk_residual_is_fed_back_into_later_steps() -> None:
    topk = TopK(ratio=0.5)
    topk.select({"w": np.array([1.0, 0.4], np.float32)})  # sends 1.0, keeps 0.4
    kept = topk.select({"w": np.array([0.5, 0.3], np.float32)})["w"]  # p = [0.5, 0.7]
    np.testing.assert_allclose(kept, [0.0, 0.7], rtol=1e-6)


def test_topk_with_k_equal_to_d_leaves_no_residual() -> None:
    rng = np.random.default_rng(5)
    topk = TopK(ratio=1.0)
    for _ in range(3):
        d = rng.standard_normal((4, 4)).astype(np.float32)
        np.testing.assert_array_equal(topk.select({"w": d})["w"], d)
        np.testing.assert_array_equal(topk.residual()["w"], np.zeros((4, 4)))


def test_topk_residual_survives_a_reload_and_a_shape_change_resets_it() -> None:
    rng = np.random.default_rng(6)
    deltas = [{"w": rng.standard_normal(20).astype(np.float32)} for _ in range(3)]
    original = TopK(ratio=0.2)
    original.select(deltas[0])
    moved = TopK(ratio=0.2, residual=original.residual())
    for d in deltas[1:]:
        np.testing.assert_array_equal(original.select(d)["w"], moved.select(d)["w"])
    # Another shape under the same name: the old memory is dropped, not added to the new tensor.
    np.testing.assert_array_equal(moved.select({"w": np.array([3.0, 1.0, 2.0], np.float32)})["w"], [3, 0, 0])
    np.testing.assert_array_equal(moved.residual()["w"], [0, 1, 2])
    with pytest.raises(CompressionError):
        TopK(0.1, residual={"w": np.array([np.nan])})
