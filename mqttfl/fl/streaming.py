"""Streaming aggregation: FedAvg's weighted mean accumulated one update at a time, in the memory of one model.

An edge with thousands of devices, or a cloud with many edges, need not hold every update until the round
closes when the rule is linear in the updates (``Strategy.preaggregate``: FedAvg, FedProx, the server
optimisers): each update is folded into a running float64 sum as it arrives and then dropped. The result is
``weighted_average`` of the same updates added in the same order, bit for bit (the same float64 sums, divided and
rounded once at the end); updates arriving in another order differ at most in the float32 result's last place.
Robust rules (median, Krum, ...) need every update itself and do not stream (docs/design.md, "Cloud").

FedLAMA's discrepancy needs, per layer, ``sum_i w_i |delta_i|^2``; :class:`RunningMean` keeps those sums too when
asked (``sqnorms``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mqttfl.fl.aggregate import AggregationError, State, cast_like


class RunningMean:
    """``sum_i w_i x_i / sum_i w_i`` over the states added so far; see the module docstring."""

    def __init__(self, *, sqnorms: bool = False) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._like: dict[str, np.ndarray] = {}  # per key an empty array of the result's dtype
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.weight = 0.0
        self.count = 0  # states added, with weight 0 or not
        self._sqnorms: dict[str, float] | None = {} if sqnorms else None

    def __len__(self) -> int:
        return self.count

    def add(self, state: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold ``state`` in with ``weight``; a state that does not fit the first one is refused before anything
        of it is added (``AggregationError``)."""
        w = float(weight)
        if not np.isfinite(w) or w < 0:
            raise AggregationError(f"update {self.count} has weight {w}; weights must be finite and >= 0")
        if self.count:
            if state.keys() != self._shapes.keys():
                key = sorted(state.keys() ^ self._shapes.keys())[0]
                raise AggregationError(f"state {self.count}: key {key!r} is "
                                       f"{'unexpected' if key in state else 'missing'}")
            for key, shape in self._shapes.items():
                a = state[key]
                if a.shape != shape or a.dtype != self._like[key].dtype:
                    raise AggregationError(f"state {self.count}: key {key!r} has {a.dtype}{a.shape}, expected "
                                           f"{self._like[key].dtype}{shape}")
        else:
            self._shapes = {k: v.shape for k, v in state.items()}
            self._like = {k: np.empty(0, dtype=v.dtype) for k, v in state.items()}
            self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in state.items()}
        self.count += 1
        if not w:
            return
        for key, acc in self._sum.items():
            x = state[key].astype(np.float64)
            acc += w * x
            if self._sqnorms is not None:
                self._sqnorms[key] = self._sqnorms.get(key, 0.0) + w * float(np.sum(np.square(x)))
        self.weight += w

    def mean(self) -> State:
        if not self.count:
            raise AggregationError("nothing to aggregate")
        if self.weight <= 0:
            raise AggregationError("total weight is zero")
        return {k: cast_like(acc / self.weight, self._like[k]) for k, acc in self._sum.items()}

    def sqnorms(self) -> dict[str, float]:
        """Per key, ``sum_i w_i |x_i|^2`` (empty unless asked for at construction)."""
        return dict(self._sqnorms or {})
