"""Staleness functions s(t − τ) damping stale asynchronous updates (FedAsync, Xie et al., arXiv 1903.03934).

A function maps the staleness ``t − τ`` (how many global versions the update's base model is behind the
current model) to a factor in (0, 1]; the mixing weight is ``α_t = α · s(t − τ)``. Every function has
s(0) = 1, so a fresh update is mixed with the full ``α``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

StalenessFn = Callable[[int], float]


def _check(staleness: int) -> int:
    # A negative staleness means the client claims a base version the server has not produced yet: that is a
    # protocol error upstream, not something to damp.
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return int(staleness)


def constant() -> StalenessFn:
    """s ≡ 1: every update mixed with the full α, however stale (FedAsync's ``Const``)."""

    def s(staleness: int) -> float:
        _check(staleness)
        return 1.0

    return s


def polynomial(a: float = 0.5) -> StalenessFn:
    """s = (t − τ + 1)^(−a) (FedAsync's ``Poly``); a = 0.5 is also FedBuff's 1/√(1 + τ) (arXiv 2106.06639)."""
    if a < 0:
        raise ValueError(f"a must be >= 0, got {a}")

    def s(staleness: int) -> float:
        return float((_check(staleness) + 1) ** (-a))

    return s


def hinge(a: float = 10.0, b: int = 4) -> StalenessFn:
    """s = 1 while t − τ ≤ b, else 1 / (a·(t − τ − b) + 1) (FedAsync's ``Hinge``): tolerate b, then decay."""
    if a < 0 or b < 0:
        raise ValueError(f"a and b must be >= 0, got a={a}, b={b}")

    def s(staleness: int) -> float:
        st = _check(staleness)
        return 1.0 if st <= b else 1.0 / (a * (st - b) + 1.0)

    return s


_BY_NAME: dict[str, Callable[..., StalenessFn]] = {
    "constant": constant,
    "polynomial": polynomial,
    "hinge": hinge,
}


def by_name(name: str, **params: Any) -> StalenessFn:
    """The staleness function called ``name`` (``constant``, ``polynomial``, ``hinge``), for config files."""
    try:
        factory = _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown staleness function {name!r}; known: {sorted(_BY_NAME)}") from None
    return factory(**params)
