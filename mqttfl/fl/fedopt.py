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


def nova(deltas: Sequence[State], samples: Sequence[float], steps: Sequence[int],
         masks: Sequence[State | None] | None = None, shapes: Mapping[str, np.ndarray] | None = None) -> State:
    """FedNova's normalised average; a client with zero steps contributes nothing.

    With clients that trained part of the model (a key left out, or ``masks``: the share of the client's weight
    behind each entry), the weights p_i, tau_eff and the sum run per entry over the clients that trained it;
    ``shapes`` gives each key's shape. With full clients this is the formula above."""
    keys = list(dict.fromkeys(k for d in deltas for k in d))
    masks = masks or [None] * len(deltas)
    out: State = {}
    for k in keys:
        shape = np.shape(shapes[k]) if shapes is not None else np.shape(next(d[k] for d in deltas if k in d))
        weight = np.zeros(shape)
        for d, n, m in zip(deltas, samples, masks, strict=True):
            if k in d:
                weight += n * (np.asarray(m[k], np.float64) if m and k in m else 1.0)
        acc = np.zeros(shape)
        tau_eff = np.zeros(shape)
        for d, n, t, m in zip(deltas, samples, steps, masks, strict=True):
            if k not in d:
                continue
            share = n * (np.asarray(m[k], np.float64) if m and k in m else 1.0)
            p = np.divide(share, weight, out=np.zeros(shape), where=weight > 0)
            tau_eff += p * t
            if t > 0:
                acc += np.where(p > 0, (p / t) * np.asarray(d[k], np.float64), 0.0)
        out[k] = (tau_eff * acc).astype(np.float32)
    return out
