"""Tensor compression maths (docs/algorithms.md, "Compression"): fp16, stochastic int8, sparse coordinates,
and top-k selection with error feedback.

Pure functions over numpy arrays; the wire encodings (``mqttfl.wire.encoding``) are built from them, and the
device's error-feedback memory (:class:`TopK`) lives in the device's protocol machine, which persists it.

- int8 with stochastic rounding: ``s = max|x| / 127``, ``q = clamp(floor(x / s + u), -127, 127)``,
  ``u ~ U[0, 1)``: unbiased, ``|q s - x| <= s``. One scale per tensor, or one per channel (index of axis 1).
- fp16: a cast; a tensor beyond float16's range stays float32 rather than turning into infinity.
- sparse coordinates: the non-zero entries of a tensor as ``(idx, val)``; lossless.
- top-k with error feedback (Stich et al., arXiv 1809.07599): ``p = e + delta``, keep the ``ratio`` largest
  magnitudes of ``p``, ``e <- p - kept``. What is not sent now is sent later: ``sum(sent) + e = sum(delta)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

State = dict[str, np.ndarray]

FP16_MAX = float(np.finfo(np.float16).max)


class CompressionError(ValueError):
    """Input that cannot be encoded, or wire tensors that do not decode under the stated encoding."""


def _require_finite(name: str, x: np.ndarray) -> None:
    if x.size and not (math.isfinite(float(np.min(x))) and math.isfinite(float(np.max(x)))):
        raise CompressionError(f"{name!r} holds non-finite values")


# ------------------------------------------------------------------------------------------------ int8


def _scale_shape(x: np.ndarray, per_channel: bool) -> tuple[int, ...]:
    """The shape of the scales: () per tensor; per channel, one per index of axis 1, broadcastable to x.

    [choice] Axis 1 is the channel of batch-first tensors (activations and gradients ``[N, C, ...]``) and the
    input axis of weights (``[out, in, ...]``): one rule, whatever the message kind. 0-D and 1-D tensors get
    one scale."""
    if not per_channel or x.ndim < 2:
        return ()
    return tuple(x.shape[1] if i == 1 else 1 for i in range(x.ndim))


def quantize_int8(x: np.ndarray, rng: np.random.Generator, *, per_channel: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(q, s) with q int8 of x's shape and s float32 scales (shape ``()`` or broadcastable per channel)."""
    x64 = np.asarray(x, dtype=np.float64)
    _require_finite("x", x64)
    shape = _scale_shape(x64, per_channel)
    if shape:
        axes = tuple(i for i in range(x64.ndim) if i != 1)
        peak = np.max(np.abs(x64), axis=axes, keepdims=True) if x64.size else np.zeros(shape)
    else:
        peak = np.asarray(float(np.max(np.abs(x64))) if x64.size else 0.0)
    # Quantise against the float32 scale the receiver sees, rounded up so that |x| / s never exceeds 127 and
    # the clamp adds no error beyond s.
    s32 = (peak / 127.0).astype(np.float32)
    low = s32.astype(np.float64) * 127.0 < peak
    s32 = np.where(low, np.nextafter(s32, np.float32(np.inf)), s32).astype(np.float32)
    safe = np.where(s32 > 0, s32.astype(np.float64), 1.0)
    u = rng.random(x64.shape)
    q = np.clip(np.floor(x64 / safe + u), -127, 127)
    q = np.where(s32 > 0, q, 0).astype(np.int8)
    return q, np.asarray(s32, dtype=np.float32).reshape(shape)


def dequantize_int8(q: np.ndarray, s: np.ndarray | float) -> np.ndarray:
    return (np.asarray(q, dtype=np.float32) * np.asarray(s, dtype=np.float32)).astype(np.float32)


def check_int8(name: str, q: np.ndarray, s: np.ndarray) -> None:
    """Refuse wire tensors that are not an int8 body with finite, non-negative, broadcastable scales."""
    if q.dtype != np.int8 or s.dtype != np.float32:
        raise CompressionError(f"{name!r}: want int8 .q and float32 .s, got {q.dtype} and {s.dtype}")
    if s.ndim not in (0, q.ndim) or (s.ndim and any(a not in (1, b) for a, b in zip(s.shape, q.shape, strict=True))):
        raise CompressionError(f"{name!r}: scales {s.shape} do not fit {q.shape}")
    if s.size and (not np.all(np.isfinite(s)) or float(np.min(s)) < 0):
        raise CompressionError(f"{name!r}: scales must be finite and >= 0")


# ------------------------------------------------------------------------------------------------ fp16


def to_fp16(x: np.ndarray) -> np.ndarray:
    """x as float16, or unchanged when it exceeds float16's range (the cast would make it infinite)."""
    if x.size and float(np.max(np.abs(x))) > FP16_MAX:
        return x
    return x.astype(np.float16)


# ------------------------------------------------------------------------------------------------ sparse


def sparse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(idx, val): the flat indices (int32, ascending) and float32 values of x's non-zero entries."""
    flat = np.asarray(x).ravel()
    idx = np.flatnonzero(flat).astype(np.int32)
    return idx, flat[idx].astype(np.float32)


def dense(idx: np.ndarray, val: np.ndarray, shape: tuple[int, ...], name: str = "") -> np.ndarray:
    """The inverse of :func:`sparse`; refuses out-of-range, repeated or mismatched coordinates."""
    if idx.dtype != np.int32 or val.dtype != np.float32 or idx.ndim != 1 or val.shape != idx.shape:
        raise CompressionError(f"{name!r}: want int32 .idx and float32 .val of one length")
    size = math.prod(shape)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size or np.any(np.diff(idx) <= 0)):
        raise CompressionError(f"{name!r}: indices out of range, repeated or unsorted")
    out = np.zeros(size, dtype=np.float32)
    out[idx] = val
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------------ top-k


class TopK:
    """Top-k selection with error feedback; see the module docstring.

    :meth:`select` returns a dense float32 state that is zero except at the kept coordinates (the sparse
    wire encoding sends only those) and updates the residual, per key. The residual is float64, so the
    float32 rounding of the kept values is fed back too. It belongs to the sender and is part of its persisted
    state (:meth:`residual`, :meth:`load_residual`)."""

    def __init__(self, ratio: float, residual: Mapping[str, np.ndarray] | None = None) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self._residual: dict[str, np.ndarray] = {}
        if residual:
            self.load_residual(residual)

    def k_for(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.ratio * size)))

    def select(self, delta: Mapping[str, np.ndarray]) -> State:
        out: State = {}
        for name, d in delta.items():
            d64 = np.asarray(d, dtype=np.float64)
            _require_finite(name, d64)
            e = self._residual.get(name)
            if e is not None and e.shape != d64.shape:
                e = None  # the model changed shape under this name: old memory means nothing for the new one
            p = (d64 if e is None else e + d64).ravel()
            kept = np.zeros(p.size, dtype=np.float32)
            if p.size:
                k = self.k_for(p.size)
                idx = np.argpartition(np.abs(p), p.size - k)[p.size - k:]
                kept[idx] = p[idx].astype(np.float32)
            self._residual[name] = (p - kept.astype(np.float64)).reshape(d64.shape)
            out[name] = kept.reshape(d64.shape)
        return out

    def residual(self) -> State:
        """A copy of the error-feedback memory, key by key."""
        return {k: v.copy() for k, v in self._residual.items()}

    def load_residual(self, residual: Mapping[str, np.ndarray]) -> None:
        loaded = {k: np.asarray(v, dtype=np.float64).copy() for k, v in residual.items()}
        for k, v in loaded.items():
            _require_finite(k, v)
        self._residual = loaded
