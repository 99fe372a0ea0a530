"""Server optimisers and FedNova (docs/algorithms.md, "Server strategies"): pure maths over deltas.

FedOpt (Reddi et al., arXiv 2003.00295): the server treats the round's mean delta as a (negative) pseudo-
gradient and steps an adaptive optimiser over it, per coordinate:

    m <- b1 m + (1 - b1) d
    v <- v + d^2                                  (FedAdagrad)
    v <- v - (1 - b2) d^2 sign(v - d^2)           (FedYogi)
    v <- b2 v + (1 - b2) d^2                      (FedAdam)
    x <- x + lr m / (sqrt(v) + tau)

with m_0 = 0, v_0 = tau^2. [derived] With b1 = 0 and b2 = 1, v stays tau^2 and lr = 2 tau gives x + d: FedAvg.

FedNova (Wang et al., arXiv 2007.07481): clients that ran more local steps moved further; normalise each delta
by its steps tau_i, then rescale by the weighted mean number of steps:
``d = tau_eff * sum_i p_i d_i / tau_i`` with ``p_i = n_i / sum n`` and ``tau_eff = sum_i p_i tau_i``. Equal
steps give FedAvg. [choice] tau_i counts mini-batches (optimizer steps); the paper's momentum variant
normalises by the momentum-weighted step count instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = dict[str, np.ndarray]
VARIANTS = ("adam", "yogi", "adagrad")


class ServerOptimizer:
    """The FedOpt state (m, v per key, float64) and its step; ``state_dict`` makes it survive a restart."""

    def __init__(self, variant: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not (lr > 0 and 0 <= beta1 < 1 and 0 <= beta2 <= 1 and tau > 0):
            raise ValueError("server optimiser needs lr > 0, beta1 in [0, 1), beta2 in [0, 1], tau > 0")
        self.variant, self.lr, self.beta1, self.beta2, self.tau = variant, lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, mean: Mapping[str, np.ndarray]) -> State:
        """The update to add to the model for the round's mean delta (only the keys given move)."""
        out: State = {}
        b1, b2 = self.beta1, self.beta2
        for k, d in mean.items():
            d64 = np.asarray(d, np.float64)
            m = self.m.get(k)
            v = self.v.get(k)
            if m is None or v is None or m.shape != d64.shape:
                m, v = np.zeros_like(d64), np.full_like(d64, self.tau**2)
            m = b1 * m + (1 - b1) * d64
            d2 = d64 * d64
            if self.variant == "adagrad":
                v = v + d2
            elif self.variant == "yogi":
                v = v - (1 - b2) * d2 * np.sign(v - d2)
            else:
                v = b2 * v + (1 - b2) * d2
            self.m[k], self.v[k] = m, v
            out[k] = self.lr * m / (np.sqrt(v) + self.tau)
        return out

    def state_dict(self) -> dict[str, dict[str, np.ndarray]]:
        return {"m": {k: v.copy() for k, v in self.m.items()}, "v": {k: v.copy() for k, v in self.v.items()}}

    def load_state_dict(self, d: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.m = {k: np.array(v, np.float64) for k, v in d["m"].items()}
        self.v = {k: np.array(v, np.float64) for k, v in d["v"].items()}


def nova(deltas: Sequence[State], samples: Sequence[float], steps: Sequence[int]) -> State:
    """FedNova's normalised average; a client with zero steps contributes nothing."""
    total = float(sum(samples))
    p = [n / total for n in samples]
    tau_eff = sum(pi * t for pi, t in zip(p, steps, strict=True))
    out: State = {}
    for k in deltas[0]:
        acc = np.zeros(np.shape(deltas[0][k]))
        for d, pi, t in zip(deltas, p, steps, strict=True):
            if t > 0 and pi > 0:
                acc += (pi / t) * np.asarray(d[k], np.float64)
        out[k] = (tau_eff * acc).astype(np.float32)
    return out
