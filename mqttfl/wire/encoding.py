"""Tensor encodings: how a message's tensors look on the wire (docs/design.md, "Wire format").

A sender may encode the float32 tensors of a message (fewer bytes on a device's link) and names the encoding in
the message body (``enc``); the receiver decodes before the message is parsed and validated, so machines only
ever see float32 tensors. The encoding is chosen per message by whoever builds it (a ``Send`` effect names it),
so it differs per kind and per device (``act_encoding``, ``grad_encoding``, ``delta_encoding`` and
``model_encoding`` in the plan, overridable per device). Non-float tensors (labels) always travel unchanged.

| name | wire tensors per float tensor ``t`` | loss |
|---|---|---|
| ``none`` | ``t`` | none |
| ``fp16`` | ``t`` as float16 (float32 when beyond float16's range) | relative 2^-11 |
| ``int8`` | ``t.q`` int8 and ``t.s`` one float32 scale, stochastic rounding | unbiased, at most ``s`` |
| ``int8c`` | the same with one scale per channel (index of axis 1) | unbiased, at most the channel's ``s`` |
| ``topk`` | ``t.idx`` int32 and ``t.val`` float32 of the non-zero entries, ``t.shape``; or ``t`` when denser | none |

``topk`` is lossless on its own: the device picks the top-k coordinates with error feedback
(``mqttfl.wire.compress.TopK``, in the device's machine) and the encoding sends only the non-zero entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from mqttfl.wire.codec import CodecError
from mqttfl.wire.compress import CompressionError, check_int8, dense, dequantize_int8, quantize_int8, sparse, to_fp16

IDENTITY = "none"


class Encoding(Protocol):
    name: str

    def encode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def decode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _is_float(a: np.ndarray) -> bool:
    return np.asarray(a).dtype.kind == "f"


def _split(tensors: Mapping[str, np.ndarray], suffixes: tuple[str, ...]
           ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Wire tensors grouped by base name for the given suffixes (every suffix required), and the rest."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    plain: dict[str, np.ndarray] = {}
    for wire_name, arr in tensors.items():
        for suffix in suffixes:
            if wire_name.endswith(suffix) and len(wire_name) > len(suffix):
                groups.setdefault(wire_name[: -len(suffix)], {})[suffix] = np.asarray(arr)
                break
        else:
            plain[wire_name] = np.asarray(arr)
    for name, parts in groups.items():
        missing = [s for s in suffixes if s not in parts]
        if missing:
            raise CompressionError(f"{name!r} lacks {missing}")
        if name in plain:
            raise CompressionError(f"{name!r} travels both plain and encoded")
    return groups, plain


class Identity:
    name = IDENTITY

    def encode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(tensors)

    def decode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(tensors)


class Fp16:
    name = "fp16"

    def encode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: to_fp16(np.asarray(v)) if _is_float(v) else v for k, v in tensors.items()}

    def decode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.float32) if _is_float(v) else v for k, v in tensors.items()}


class Int8:
    """Stochastic int8 (unbiased). ``rng`` draws the rounding noise; :func:`seed` makes it reproducible."""

    def __init__(self, name: str, *, per_channel: bool) -> None:
        self.name = name
        self.per_channel = per_channel
        self.rng = np.random.default_rng()

    def encode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k, v in tensors.items():
            if not _is_float(v):
                out[k] = v
                continue
            q, s = quantize_int8(np.asarray(v), self.rng, per_channel=self.per_channel)
            out[k + ".q"], out[k + ".s"] = q, s
        return out

    def decode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups, plain = _split(tensors, (".q", ".s"))
        if any(_is_float(v) for v in plain.values()):
            raise CompressionError(f"float tensors {[k for k, v in plain.items() if _is_float(v)]} not encoded")
        out = dict(plain)
        for name, parts in groups.items():
            check_int8(name, parts[".q"], parts[".s"])
            out[name] = dequantize_int8(parts[".q"], parts[".s"])
        return out


class Sparse:
    """Non-zero coordinates only (``topk``): lossless; a tensor with more non-zeros than the coordinates save
    travels dense."""

    name = "topk"

    def encode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k, v in tensors.items():
            arr = np.asarray(v)
            if not _is_float(arr):
                out[k] = v
                continue
            idx, val = sparse(arr)
            if idx.nbytes + val.nbytes + 8 * (arr.ndim + 1) >= arr.astype(np.float32).nbytes:
                out[k] = arr
                continue
            out[k + ".idx"], out[k + ".val"] = idx, val
            out[k + ".shape"] = np.asarray(arr.shape, dtype=np.int64)
        return out

    def decode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups, plain = _split(tensors, (".idx", ".val", ".shape"))
        out = dict(plain)
        for name, parts in groups.items():
            shape = parts[".shape"]
            if shape.dtype != np.int64 or shape.ndim != 1 or shape.size > 8 or np.any(shape < 0):
                raise CompressionError(f"{name!r}: bad .shape {shape}")
            dims = tuple(int(n) for n in shape)
            if math.prod(dims) > 1 << 31:
                raise CompressionError(f"{name!r}: shape {dims} too large")
            out[name] = dense(parts[".idx"], parts[".val"], dims, name)
        return out


ENCODINGS: dict[str, Encoding] = {e.name: e for e in (Identity(), Fp16(), Int8("int8", per_channel=False),
                                                      Int8("int8c", per_channel=True), Sparse())}

# What each message kind may use (checked where a plan or a device config names one): quantising activations
# and gradients is fine, dropping their coordinates is not; a model download may only lose precision.
ALLOWED: dict[str, tuple[str, ...]] = {
    "act": ("none", "fp16", "int8", "int8c"),
    "grad": ("none", "fp16", "int8", "int8c"),
    "delta": ("none", "fp16", "int8", "int8c", "topk"),
    "model": ("none", "fp16"),
}


def seed(value: int) -> None:
    """Make stochastic rounding reproducible (in-memory fleets and tests); agents draw from the OS."""
    for i, enc in enumerate(ENCODINGS.values()):
        if isinstance(enc, Int8):
            enc.rng = np.random.default_rng([value, i])


def tensor_bytes(tensors: Mapping[str, Any]) -> int:
    return sum(int(np.asarray(v).nbytes) for v in tensors.values())


def encoded_bytes(name: str, tensors: Iterable[np.ndarray]) -> int:
    """The bytes ``tensors`` take on the wire under encoding ``name``, without encoding them (no rounding noise is
    drawn): what a sender counts for a message it has yet to send."""
    total = 0
    for v in tensors:
        arr = np.asarray(v)
        if not _is_float(arr) or name == IDENTITY:
            total += arr.astype(np.float32).nbytes if _is_float(arr) else arr.nbytes
        elif name == "fp16":
            total += 2 * arr.size
        elif name in ("int8", "int8c"):
            total += arr.size + 4 * (arr.shape[1] if name == "int8c" and arr.ndim > 1 else 1)
        else:  # topk: the non-zero entries, or the dense tensor when that is smaller
            total += min(8 * int(np.count_nonzero(arr)) + 8 * (arr.ndim + 1), 4 * arr.size)
    return total


def encode_tensors(name: str, body: dict[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encode ``tensors`` with the encoding ``name``, recording it in ``body`` (nothing for the identity)."""
    enc = ENCODINGS.get(name)
    if enc is None:
        raise ValueError(f"unknown tensor encoding {name!r}; known: {sorted(ENCODINGS)}")
    if name != IDENTITY:
        body["enc"] = name
    return enc.encode(tensors)


def decode_tensors(body: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a received message as the sender had them before encoding; CodecError when the message
    names an encoding this node does not know or its tensors do not decode under it."""
    name = body.get("enc", IDENTITY)
    enc = ENCODINGS.get(name) if isinstance(name, str) else None
    if enc is None:
        raise CodecError("bad_encoding", f"unknown tensor encoding {name!r}")
    try:
        return enc.decode(tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise CodecError("bad_encoding", f"tensors do not decode as {name!r}: {e}") from None
