"""Client sampling: which of the available devices train a round (McMahan et al.'s fraction C of clients).

Seeded by the run's seed, the round and its attempt alone, so a run replays the same choices, a retried round
draws afresh, and the choice is a pure function of the candidates (sorted first: the order in which statuses
arrived does not matter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def sample_size(n: int, *, fraction: float = 1.0, size: int = 0) -> int:
    """How many of ``n`` candidates train: ``size`` when > 0, else ceil(fraction x n); at least one."""
    if n <= 0:
        return 0
    k = size if size > 0 else math.ceil(fraction * n - 1e-9)
    return max(1, min(n, k))


def sample_clients(candidates: Iterable[str], *, fraction: float = 1.0, size: int = 0, seed: int = 0,
                   round: int = 0, attempt: int = 0) -> list[str]:
    """A uniformly random subset of ``candidates`` of :func:`sample_size`, sorted."""
    pool = sorted(set(candidates))
    k = sample_size(len(pool), fraction=fraction, size=size)
    if k >= len(pool):
        return pool
    picked = np.random.default_rng([seed, round, attempt]).choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in picked)
