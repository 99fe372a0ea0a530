"""Central differential privacy for FedAvg (DP-FedAvg, McMahan et al., arXiv 1710.06963) and its accountant.

The mechanism, per round: clip every client's delta to norm ``C``, sum, add Gaussian noise ``N(0, (sigma C)^2)``
per coordinate, divide by the round's *expected* number of clients ``m`` (fixed before anyone reports, so the
divisor reveals nothing). With ``sigma = 0`` and ``C = inf`` this is the plain mean of the clients' deltas.

The accountant is Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar and Zhang, arXiv 1908.10530),
for integer orders alpha >= 2 in closed form (their Section 3.3):

    A_alpha = sum_{k=0..alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))
    rdp(alpha) = log(A_alpha) / (alpha - 1)                       (q = 1: alpha / (2 sigma^2))

summed over rounds, and converted to (epsilon, delta) with the tighter conversion of Balle et al.
(arXiv 1905.09982, Theorem 21; the one Opacus and Google's dp-accounting use):

    epsilon = min_alpha rdp(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)

Why not a library: Opacus needs torch on the cloud's machinery path and Google's dp-accounting brings its own
dependency tree, for about forty lines of well-known formulas; these are computed here and checked in the
tests against numerical integration of the mechanism's Renyi divergence. Integer orders only: the bound is
slightly looser than with fractional orders, never optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 192, 256, 384, 512)


def _logsumexp(xs: Sequence[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs)) if math.isfinite(top) else top


def rdp_sampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """Renyi DP of order ``alpha`` of one round: sampling rate ``q``, noise multiplier ``sigma``."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], got {q}")
    if q == 0.0:
        return 0.0
    if sigma <= 0.0:
        return math.inf
    if q == 1.0:
        return alpha / (2.0 * sigma**2)
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1) + k * math.log(q)
             + (alpha - k) * math.log1p(-q) + (k * k - k) / (2.0 * sigma**2) for k in range(alpha + 1)]
    return max(0.0, _logsumexp(terms) / (alpha - 1))


def epsilon(rdp: Sequence[float], delta: float, orders: Sequence[int] = ORDERS) -> tuple[float, int]:
    """(epsilon, the best order) for accumulated RDP values at ``orders``."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    best, best_order = math.inf, orders[0]
    for r, a in zip(rdp, orders, strict=True):
        if not math.isfinite(r):
            continue
        eps = r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best:
            best, best_order = eps, a
    return max(0.0, best), best_order


class Accountant:
    """RDP accumulated over rounds (each with its own sampling rate), reported as (epsilon, delta)."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.rdp = np.zeros(len(ORDERS))
        self.rounds = 0

    def step(self, q: float, sigma: float) -> None:
        self.rdp = self.rdp + np.array([rdp_sampled_gaussian(q, sigma, a) for a in ORDERS])
        self.rounds += 1

    def spent(self) -> float:
        return epsilon(list(self.rdp), self.delta)[0] if self.rounds else 0.0


def gaussian_sum(clipped: Sequence[dict[str, np.ndarray]], c: float, sigma: float, expected: int,
                 rng: np.random.Generator, noised: frozenset[str] | None = None) -> dict[str, np.ndarray]:
    """(sum of the clipped deltas + N(0, (sigma c)^2) on the ``noised`` keys) / ``expected``."""
    out: dict[str, np.ndarray] = {}
    for k in clipped[0]:
        acc = sum(np.asarray(d[k], np.float64) for d in clipped)
        if sigma > 0 and (noised is None or k in noised):
            acc = acc + rng.normal(0.0, sigma * c, size=np.shape(acc))
        out[k] = (np.asarray(acc) / expected).astype(np.float32)
    return out
