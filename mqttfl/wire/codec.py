"""Wire formats: msgpack envelopes carrying raw tensors, and compact JSON for human-facing kinds.

A binary message is one msgpack map (docs/design.md, "Wire format")::

    {"v": 1, "kind": str, "id": bin16, "src": str, "dst": str, "run": str, "round": int, "seq": int,
     "ts": float, "body": {str: msgpack-native},
     "tensors": {name: {"dtype": str, "shape": [int], "data": bin}}}

Tensor data is raw little-endian bytes, never pickle, so a message can only ever produce the whitelisted
dtypes. :func:`decode` treats its input as hostile: it bounds what the msgpack unpacker may allocate by the
size of the message itself, checks every declared shape against the caps in :class:`Limits` with Python
integers (no overflow, nothing allocated from a declared size) and raises only :class:`CodecError`, whose
``code`` lets an agent count and report drops by reason.

Decoded tensors are zero-copy, read-only views into the message buffer. Callers that need to write copy them;
the torch backend copies only when required.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from mqttfl.wire.topics import BINARY_KINDS, TopicError, validate_id

PROTOCOL_VERSION = 1
DTYPES: frozenset[str] = frozenset(
    {"float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}
)
ERROR_CODES: frozenset[str] = frozenset(
    {
        "malformed",
        "bad_type",
        "bad_version",
        "unknown_kind",
        "bad_dtype",
        "bad_shape",
        "shape_mismatch",
        "too_large",
        "too_many_tensors",
        "non_finite",
        "bad_field",
    }
)
ID_BYTES = 16

_FIELDS = ("v", "kind", "id", "src", "dst", "run", "round", "seq", "ts", "body", "tensors")
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data"})
# Little-endian dtypes resolved once rather than per tensor on the hot path.
_LE_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}


class CodecError(ValueError):
    """A message that cannot be encoded or must not be used; ``code`` is a short machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {str(self)!r})"


@dataclass(frozen=True)
class Limits:
    """Caps a receiver applies before trusting a message."""

    max_message_bytes: int = 512 * 1024 * 1024
    max_tensor_elements: int = 64 * 1024 * 1024
    max_total_elements: int = 128 * 1024 * 1024
    max_tensors: int = 4096
    max_ndim: int = 8
    max_json_bytes: int = 1024 * 1024
    # One NaN in a delta or checkpoint poisons the global model for every later round, so these are refused.
    finite_kinds: frozenset[str] = frozenset({"act", "grad", "model", "delta", "ckpt"})


DEFAULT_LIMITS = Limits()


def new_id() -> bytes:
    """A fresh message id: receivers dedupe QoS 1 redeliveries and outbox re-sends by it."""
    return os.urandom(ID_BYTES)


@dataclass
class Envelope:
    kind: str
    src: str
    dst: str
    body: dict[str, Any] = field(default_factory=dict)
    # Decoded arrays are read-only views into the received message; copy before writing.
    tensors: dict[str, Any] = field(default_factory=dict)
    run: str = ""
    round: int = 0
    seq: int = 0
    id: bytes = field(default_factory=new_id)
    ts: float = 0.0
    v: int = PROTOCOL_VERSION


# ---------------------------------------------------------------------------------------------------- encode


def _to_le_array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, np.generic):
        arr = np.asarray(value)
    else:
        # A torch tensor can only exist if torch is already imported, so looking in sys.modules keeps torch
        # out of processes (monitors, the CLI) that never use it, at no cost.
        torch_mod = sys.modules.get("torch")
        if torch_mod is None or not isinstance(value, torch_mod.Tensor):
            raise CodecError(
                "bad_type",
                f"tensor {name!r}: expected a numpy array or torch tensor, got {type(value).__name__}",
            )
        try:
            arr = value.detach().cpu().numpy()
        except TypeError as exc:  # e.g. bfloat16, which numpy cannot represent
            raise CodecError("bad_dtype", f"tensor {name!r}: {exc}") from None
    dtype_name = arr.dtype.name
    if dtype_name not in DTYPES:
        raise CodecError("bad_dtype", f"tensor {name!r}: dtype {arr.dtype} is not one of {sorted(DTYPES)}")
    le = _LE_DTYPES[dtype_name]
    if arr.dtype != le:
        arr = arr.astype(le)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


def _msgpack_default(obj: Any) -> Any:
    # Numpy scalars slip into bodies easily (losses, accuracies); convert rather than fail at send time.
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} in a message body")


def encode(env: Envelope) -> bytes:
    """Serialise an envelope. Tensors may be numpy arrays (any layout or byte order) or torch tensors."""
    if env.kind not in BINARY_KINDS:
        raise CodecError("unknown_kind", f"kind {env.kind!r} is not a binary kind {sorted(BINARY_KINDS)}")
    if not isinstance(env.id, bytes) or len(env.id) != ID_BYTES:
        raise CodecError("bad_field", f"id must be {ID_BYTES} bytes")
    try:
        validate_id(env.src)
        validate_id(env.dst)
    except TopicError as exc:
        raise CodecError("bad_field", str(exc)) from None
    tensors: dict[str, dict[str, Any]] = {}
    for name, value in env.tensors.items():
        if not isinstance(name, str):
            raise CodecError("bad_type", f"tensor names must be str, got {type(name).__name__}")
        arr = _to_le_array(name, value)
        # A flat uint8 view lets msgpack copy the array's memory straight into the message (tobytes() would
        # add one more full copy per tensor).
        tensors[name] = {
            "dtype": arr.dtype.name,
            "shape": list(arr.shape),
            "data": arr.reshape(-1).view(np.uint8).data,
        }
    msg = {
        "v": env.v,
        "kind": env.kind,
        "id": env.id,
        "src": env.src,
        "dst": env.dst,
        "run": env.run,
        "round": env.round,
        "seq": env.seq,
        "ts": float(env.ts),
        "body": env.body,
        "tensors": tensors,
    }
    try:
        return msgpack.packb(msg, use_bin_type=True, default=_msgpack_default)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError("bad_field", f"cannot encode {env.kind} envelope: {exc}") from None


def tensor_bytes(env: Envelope) -> int:
    """Raw tensor payload size of an envelope, for metrics and chunking decisions."""
    total = 0
    for value in env.tensors.values():
        nbytes = getattr(value, "nbytes", None)
        if nbytes is None:  # torch.Tensor
            nbytes = value.element_size() * value.numel()
        total += int(nbytes)
    return total


# ---------------------------------------------------------------------------------------------------- decode


def _is_int(x: Any) -> bool:
    # msgpack booleans decode to bool, which is an int subclass; a flag is never a valid counter.
    return isinstance(x, int) and not isinstance(x, bool)


def _unpack(data: bytes | bytearray | memoryview, nbytes: int) -> Any:
    # Every container length is capped by the message size, so a 5-byte array header claiming 2**32 elements
    # is refused instead of making the unpacker pre-allocate a huge list. Ext types (timestamps, custom) are
    # never part of the protocol and are refused outright.
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=nbytes,
            max_str_len=nbytes,
            max_array_len=nbytes,
            max_map_len=nbytes // 2,
            max_ext_len=0,
        )
    except Exception as exc:
        raise CodecError("malformed", f"not a valid msgpack message: {exc}") from None


def _decode_tensors(kind: str, raw: Any, limits: Limits) -> dict[str, np.ndarray]:
    if not isinstance(raw, dict):
        raise CodecError("bad_type", f"'tensors' must be a map, got {type(raw).__name__}")
    if len(raw) > limits.max_tensors:
        raise CodecError("too_many_tensors", f"{len(raw)} tensors > cap {limits.max_tensors}")
    check_finite = kind in limits.finite_kinds
    total = 0
    out: dict[str, np.ndarray] = {}
    for name, spec in raw.items():
        if not isinstance(name, str):
            raise CodecError("bad_type", "tensor names must be strings")
        if not isinstance(spec, dict):
            raise CodecError("bad_type", f"tensor {name!r} must be a map, got {type(spec).__name__}")
        if set(spec) != _TENSOR_FIELDS:
            raise CodecError("bad_field", f"tensor {name!r} must have exactly the fields dtype, shape, data")
        dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
        if not isinstance(dtype, str):
            raise CodecError("bad_type", f"tensor {name!r}: dtype must be a string")
        if dtype not in DTYPES:
            raise CodecError("bad_dtype", f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if not isinstance(shape, list):
            raise CodecError("bad_type", f"tensor {name!r}: shape must be a list")
        if len(shape) > limits.max_ndim:
            raise CodecError("bad_shape", f"tensor {name!r}: {len(shape)} dimensions > cap {limits.max_ndim}")
        count = 1
        for dim in shape:
            if not _is_int(dim) or dim < 0:
                raise CodecError("bad_shape", f"tensor {name!r}: shape {shape!r} must be non-negative ints")
            count *= dim
        # Python ints: a hostile shape cannot overflow into a small product.
        if count > limits.max_tensor_elements:
            raise CodecError(
                "too_large", f"tensor {name!r}: {count} elements > cap {limits.max_tensor_elements}"
            )
        total += count
        if total > limits.max_total_elements:
            raise CodecError("too_large", f"tensors hold more than {limits.max_total_elements} elements")
        if not isinstance(data, bytes):
            raise CodecError("bad_type", f"tensor {name!r}: data must be binary")
        le = _LE_DTYPES[dtype]
        if count * le.itemsize != len(data):
            raise CodecError(
                "shape_mismatch",
                f"tensor {name!r}: shape {shape} of {dtype} needs {count * le.itemsize} bytes, "
                f"got {len(data)}",
            )
        arr = np.frombuffer(data, dtype=le).reshape(shape)
        if check_finite and le.kind == "f" and count and not _all_finite(arr):
            raise CodecError("non_finite", f"tensor {name!r} of a {kind!r} message contains NaN or Inf")
        out[name] = arr
    return out


def _all_finite(arr: np.ndarray) -> bool:
    # NaN propagates through min/max and an Inf is itself the min or max, so two reductions decide it
    # without allocating a boolean array the size of the tensor.
    return math.isfinite(arr.min()) and math.isfinite(arr.max())


def _decode(data: bytes | bytearray | memoryview, limits: Limits) -> Envelope:
    nbytes = memoryview(data).nbytes
    if nbytes > limits.max_message_bytes:
        raise CodecError("too_large", f"message of {nbytes} bytes > cap {limits.max_message_bytes}")
    msg = _unpack(data, nbytes)
    if not isinstance(msg, dict):
        raise CodecError("bad_type", f"message must be a map, got {type(msg).__name__}")
    # The version is checked first: a future version may change every other field.
    v = msg.get("v")
    if not _is_int(v):
        raise CodecError("bad_field" if v is None else "bad_type", "field 'v' must be an int")
    if v != PROTOCOL_VERSION:
        raise CodecError("bad_version", f"protocol version {v} not supported (expected {PROTOCOL_VERSION})")
    if "chunk" in msg:
        raise CodecError("bad_field", "this is a chunk frame: reassemble it before decoding")
    missing = [f for f in _FIELDS if f not in msg]
    if missing:
        raise CodecError("bad_field", f"missing fields {missing}")
    kind, mid, src, dst, run = msg["kind"], msg["id"], msg["src"], msg["dst"], msg["run"]
    rnd, seq, ts, body = msg["round"], msg["seq"], msg["ts"], msg["body"]
    for fname, value in (("kind", kind), ("src", src), ("dst", dst), ("run", run)):
        if not isinstance(value, str):
            raise CodecError("bad_type", f"field {fname!r} must be a string, got {type(value).__name__}")
    if kind not in BINARY_KINDS:
        raise CodecError("unknown_kind", f"kind {kind!r} is not a binary kind")
    if not isinstance(mid, bytes):
        raise CodecError("bad_type", "field 'id' must be binary")
    if len(mid) != ID_BYTES:
        raise CodecError("bad_field", f"field 'id' must be {ID_BYTES} bytes, got {len(mid)}")
    try:
        validate_id(src)
        validate_id(dst)
    except TopicError as exc:
        raise CodecError("bad_field", str(exc)) from None
    for fname, value in (("round", rnd), ("seq", seq)):
        if not _is_int(value):
            raise CodecError("bad_type", f"field {fname!r} must be an int, got {type(value).__name__}")
    if not (isinstance(ts, float) or _is_int(ts)):
        raise CodecError("bad_type", f"field 'ts' must be a number, got {type(ts).__name__}")
    if not isinstance(body, dict):
        raise CodecError("bad_type", f"field 'body' must be a map, got {type(body).__name__}")
    if not all(isinstance(k, str) for k in body):
        raise CodecError("bad_type", "body keys must be strings")
    tensors = _decode_tensors(kind, msg["tensors"], limits)
    return Envelope(
        kind=kind,
        src=src,
        dst=dst,
        body=body,
        tensors=tensors,
        run=run,
        round=rnd,
        seq=seq,
        id=mid,
        ts=float(ts),
        v=v,
    )


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Parse and validate a binary message. Raises only CodecError, whatever the input."""
    try:
        return _decode(data, limits)
    except CodecError:
        raise
    except Exception as exc:  # a validation gap must drop the message, never crash the agent loop
        raise CodecError("malformed", f"undecodable message: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------------- JSON


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def encode_json(obj: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON. NaN and Inf raise ValueError: they are not JSON and break other consumers."""
    return json.dumps(
        obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    ).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse a JSON message whose top level must be an object. Raises only CodecError."""
    try:
        raw = bytes(data)
    except Exception as exc:
        raise CodecError("bad_type", f"JSON payload must be bytes: {exc}") from None
    if len(raw) > limits.max_json_bytes:
        raise CodecError("too_large", f"JSON message of {len(raw)} bytes > cap {limits.max_json_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError("malformed", f"JSON message is not UTF-8: {exc}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except Exception as exc:  # includes RecursionError from deeply nested input
        raise CodecError("malformed", f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CodecError("bad_type", f"JSON message must be an object, got {type(obj).__name__}")
    return obj
