"""Aggregation maths over model states (``name -> array``), with no I/O, clock or threads.

Edges and the cloud run the same functions: an edge averages its devices weighted by samples and the cloud
averages the edges weighted by their total samples, which equals flat FedAvg over all devices (docs/design.md, "Round").
Sums are accumulated in float64 so that this two-level equality holds to float32 rounding, whatever the order
in which updates arrive. :func:`masked_average` generalises FedAvg to clients that trained only part of the model
(docs/algorithms.md, "Heterogeneous devices"). Floating entries keep their dtype; integer entries (BatchNorm's
``num_batches_tracked``) are averaged and rounded back to their integer dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "AggregationError",
    "State",
    "apply_delta",
    "cast_like",
    "check_compatible",
    "delta",
    "masked_average",
    "weighted_average",
]

State = dict[str, np.ndarray]


class AggregationError(ValueError):
    """Updates that cannot be combined: mismatched states, bad weights, nothing to aggregate."""


def _check_pair(ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], where: str,
                dtypes: bool = True) -> None:
    if ref.keys() != other.keys():
        missing = sorted(ref.keys() - other.keys())
        extra = sorted(other.keys() - ref.keys())
        key = missing[0] if missing else extra[0]
        raise AggregationError(f"{where}: key {key!r} is {'missing' if missing else 'unexpected'}")
    for key, a in ref.items():
        b = other[key]
        if a.shape != b.shape:
            raise AggregationError(f"{where}: key {key!r} has shape {b.shape}, expected {a.shape}")
        if dtypes and a.dtype != b.dtype:
            raise AggregationError(f"{where}: key {key!r} has dtype {b.dtype}, expected {a.dtype}")


def check_compatible(states: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Raise AggregationError naming the first key whose presence, shape or dtype differs from states[0]."""
    for i, state in enumerate(states[1:], start=1):
        _check_pair(states[0], state, f"state {i}")


def _check_weight(w: float, i: int) -> float:
    w = float(w)
    if not np.isfinite(w) or w < 0:
        raise AggregationError(f"update {i} has weight {w}; weights must be finite and >= 0")
    return w


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):
        return np.rint(value).astype(like.dtype)
    return value.astype(like.dtype)


def weighted_average(items: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> State:
    """FedAvg: sum_i w_i x_i / sum_i w_i for every key."""
    if not items:
        raise AggregationError("nothing to aggregate")
    states = [s for s, _ in items]
    check_compatible(states)
    weights = [_check_weight(w, i) for i, (_, w) in enumerate(items)]
    total = sum(weights)
    if total <= 0:
        raise AggregationError("total weight is zero")
    out: State = {}
    for key, ref in states[0].items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for state, w in zip(states, weights, strict=True):
            if w:
                acc += w * state[key].astype(np.float64)
        out[key] = cast_like(acc / total, ref)
    return out


def delta(new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> State:
    """new - base, key by key."""
    _check_pair(base, new, "delta")
    return {k: cast_like(new[k].astype(np.float64) - base[k].astype(np.float64), base[k]) for k in base}


def apply_delta(base: Mapping[str, np.ndarray], d: Mapping[str, np.ndarray], scale: float = 1.0) -> State:
    """base + scale * d, key by key (scale is the server learning rate, 1.0 for plain FedAvg).

    Computed in float64 and rounded once to the base's dtype, so base + 1 * d is bit-identical to the float32
    sum; ``d`` may be held in float64 (a running sum)."""
    _check_pair(base, d, "apply_delta", dtypes=False)
    return {
        k: cast_like(base[k].astype(np.float64) + scale * d[k].astype(np.float64), base[k]) for k in base
    }


def masked_average(
    items: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray] | None, float]],
    base: Mapping[str, np.ndarray],
) -> State:
    """Per-parameter average over the clients that trained it.

    w_j <- sum_i n_i m_ij w_ij / sum_i n_i m_ij, and w_j = base_j where no client covered j. Each item is
    (state, mask, n). A client's state may omit keys it did not train (a weak client's frozen input-side layers):
    those count as mask 0. ``mask`` None means the full model; a mask mapping without a key the state has means
    that key is full; a mask array must broadcast to its parameter (a per-output-channel mask, or a scalar
    share of the client's weight). With every mask full this is :func:`weighted_average`.
    """
    if not items:
        raise AggregationError("nothing to aggregate")
    weights = [_check_weight(n, i) for i, (_, _, n) in enumerate(items)]
    if sum(weights) <= 0:
        raise AggregationError("total weight is zero")
    for i, (state, mask, _) in enumerate(items):
        for key, value in state.items():
            if key not in base:
                raise AggregationError(f"client {i}: key {key!r} is not in the base model")
            if value.shape != base[key].shape:
                raise AggregationError(f"client {i}: key {key!r} has shape {value.shape}, expected {base[key].shape}")
        for key in mask or {}:
            if key not in base:
                raise AggregationError(f"client {i}: mask key {key!r} is not in the base model")

    out: State = {}
    for key, ref in base.items():
        num = np.zeros(ref.shape, dtype=np.float64)
        den = np.zeros(ref.shape, dtype=np.float64)
        for i, ((state, mask, _), n) in enumerate(zip(items, weights, strict=True)):
            if key not in state or n == 0:
                continue
            if mask is None or key not in mask:
                m = np.ones(ref.shape, dtype=np.float64)
            else:
                try:
                    m = np.broadcast_to(np.asarray(mask[key], dtype=np.float64), ref.shape)
                except ValueError as exc:
                    raise AggregationError(f"client {i}: mask for {key!r} of shape {np.shape(mask[key])} does not "
                                           f"fit {ref.shape}") from exc
                if not np.all(np.isfinite(m)) or np.any(m < 0):
                    raise AggregationError(f"client {i}: mask for {key!r} must be finite and >= 0")
            # np.where, not a product: a pruned position may hold anything (even NaN) and must add nothing.
            num += np.where(m > 0, n * m * state[key].astype(np.float64), 0.0)
            den += n * m
        covered = den > 0
        avg = np.divide(num, den, out=np.zeros_like(num), where=covered)
        out[key] = np.where(covered, cast_like(avg, ref), ref)
    return out
