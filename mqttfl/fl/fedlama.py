"""FedLAMA: layer-wise adaptive model aggregation intervals (Lee et al., arXiv 2110.10302).

Theory of operation. Clients run local SGD and average each parameter l every τ_l local steps, with
τ_l ∈ {τ′, φ·τ′}. Only the parameters ``due(step)`` travel, in both directions, which is where the traffic
saving comes from. Each time parameter l is averaged the server measures its discrepancy

    d_l = (1/m) · Σ_i ‖u_l − x_l^i‖² / (τ_l · dim_l)

(u_l the average, x_l^i client i's copy); the division by τ_l·dim_l makes layers of any size and interval
comparable. Every φ·τ′ steps (one *window*, after a warm-up) ``adjust`` resets every interval to τ′, sorts
the weight layers by d_l ascending and walks them, accumulating δ += d_l·dim_l / Σ_j d_j·dim_j (the share
of discrepancy given up) and λ += dim_l / Σ_j dim_j (the share of traffic saved); it relaxes each visited
layer to φ·τ′ and stops at the first layer where δ > 1 − λ, the paper's balance between accuracy lost and
traffic saved. The relaxed set is therefore always a prefix of the ascending order.

Biases and normalisation parameters always keep τ′ [paper]: they are small, so relaxing them saves little,
and they drift fast under non-IID data. The same active clients should train through a whole window [code];
that is the caller's schedule, not this class's.

Pure: ``step`` is a count of local steps handed in by the caller; there is no clock and no I/O. The cloud
measures d_l from its edges' sums (``mqttfl.protocol.cloud.layerwise``) and hands it to ``observe``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_FORMAT = 1
# Lets δ reach 1 − λ exactly at the last layer despite rounding in the running sums.
_EPS = 1e-12

IsWeight = Callable[[str, tuple[int, ...]], bool]


def default_is_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Weight layers are the parameters with two or more dimensions (linear, conv, embedding); biases and
    norm scales/shifts are 1-D."""
    return len(shape) >= 2


class FedLAMA:
    """The interval schedule of FedLAMA for one model; see the module docstring.

    Drive it as: ``for step in 1..: names = due(step)``; average those parameters, ``observe`` each one's
    discrepancy, then ``after_step(step)``, which re-plans the intervals at window boundaries.
    """

    def __init__(
        self,
        param_shapes: Mapping[str, Sequence[int]],
        is_weight: IsWeight = default_is_weight,
        tau: int = 10,
        phi: int = 2,
        *,
        warmup_windows: int = 1,
    ) -> None:
        if not param_shapes:
            raise ValueError("FedLAMA needs at least one parameter")
        if tau < 1 or phi < 1:
            raise ValueError(f"tau and phi must be >= 1, got tau={tau}, phi={phi}")
        if warmup_windows < 1:
            # The first re-plan needs every weight layer's discrepancy, measured during the first window.
            raise ValueError(f"warmup_windows must be >= 1, got {warmup_windows}")
        self.tau, self.phi, self.warmup_windows = tau, phi, warmup_windows
        self.shapes = {n: tuple(int(d) for d in s) for n, s in param_shapes.items()}
        self.dims = {n: int(np.prod(s, dtype=np.int64)) for n, s in self.shapes.items()}
        self.weight_layers = [n for n, s in self.shapes.items() if is_weight(n, s)]
        self.intervals = dict.fromkeys(self.shapes, tau)
        self.discrepancies: dict[str, float] = {}
        self.last_order: list[str] = []

    @property
    def window(self) -> int:
        """Local steps between two re-plans: φ·τ′, the longest interval, so every parameter is averaged at
        every window boundary and changing intervals there never skips an average."""
        return self.phi * self.tau

    def due(self, step: int) -> list[str]:
        """Parameters to average after local step ``step`` (counted from 1), in ``param_shapes`` order."""
        if step < 1:
            raise ValueError(f"steps are counted from 1, got {step}")
        return [n for n, t in self.intervals.items() if step % t == 0]

    def observe(self, name: str, d_l: float) -> None:
        """Record d_l measured when ``name`` was averaged; the latest value is what ``adjust`` sorts by."""
        if name not in self.shapes:
            raise KeyError(f"unknown parameter {name!r}")
        if not d_l >= 0:
            raise ValueError(f"{name}: discrepancy must be >= 0, got {d_l}")
        self.discrepancies[name] = float(d_l)

    def adjust_due(self, step: int) -> bool:
        return step >= self.warmup_windows * self.window and step % self.window == 0

    def after_step(self, step: int) -> bool:
        """Re-plan if ``step`` ends a window after the warm-up; True when it did."""
        if not self.adjust_due(step):
            return False
        self.adjust()
        return True

    def adjust(self) -> list[str]:
        """Reset every interval to τ′, relax the ascending-d_l prefix of weight layers and return that prefix.

        [choice] A weight layer without a measured discrepancy keeps τ′ and the walk is skipped altogether:
        sorting layers with unknown d_l would relax on no evidence. The layer at which δ first exceeds 1 − λ
        keeps τ′ (relaxing it would give up more discrepancy than the traffic it saves). λ is the share of the
        weight layers' size, the layers the walk can relax.
        """
        self.intervals = dict.fromkeys(self.shapes, self.tau)
        if self.phi == 1 or any(n not in self.discrepancies for n in self.weight_layers):
            self.last_order = []
            return []
        order = sorted(self.weight_layers, key=lambda n: (self.discrepancies[n], n))
        total_d = sum(self.discrepancies[n] * self.dims[n] for n in order)
        total_dim = sum(self.dims[n] for n in order)
        delta = lam = 0.0
        relaxed: list[str] = []
        for n in order:
            # With no discrepancy anywhere nothing is given up by relaxing: δ stays 0.
            delta += self.discrepancies[n] * self.dims[n] / total_d if total_d > 0 else 0.0
            lam += self.dims[n] / total_dim if total_dim > 0 else 1.0 / len(order)
            if delta > 1.0 - lam + _EPS:
                break
            self.intervals[n] = self.phi * self.tau
            relaxed.append(n)
        self.last_order = order
        return relaxed

    def relaxed(self) -> list[str]:
        return [n for n, t in self.intervals.items() if t != self.tau]

    def traffic_ratio(self) -> float:
        """Parameters sent per local step under the current intervals, relative to FedAvg averaging everything
        every τ′ steps; always within [1/φ, 1]."""
        fedavg = sum(self.dims.values()) / self.tau
        ours = sum(self.dims[n] / t for n, t in self.intervals.items())
        return ours / fedavg if fedavg > 0 else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "tau": self.tau,
            "phi": self.phi,
            "intervals": dict(self.intervals),
            "discrepancies": dict(self.discrepancies),
            "last_order": list(self.last_order),
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        if d.get("format") != _FORMAT:
            raise ValueError(f"unsupported FedLAMA state format {d.get('format')!r}")
        if (int(d["tau"]), int(d["phi"])) != (self.tau, self.phi):
            raise ValueError(f"state is for tau={d['tau']}, phi={d['phi']}, not {self.tau}, {self.phi}")
        if set(d["intervals"]) != set(self.shapes):
            raise ValueError("state is for a model with other parameters")
        intervals = {str(n): int(t) for n, t in d["intervals"].items()}
        relaxable = set(self.weight_layers)
        bad = {
            n: t
            for n, t in intervals.items()
            if t != self.tau and (t != self.phi * self.tau or n not in relaxable)
        }
        if bad:
            raise ValueError(f"state has intervals FedLAMA never sets: {bad}")
        self.intervals = {n: intervals[n] for n in self.shapes}
        self.discrepancies = {str(n): float(v) for n, v in d["discrepancies"].items()}
        self.last_order = [str(n) for n in d["last_order"]]


__all__ = ["FedLAMA", "default_is_weight"]
