"""Robust aggregation rules over per-client deltas (docs/algorithms.md, "Server strategies"): pure maths.

Each rule takes the round's client deltas (``name -> array``, same keys) and returns one delta. They need every
client's own delta, so edges forward deltas instead of their mean when a robust strategy runs
(``Strategy.preaggregate``).

- coordinate-wise median and trimmed mean (Yin et al., arXiv 1803.01498): per coordinate, the median, or the
  mean after dropping the ``beta`` fraction of largest and of smallest values;
- Krum / multi-Krum (Blanchard et al., NeurIPS 2017): score each update by the sum of squared distances to its
  ``n - f - 2`` nearest others; keep the ``m`` lowest;
- norm clipping: ``delta * min(1, C / |delta|)``.

Sums in float64, results cast back to float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

State = dict[str, np.ndarray]


def stack(deltas: Sequence[State], key: str) -> np.ndarray:
    return np.stack([np.asarray(d[key], np.float64) for d in deltas])


def coordinate_median(deltas: Sequence[State]) -> State:
    return {k: np.median(stack(deltas, k), axis=0).astype(np.float32) for k in deltas[0]}


def trimmed_count(n: int, beta: float) -> int:
    """How many values are dropped at each end: floor(beta * n), leaving at least one."""
    return min(int(np.floor(beta * n)), (n - 1) // 2)


def trimmed_mean(deltas: Sequence[State], beta: float) -> State:
    b = trimmed_count(len(deltas), beta)
    out: State = {}
    for k in deltas[0]:
        s = np.sort(stack(deltas, k), axis=0)
        out[k] = s[b: len(deltas) - b].mean(axis=0).astype(np.float32)
    return out


def norm(delta: State) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in delta.values())))


def pairwise_sq_distances(deltas: Sequence[State]) -> np.ndarray:
    """n x n squared Euclidean distances over all keys, accumulated key by key (no n x D matrix at once)."""
    n = len(deltas)
    out = np.zeros((n, n))
    for k in deltas[0]:
        x = stack(deltas, k).reshape(n, -1)
        sq = np.sum(x * x, axis=1)
        out += np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(out, 0.0)
    return out


def krum_scores(deltas: Sequence[State], f: int) -> np.ndarray:
    """Each update's sum of squared distances to its n - f - 2 nearest others (at least one, when any)."""
    n = len(deltas)
    if n == 1:
        return np.zeros(1)
    d = pairwise_sq_distances(deltas)
    k = min(n - 1, max(1, n - f - 2))
    return np.array([np.sort(np.delete(d[i], i))[:k].sum() for i in range(n)])


def krum_select(deltas: Sequence[State], f: int, m: int) -> list[int]:
    """The indices of the ``m`` lowest Krum scores (ties by index), ascending by score."""
    scores = krum_scores(deltas, f)
    return sorted(range(len(deltas)), key=lambda i: (scores[i], i))[: max(1, min(m, len(deltas)))]


def clip(delta: State, c: float) -> tuple[State, float]:
    """``delta`` scaled to norm at most ``c`` (``c`` = inf: unchanged), and the factor applied."""
    n = norm(delta)
    factor = 1.0 if not np.isfinite(c) or n <= c else c / n
    if factor == 1.0:
        return dict(delta), 1.0
    return {k: (np.asarray(v, np.float64) * factor).astype(np.float32) for k, v in delta.items()}, factor
