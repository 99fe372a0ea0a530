"""Update compression on the wire (ALGORITHMS §8): fp16, stochastic int8, top-k with error feedback.

Encoders turn a state (``name -> array``) into the ``tensors`` dict of an envelope; decoders take such a dict
back to float32 arrays. The scheme name travels in the envelope body, never inferred from tensor names, so a
parameter that happens to be called ``...q`` cannot be mistaken for a quantised one. Wire names:

- ``"none"``: ``name`` unchanged.
- ``"fp16"``: ``name`` as float16.
- ``"int8"``: ``name.q`` (int8, the tensor's shape) and ``name.s`` (float32 scalar scale).
- ``"topk"``: ``name.idx`` (int64 flat indices, ascending), ``name.val`` (float32), ``name.shape`` (int64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

__all__ = [
    "CompressionError",
    "SCHEMES",
    "Scheme",
    "TopK",
    "decode",
    "decode_fp16",
    "decode_int8",
    "decode_topk",
    "dequantize_int8",
    "encode",
    "encode_fp16",
    "encode_int8",
    "quantize_int8",
]

State = dict[str, np.ndarray]
Scheme = Literal["none", "fp16", "int8", "topk"]
SCHEMES: tuple[str, ...] = ("none", "fp16", "int8", "topk")

_FP16_MAX = float(np.finfo(np.float16).max)


class CompressionError(ValueError):
    """Input that cannot be encoded, or wire tensors that do not decode under the stated scheme."""


def _require_finite(name: str, x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)):
        raise CompressionError(f"{name!r} holds non-finite values")


def _group(tensors: Mapping[str, np.ndarray], suffixes: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """Group wire tensors ``base + suffix`` by base name, insisting that every base has every suffix."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for wire_name, arr in tensors.items():
        for suffix in suffixes:
            if wire_name.endswith(suffix) and len(wire_name) > len(suffix):
                groups.setdefault(wire_name[: -len(suffix)], {})[suffix] = np.asarray(arr)
                break
        else:
            raise CompressionError(f"tensor {wire_name!r} has none of the suffixes {suffixes}")
    for name, parts in groups.items():
        missing = [s for s in suffixes if s not in parts]
        if missing:
            raise CompressionError(f"{name!r} lacks {missing}")
    return groups


# ----------------------------------------------------------------------------------------------------------
# int8 with stochastic rounding


def quantize_int8(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.float32]:
    """q = clamp(floor(x/s + u), -127, 127), u ~ U[0, 1), s = max|x| / 127: unbiased, |q*s - x| <= s."""
    x = np.asarray(x, dtype=np.float64)
    _require_finite("x", x)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        return np.zeros(x.shape, dtype=np.int8), np.float32(0.0)
    # Quantise against the float32 scale the receiver will see, rounded up so that |x|/s never exceeds 127
    # and the clamp never adds error beyond s.
    s32 = np.float32(peak / 127.0)
    if float(s32) * 127.0 < peak:
        s32 = np.nextafter(s32, np.float32(np.inf))
    u = rng.random(x.shape)
    q = np.clip(np.floor(x / float(s32) + u), -127, 127).astype(np.int8)
    return q, s32


def dequantize_int8(q: np.ndarray, s: float | np.ndarray) -> np.ndarray:
    return (np.asarray(q, dtype=np.float32) * np.float32(s)).astype(np.float32)


def encode_int8(state: Mapping[str, np.ndarray], rng: np.random.Generator) -> State:
    out: State = {}
    for name, x in state.items():
        q, s = quantize_int8(x, rng)
        out[name + ".q"] = q
        out[name + ".s"] = np.asarray(s, dtype=np.float32)
    return out


def decode_int8(tensors: Mapping[str, np.ndarray]) -> State:
    out: State = {}
    for name, parts in _group(tensors, (".q", ".s")).items():
        q, s = parts[".q"], parts[".s"]
        if q.dtype != np.int8 or s.dtype != np.float32 or s.size != 1:
            raise CompressionError(
                f"{name!r}: want int8 .q and one float32 .s, got {q.dtype}, {s.dtype}{s.shape}"
            )
        scale = float(s.reshape(()))
        if not math.isfinite(scale) or scale < 0:
            raise CompressionError(f"{name!r}: bad scale {scale}")
        out[name] = dequantize_int8(q, scale)
    return out


# ----------------------------------------------------------------------------------------------------------
# fp16


def encode_fp16(state: Mapping[str, np.ndarray]) -> State:
    out: State = {}
    for name, x in state.items():
        x = np.asarray(x)
        _require_finite(name, x)
        # Refuse rather than let the cast turn large values into inf, which the receiver would drop anyway.
        if x.size and float(np.max(np.abs(x))) > _FP16_MAX:
            raise CompressionError(f"{name!r} exceeds the float16 range ({_FP16_MAX})")
        out[name] = x.astype(np.float16)
    return out


def decode_fp16(tensors: Mapping[str, np.ndarray]) -> State:
    out: State = {}
    for name, x in tensors.items():
        if x.dtype != np.float16:
            raise CompressionError(f"{name!r}: want float16, got {x.dtype}")
        out[name] = x.astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------
# top-k with error feedback


class TopK:
    """Top-k sparsification with error feedback (Stich et al., arXiv 1809.07599).

    Per key: p = e + delta, send the ``ratio`` largest-magnitude entries of p, keep e <- p - sent. What is not
    sent now is sent later, so sum(sent) + e equals sum(delta) over any number of steps. The residual lives on
    the sender and belongs in its checkpoint (``residual``/``load_residual``) when it migrates.
    """

    def __init__(self, ratio: float) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        # float64 so that the float32 rounding of sent values is itself fed back, not lost.
        self._residual: dict[str, np.ndarray] = {}

    def k_for(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.ratio * size)))

    def encode(self, delta: Mapping[str, np.ndarray]) -> State:
        out: State = {}
        for name, d in delta.items():
            d = np.asarray(d, dtype=np.float64)
            _require_finite(name, d)
            e = self._residual.get(name)
            if e is not None and e.shape != d.shape:
                raise CompressionError(f"{name!r}: shape {d.shape} differs from its residual's {e.shape}")
            p = (d if e is None else e + d).ravel()
            idx = np.zeros(0, dtype=np.int64)
            if p.size:
                k = self.k_for(p.size)
                idx = np.sort(np.argpartition(np.abs(p), p.size - k)[p.size - k :]).astype(np.int64)
            val = p[idx].astype(np.float32)
            residual = p.copy()
            residual[idx] -= val.astype(np.float64)
            self._residual[name] = residual.reshape(d.shape)
            out[name + ".idx"] = idx
            out[name + ".val"] = val
            out[name + ".shape"] = np.asarray(d.shape, dtype=np.int64)
        return out

    def residual(self) -> State:
        """A copy of the error-feedback memory, key by key."""
        return {k: v.copy() for k, v in self._residual.items()}

    def load_residual(self, residual: Mapping[str, np.ndarray]) -> None:
        self._residual = {k: np.asarray(v, dtype=np.float64).copy() for k, v in residual.items()}


def decode_topk(tensors: Mapping[str, np.ndarray]) -> State:
    """Dense float32 arrays, zero wherever no value was sent."""
    out: State = {}
    for name, parts in _group(tensors, (".idx", ".val", ".shape")).items():
        idx, val, shape = parts[".idx"], parts[".val"], parts[".shape"]
        if idx.dtype != np.int64 or val.dtype != np.float32 or shape.dtype != np.int64:
            raise CompressionError(f"{name!r}: want int64 .idx, float32 .val, int64 .shape")
        if idx.ndim != 1 or val.shape != idx.shape or shape.ndim != 1 or np.any(shape < 0):
            raise CompressionError(f"{name!r}: inconsistent .idx{idx.shape}, .val{val.shape}, .shape{shape}")
        size = int(np.prod(shape))
        if idx.size and (idx.min() < 0 or idx.max() >= size or np.unique(idx).size != idx.size):
            raise CompressionError(f"{name!r}: indices out of range or repeated")
        dense = np.zeros(size, dtype=np.float32)
        dense[idx] = val
        out[name] = dense.reshape(tuple(int(n) for n in shape))
    return out


# ----------------------------------------------------------------------------------------------------------
# Dispatch by scheme name


def encode(
    state: Mapping[str, np.ndarray],
    scheme: str,
    *,
    rng: np.random.Generator | None = None,
    topk: TopK | None = None,
) -> State:
    """Encode ``state`` under ``scheme``; int8 needs ``rng``, topk needs the sender's ``TopK``."""
    if scheme == "none":
        return {k: np.asarray(v) for k, v in state.items()}
    if scheme == "fp16":
        return encode_fp16(state)
    if scheme == "int8":
        if rng is None:
            raise ValueError("int8 encoding needs an rng")
        return encode_int8(state, rng)
    if scheme == "topk":
        if topk is None:
            raise ValueError("topk encoding needs a TopK holding the residuals")
        return topk.encode(state)
    raise CompressionError(f"unknown compression scheme {scheme!r}; known: {SCHEMES}")


def decode(tensors: Mapping[str, np.ndarray], scheme: str) -> State:
    """Inverse of ``encode``; floating results are float32."""
    if scheme == "none":
        return {k: np.asarray(v) for k, v in tensors.items()}
    if scheme == "fp16":
        return decode_fp16(tensors)
    if scheme == "int8":
        return decode_int8(tensors)
    if scheme == "topk":
        return decode_topk(tensors)
    raise CompressionError(f"unknown compression scheme {scheme!r}; known: {SCHEMES}")
