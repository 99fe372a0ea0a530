from __future__ import annotations

import math
import subprocess
import sys
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mqttfl.wire.codec import (
    DEFAULT_LIMITS,
    DTYPES,
    PROTOCOL_VERSION,
    CodecError,
    Envelope,
    Limits,
    decode,
    decode_json,
    encode,
    encode_json,
    tensor_bytes,
)
from mqttfl.wire.topics import BINARY_KINDS

# ------------------------------------------------------------------------------------------------ helpers


def _valid_env(**kw: Any) -> Envelope:
    base: dict[str, Any] = dict(
        kind="act",
        src="dev1",
        dst="edge1",
        body={"mb": 3, "labels": [1, 2]},
        tensors={"x": np.arange(6, dtype=np.float32).reshape(2, 3)},
        run="r1",
        round=4,
        seq=9,
        ts=12.5,
    )
    base.update(kw)
    return Envelope(**base)


def _raw_msg() -> dict[str, Any]:
    """A valid message as a plain map, for crafting hostile variants of it."""
    return msgpack.unpackb(encode(_valid_env()), raw=False)


def _pack(msg: Any) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def _code_of(data: bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    with pytest.raises(CodecError) as info:
        decode(data, limits)
    return info.value.code


def _with_tensor(**spec: Any) -> bytes:
    msg = _raw_msg()
    tensor = {"dtype": "float32", "shape": [2], "data": b"\0" * 8}
    tensor.update(spec)
    msg["tensors"] = {"t": tensor}
    return _pack(msg)


# ------------------------------------------------------------------------------------------------ round trips

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
bodies = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        msgpack_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=10,
    ),
    max_size=5,
)


@st.composite
def tensor_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(sorted(DTYPES))))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    if dtype.kind == "f":
        elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    else:
        elements = hnp.from_dtype(dtype)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(BINARY_KINDS)),
    body=bodies,
    tensors=st.dictionaries(st.text(max_size=8), tensor_arrays(), max_size=4),
    rnd=st.integers(min_value=0, max_value=2**40),
    seq=st.integers(min_value=0, max_value=2**40),
    ts=st.floats(allow_nan=False, allow_infinity=False),
)
def test_envelope_round_trips_every_dtype_and_shape(
    kind: str, body: dict[str, Any], tensors: dict[str, np.ndarray], rnd: int, seq: int, ts: float
) -> None:
    env = Envelope(
        kind=kind, src="dev1", dst="all", body=body, tensors=tensors, run="run-1", round=rnd, seq=seq, ts=ts
    )
    out = decode(encode(env))
    assert (out.kind, out.src, out.dst, out.run, out.round, out.seq, out.ts, out.id, out.v) == (
        kind,
        "dev1",
        "all",
        "run-1",
        rnd,
        seq,
        ts,
        env.id,
        PROTOCOL_VERSION,
    )
    assert out.body == body
    assert list(out.tensors) == list(tensors)
    for name, arr in tensors.items():
        got = out.tensors[name]
        assert got.dtype.name == arr.dtype.name
        assert got.shape == arr.shape
        assert np.array_equal(got, arr)


def test_scalar_and_zero_size_tensors_round_trip() -> None:
    env = _valid_env(tensors={"s": np.float64(2.5), "z": np.zeros((0, 3), np.int8), "e": np.array(7)})
    out = decode(encode(env))
    assert out.tensors["s"].shape == () and out.tensors["s"] == 2.5
    assert out.tensors["z"].shape == (0, 3)
    assert out.tensors["e"].dtype == np.int64


def test_non_contiguous_and_big_endian_arrays_are_sent_as_little_endian_c_order() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = base.T[::2]
    big = np.arange(5, dtype=">i4")
    out = decode(encode(_valid_env(tensors={"strided": strided, "big": big})))
    assert np.array_equal(out.tensors["strided"], strided)
    assert np.array_equal(out.tensors["big"], big)
    assert out.tensors["big"].dtype.byteorder in ("<", "=")


def test_decoded_tensors_are_read_only_views() -> None:
    out = decode(encode(_valid_env()))
    arr = out.tensors["x"]
    assert not arr.flags.writeable
    with pytest.raises(ValueError):
        arr[0, 0] = 1.0


def test_torch_tensors_encode_including_ones_that_require_grad() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).requires_grad_()
    out = decode(encode(_valid_env(tensors={"w": t * 2, "idx": torch.tensor([1, 2], dtype=torch.int64)})))
    assert np.array_equal(out.tensors["w"], (np.arange(12, dtype=np.float32) * 2).reshape(3, 4))
    assert out.tensors["idx"].dtype == np.int64


def test_torch_bfloat16_is_refused_as_bad_dtype() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(CodecError) as info:
        encode(_valid_env(tensors={"w": torch.zeros(2, dtype=torch.bfloat16)}))
    assert info.value.code == "bad_dtype"


def test_importing_the_codec_does_not_import_torch() -> None:
    code = "import sys, mqttfl.wire.codec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_numpy_scalars_in_body_are_encoded_as_plain_numbers() -> None:
    out = decode(encode(_valid_env(body={"loss": np.float32(0.5), "n": np.int64(3)})))
    assert out.body == {"loss": 0.5, "n": 3}


@pytest.mark.parametrize(
    ("env_kw", "code"),
    [
        ({"kind": "status"}, "unknown_kind"),
        ({"kind": "bogus"}, "unknown_kind"),
        ({"tensors": {"c": np.zeros(2, np.complex64)}}, "bad_dtype"),
        ({"tensors": {"o": np.array(["a"], dtype=object)}}, "bad_dtype"),
        ({"tensors": {"l": [1.0, 2.0]}}, "bad_type"),
        ({"id": b"short"}, "bad_field"),
        ({"src": "Dev/1"}, "bad_field"),
        ({"body": {"f": object()}}, "bad_field"),
    ],
)
def test_encode_refuses_what_the_receiver_would_reject(env_kw: dict[str, Any], code: str) -> None:
    with pytest.raises(CodecError) as info:
        encode(_valid_env(**env_kw))
    assert info.value.code == code


def test_tensor_bytes_sums_raw_tensor_sizes() -> None:
    env = _valid_env(tensors={"a": np.zeros((2, 3), np.float32), "b": np.zeros(5, np.int8)})
    assert tensor_bytes(env) == 29


# -------------------------------------------------------------------------------------------- hostile input


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decode_of_random_bytes_returns_an_envelope_or_raises_codec_error(data: bytes) -> None:
    try:
        assert isinstance(decode(data), Envelope)
    except CodecError as exc:
        assert exc.code


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        msgpack_scalars,
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(
                st.sampled_from(["v", "kind", "id", "src", "dst", "tensors", "dtype", "shape", "data", "x"]),
                c,
                max_size=6,
            )
        ),
        max_leaves=20,
    )
)
def test_decode_of_random_msgpack_structures_raises_only_codec_error(obj: Any) -> None:
    try:
        decode(_pack(obj))
    except CodecError:
        pass


def test_every_truncation_of_a_valid_message_is_malformed() -> None:
    data = encode(_valid_env(tensors={"x": np.arange(4, dtype=np.int16)}, body={"k": "v"}))
    for cut in range(len(data)):
        assert _code_of(data[:cut]) == "malformed", cut


def test_trailing_garbage_is_malformed() -> None:
    assert _code_of(encode(_valid_env()) + b"\x00") == "malformed"


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(_valid_env())
    assert decode(bytearray(data)).seq == 9
    assert decode(memoryview(data)).seq == 9


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("v", "1", "bad_type"),
        ("v", True, "bad_type"),
        ("v", 2, "bad_version"),
        ("v", 0, "bad_version"),
        ("kind", 5, "bad_type"),
        ("kind", "status", "unknown_kind"),
        ("kind", "bogus", "unknown_kind"),
        ("id", "0123456789abcdef", "bad_type"),
        ("id", b"123", "bad_field"),
        ("src", b"dev1", "bad_type"),
        ("src", "DEV/1", "bad_field"),
        ("dst", "+", "bad_field"),
        ("run", 3, "bad_type"),
        ("round", "1", "bad_type"),
        ("round", 1.5, "bad_type"),
        ("seq", True, "bad_type"),
        ("ts", "now", "bad_type"),
        ("body", [1], "bad_type"),
        ("tensors", [], "bad_type"),
    ],
)
def test_wrong_field_types_are_rejected_with_a_specific_code(field: str, value: Any, code: str) -> None:
    msg = _raw_msg()
    msg[field] = value
    assert _code_of(_pack(msg)) == code


@pytest.mark.parametrize(
    "field", ["v", "kind", "id", "src", "dst", "run", "round", "seq", "ts", "body", "tensors"]
)
def test_missing_fields_are_bad_field(field: str) -> None:
    msg = _raw_msg()
    del msg[field]
    assert _code_of(_pack(msg)) == "bad_field"


def test_non_map_top_level_is_bad_type() -> None:
    assert _code_of(_pack([1, 2, 3])) == "bad_type"
    assert _code_of(_pack(7)) == "bad_type"


def test_integer_ts_is_accepted_as_float() -> None:
    msg = _raw_msg()
    msg["ts"] = 17
    assert decode(_pack(msg)).ts == 17.0


def test_a_chunk_frame_is_not_an_envelope() -> None:
    assert _code_of(_pack({"v": 1, "chunk": {}, "data": b""})) == "bad_field"


@pytest.mark.parametrize("dtype", ["object", "<U1", "complex64", "O", "float128", "S4", "<f4", ""])
def test_dtypes_outside_the_whitelist_are_bad_dtype(dtype: str) -> None:
    assert _code_of(_with_tensor(dtype=dtype)) == "bad_dtype"


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"shape": [3]}, "shape_mismatch"),
        ({"shape": [2], "data": b"\0" * 9}, "shape_mismatch"),
        ({"shape": [], "data": b""}, "shape_mismatch"),
        ({"shape": [-1]}, "bad_shape"),
        ({"shape": [2, -1]}, "bad_shape"),
        ({"shape": [1.5]}, "bad_shape"),
        ({"shape": [True, 2]}, "bad_shape"),
        ({"shape": [1] * 9, "data": b"\0" * 4}, "bad_shape"),
        ({"shape": "2"}, "bad_type"),
        ({"dtype": 5}, "bad_type"),
        ({"data": "xxxxxxxx"}, "bad_type"),
        ({"extra": 1}, "bad_field"),
    ],
)
def test_inconsistent_tensor_specs_are_rejected(spec: dict[str, Any], code: str) -> None:
    assert _code_of(_with_tensor(**spec)) == code


def test_missing_tensor_field_is_bad_field() -> None:
    msg = _raw_msg()
    msg["tensors"] = {"t": {"dtype": "float32", "shape": [0]}}
    assert _code_of(_pack(msg)) == "bad_field"


def test_tiny_message_declaring_a_huge_shape_fails_fast_without_allocating() -> None:
    data = _with_tensor(shape=[2**62, 2**62, 2**62], data=b"")
    tracemalloc.start()
    try:
        assert _code_of(data) == "too_large"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # refused from the declared shape, before any buffer of that size


def test_per_tensor_and_total_element_caps() -> None:
    limits = Limits(max_tensor_elements=10, max_total_elements=15)
    ok = _valid_env(tensors={"a": np.zeros(10, np.uint8)})
    assert decode(encode(ok), limits).tensors["a"].size == 10
    assert _code_of(encode(_valid_env(tensors={"a": np.zeros(11, np.uint8)})), limits) == "too_large"
    two = _valid_env(tensors={"a": np.zeros(8, np.uint8), "b": np.zeros(8, np.uint8)})
    assert _code_of(encode(two), limits) == "too_large"


def test_too_many_tensors() -> None:
    env = _valid_env(tensors={str(i): np.zeros(1, np.uint8) for i in range(3)})
    assert _code_of(encode(env), Limits(max_tensors=2)) == "too_many_tensors"


def test_message_over_the_byte_cap_is_too_large() -> None:
    data = encode(_valid_env())
    assert _code_of(data, Limits(max_message_bytes=len(data) - 1)) == "too_large"
    assert decode(data, Limits(max_message_bytes=len(data))).kind == "act"


def test_container_header_claiming_billions_of_entries_is_refused_without_allocating() -> None:
    # array32 header declaring 2**32-1 elements, followed by nothing
    hostile = b"\x81\xa4body\xdd\xff\xff\xff\xff"
    tracemalloc.start()
    try:
        assert _code_of(hostile) == "malformed"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_ext_types_are_malformed() -> None:
    msg = _raw_msg()
    msg["body"] = {"when": msgpack.Timestamp(1, 0)}
    assert _code_of(_pack(msg)) == "malformed"


@pytest.mark.parametrize("kind", ["act", "grad", "delta", "model", "ckpt"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_non_finite_values_are_refused_in_training_kinds(kind: str, bad: float, dtype: Any) -> None:
    arr = np.ones((3, 4), dtype)
    arr[2, 1] = bad
    env = _valid_env(kind=kind, tensors={"ok": np.ones(2, dtype), "x": arr})
    assert _code_of(encode(env)) == "non_finite"


def test_non_finite_values_are_allowed_in_profile_messages() -> None:
    arr = np.array([math.nan, math.inf, 1.0], np.float32)
    out = decode(encode(_valid_env(kind="profile", tensors={"t": arr})))
    assert np.isnan(out.tensors["t"][0]) and np.isinf(out.tensors["t"][1])


def test_codec_error_carries_code_and_readable_message() -> None:
    with pytest.raises(CodecError) as info:
        decode(_with_tensor(dtype="complex64"))
    assert info.value.code == "bad_dtype"
    assert "complex64" in str(info.value)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------ JSON


def test_json_round_trip_is_compact_and_converts_numpy_scalars() -> None:
    obj = {"state": "online", "loss": np.float32(0.25), "n": np.int64(3), "name": "édge", "xs": [1, None]}
    data = encode_json(obj)
    assert b" " not in data
    assert decode_json(data) == {"state": "online", "loss": 0.25, "n": 3, "name": "édge", "xs": [1, None]}


def test_encode_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode_json({"loss": math.nan})
    with pytest.raises(ValueError):
        encode_json({"loss": np.float32("inf")})


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"[1, 2]", "bad_type"),
        (b'"text"', "bad_type"),
        (b"\xff\xfe{}", "malformed"),
        (b'{"a": ', "malformed"),
        (b'{"a": NaN}', "malformed"),
        (b"", "malformed"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed"),
    ],
)
def test_decode_json_rejects_bad_payloads(data: bytes, code: str) -> None:
    with pytest.raises(CodecError) as info:
        decode_json(data)
    assert info.value.code == code


def test_decode_json_rejects_oversize_payloads() -> None:
    data = encode_json({"pad": "x" * 100})
    with pytest.raises(CodecError) as info:
        decode_json(data, Limits(max_json_bytes=len(data) - 1))
    assert info.value.code == "too_large"
    assert decode_json(data, Limits(max_json_bytes=len(data)))["pad"] == "x" * 100
