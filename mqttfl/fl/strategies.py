"""Aggregation strategies: one interface, one registry, pure maths (docs/design.md, "Strategies").

Theory of operation. The cloud owns the global model and hands updates to a :class:`Strategy`; a strategy
never holds a broker, a clock or a thread, only what its rule needs between updates, and ``state_dict``
makes that survive a restart. Two families share the interface:

- *synchronous* strategies close a round: ``aggregate(model, updates, info)`` returns the next global model
  from every update of the round (FedAvg, FedProx, FedAdam/FedYogi/FedAdagrad, FedNova, median, trimmed
  mean, Krum, norm clipping, DP-FedAvg). The updates of a round share one key set, a subset of the model's
  (FedLAMA aggregates some layers only); the other layers stay as they are. ``preaggregate`` says whether an
  edge may send its devices' sample-weighted mean (rules that are linear in the deltas) or must forward each
  device's delta (robust rules, FedNova, DP); ``prox_mu`` is the proximal weight local training adds (FedProx);
  ``buffers`` are the keys of non-trainable float buffers (BatchNorm statistics), which adaptive and noisy
  rules leave to the plain mean; ``last_report`` says what the rule did (selected, clipped, privacy spent);
  ``masks`` says whether the rule takes updates that cover part of the model (devices that trained a partial,
  pruned or narrower model: each entry is then averaged over the updates that trained it, docs/algorithms.md,
  "Heterogeneous devices");
- *asynchronous* strategies take one update at a time: ``submit(model, update)`` returns ``(model,
  advanced)``; ``version`` counts the global models produced and increments exactly when ``advanced`` is
  True. An update's staleness is ``version - update.base_version`` at arrival. The cloud feeds them the
  result of *group* rounds (synchronous FedAvg inside a group, :func:`mean_delta`); ``grouping`` says how
  the cloud forms the groups.

Convention for deltas: ``delta = x_trained - x_base`` (what the client adds), so every rule *adds* the
aggregated delta. FedBuff's paper writes ``x <- x - eta_g * mean`` with the opposite sign; same update.

Shared design choice [choice: the papers mix ``x_new = x_tau + delta`` but the cloud does not keep old
global models]: ``x_new`` is approximated by ``x + delta``, so ``(1 - a) x + a (x + delta) = x + a delta``.
The staleness factor still damps old deltas; for a fresh update the approximation is exact.

Nothing outside :data:`REGISTRY` looks at a strategy's name: the cloud asks the strategy's attributes.
Errors: a peer's unusable update raises :class:`UpdateRejected` (the server's state is unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from mqttfl.fl import fedopt, privacy, robust
from mqttfl.fl.aggregate import AggregationError, apply_delta, cast_like, masked_average, weighted_average
from mqttfl.fl.staleness import StalenessFn, polynomial
from mqttfl.fl.staleness import by_name as staleness_by_name

State = dict[str, np.ndarray]

_FORMAT = 2


class UpdateRejected(ValueError):
    """A peer sent an update this strategy cannot use (a remote error: the server's state is unchanged)."""


@dataclass(frozen=True)
class Update:
    """A client's (or a whole group's) contribution: ``delta = x_trained - x_base`` at ``base_version``."""

    client: str
    delta: State
    num_samples: int
    base_version: int = 0
    group: int | None = None
    steps: int = 0  # local optimizer steps (FedNova); 0 when unknown (an edge's mean)
    # Part of the model: per key, the share of ``num_samples`` behind each entry (0/1 for a device's pruned or
    # narrower model, a fraction for an edge's mean; it broadcasts to the key); keys the delta leaves out count 0.
    mask: State | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise UpdateRejected(f"{self.client}: num_samples must be >= 0, got {self.num_samples}")


@dataclass(frozen=True)
class RoundInfo:
    """What a synchronous rule may know of the round besides its updates."""

    expected: int  # clients the round was announced to (DP-FedAvg divides by it, fixed in advance)
    population: int  # clients the server knows (the sampling rate of the privacy accountant)


class Grouping(StrEnum):
    """How the cloud groups clients for an asynchronous strategy (docs/async.md)."""

    ONE = "one"  # everyone in one group: synchronous rounds, one version each
    PER_CLIENT = "per_client"  # every client is its own group (FedAsync, FedBuff)
    TIERS = "tiers"  # latency tiers (FedAT)
    ECOFL = "ecofl"  # latency and label mix, regrouped at run time (Eco-FL)


def partial(updates: Sequence[Update]) -> bool:
    """Whether some update covers only part of the round's keys or entries."""
    return any(u.mask for u in updates) or len({frozenset(u.delta) for u in updates}) > 1


def mean_delta(updates: Sequence[Update]) -> State:
    """FedAvg's sample-weighted mean of the updates' deltas: the one weighted mean every round close uses. When
    updates cover parts of the model, each entry is the mean over the updates that trained it (0 where none
    did: the parameter stays as it is)."""
    if not updates:
        raise UpdateRejected("nothing to aggregate")
    try:
        if not partial(updates):
            return weighted_average([(u.delta, float(u.num_samples)) for u in updates])
        keys = list(dict.fromkeys(k for u in updates for k in u.delta))
        zeros = {k: np.zeros(np.shape(next(u.delta[k] for u in updates if k in u.delta)), np.float32) for k in keys}
        return masked_average([(u.delta, u.mask, float(u.num_samples)) for u in updates], zeros)
    except AggregationError as e:
        raise UpdateRejected(str(e)) from e


def _check_delta(model: State, upd: Update) -> None:
    if set(upd.delta) != set(model):
        missing, extra = sorted(set(model) - set(upd.delta)), sorted(set(upd.delta) - set(model))
        raise UpdateRejected(f"{upd.client}: keys differ from the model (missing {missing}, extra {extra})")
    for k, m in model.items():
        if np.shape(upd.delta[k]) != np.shape(m):
            raise UpdateRejected(f"{upd.client}: {k} has shape {np.shape(upd.delta[k])}, model {np.shape(m)}")


def _check_round(model: State, updates: Sequence[Update], masks: bool = False) -> list[str]:
    """The key set of a synchronous round (a subset of the model's, in its order): every update's, or, for a rule
    that takes ``masks``, the union of the updates' keys."""
    if not updates:
        raise UpdateRejected("nothing to aggregate")
    keys = set(updates[0].delta)
    if masks:
        keys = {k for u in updates for k in u.delta}
    for u in updates:
        if u.mask and not masks:
            raise UpdateRejected(f"{u.client}: this rule takes no update that covers part of the model")
        if set(u.delta) != keys and not masks:
            raise UpdateRejected(f"{u.client}: keys differ from {updates[0].client}'s in the same round")
        extra = set(u.delta) - set(model)
        if extra:
            raise UpdateRejected(f"{u.client}: keys the model lacks {sorted(extra)[:3]}")
        for k in u.delta:
            if np.shape(u.delta[k]) != np.shape(model[k]):
                raise UpdateRejected(f"{u.client}: {k} has shape {np.shape(u.delta[k])}, model {np.shape(model[k])}")
    return [k for k in model if k in keys]


def _staleness(version: int, upd: Update) -> int:
    tau = version - upd.base_version
    if tau < 0:
        raise UpdateRejected(f"{upd.client}: base version {upd.base_version} is ahead of ({version})")
    return tau


def _check_loaded(name: str, d: Mapping[str, Any]) -> None:
    if d.get("name") != name or d.get("format") != _FORMAT:
        raise ValueError(f"state is for {d.get('name')!r} format {d.get('format')!r}, not {name!r} {_FORMAT}")


class Strategy:
    """The interface every strategy implements; see the module docstring."""

    name = "strategy"
    synchronous = True
    grouping = Grouping.ONE
    version = 0
    preaggregate = True
    prox_mu = 0.0
    masks = False
    buffers: frozenset[str] = frozenset()
    last_report: dict[str, Any] = {}

    def aggregate(self, model: State, updates: Sequence[Update], info: RoundInfo | None = None) -> State:
        raise TypeError(f"{self.name} is asynchronous: submit updates one at a time")

    def submit(self, model: State, upd: Update) -> tuple[State, bool]:
        raise TypeError(f"{self.name} is synchronous: aggregate a round's updates")

    def mixing_weight(self, staleness: int) -> float | None:
        """The weight a group's update of this staleness gets, where the rule has one."""
        return None

    def set_groups(self, groups: Mapping[str, int]) -> None:
        """A new grouping (client -> group; -1 = dropped). Strategies that do not track groups ignore it."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "format": _FORMAT, "version": self.version}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        _check_loaded(self.name, d)
        self.version = int(d["version"])


# ------------------------------------------------------------------------------------------------ FedAvg


class SyncStrategy(Strategy):
    """A synchronous rule: ``combine`` turns the round's updates into one delta over their keys."""

    def aggregate(self, model: State, updates: Sequence[Update], info: RoundInfo | None = None) -> State:
        keys = _check_round(model, updates, self.masks)
        counted = [u for u in updates if u.num_samples > 0]
        if not counted:
            raise UpdateRejected("no update carries samples")
        self.last_report = {}
        step = self.combine({k: model[k] for k in keys}, counted, info or RoundInfo(len(updates), len(updates)))
        new = dict(model)
        new.update(apply_delta({k: model[k] for k in keys}, step))
        self.version += 1
        return new

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        raise NotImplementedError


class FedAvg(SyncStrategy):
    """FedAvg (McMahan et al., arXiv 1602.05629): x <- x + sum_i n_i delta_i / sum_i n_i; each entry over the
    updates that trained it when they cover parts of the model."""

    name = "fedavg"
    masks = True

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        return mean_delta(updates)


class FedProx(FedAvg):
    """FedProx (Li et al., arXiv 1812.06127): FedAvg's aggregation; each client minimises
    F_i(w) + (mu / 2) |w - w_global|^2 (the plan carries mu; local training adds the term). mu = 0 is FedAvg."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        if not mu >= 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.prox_mu = mu


class FedOpt(SyncStrategy):
    """FedAdam / FedYogi / FedAdagrad (``mqttfl.fl.fedopt``) over the round's sample-weighted mean delta;
    BatchNorm statistics take the plain mean. The optimiser's state is part of ``state_dict``."""

    def __init__(self, variant: str, lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.name = f"fed{variant}"
        self.opt = fedopt.ServerOptimizer(variant, lr, beta1, beta2, tau)

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        mean = mean_delta(updates)
        step = self.opt.step({k: v for k, v in mean.items() if k not in self.buffers})
        return {k: step.get(k, mean[k]) for k in mean}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        self.opt.load_state_dict(d["opt"])


class FedNova(SyncStrategy):
    """FedNova (``mqttfl.fl.fedopt.nova``): deltas normalised by each device's local steps."""

    name = "fednova"
    preaggregate = False
    masks = True

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        if not any(u.steps > 0 for u in updates):
            raise UpdateRejected("FedNova needs each device's local steps")
        return fedopt.nova([u.delta for u in updates], [float(u.num_samples) for u in updates],
                           [u.steps for u in updates], [u.mask for u in updates], shapes=model)


class Median(SyncStrategy):
    """Coordinate-wise median of the devices' deltas (unweighted)."""

    name = "median"
    preaggregate = False

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        return robust.coordinate_median([u.delta for u in updates])


class TrimmedMean(SyncStrategy):
    """Coordinate-wise trimmed mean: drop the ``beta`` fraction of largest and of smallest values."""

    name = "trimmed"
    preaggregate = False

    def __init__(self, beta: float) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"trim_beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        self.last_report = {"trimmed_each_end": robust.trimmed_count(len(updates), self.beta)}
        return robust.trimmed_mean([u.delta for u in updates], self.beta)


class Krum(SyncStrategy):
    """(Multi-)Krum: the ``m`` updates with the lowest Krum scores (tolerating ``f`` attackers), averaged by
    samples. [choice] The paper averages the selected updates equally; weighting them by samples makes m = n
    exactly FedAvg."""

    name = "krum"
    preaggregate = False

    def __init__(self, f: int, m: int) -> None:
        if f < 0 or m < 1:
            raise ValueError(f"krum_f must be >= 0 and krum_m >= 1, got {f}, {m}")
        self.f, self.m = f, m

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        chosen = robust.krum_select([u.delta for u in updates], self.f, self.m)
        self.last_report = {"selected": sorted(updates[i].client for i in chosen),
                            "rejected": sorted(u.client for i, u in enumerate(updates) if i not in chosen)}
        return mean_delta([updates[i] for i in chosen])


class NormClipping(SyncStrategy):
    """Each delta scaled to norm at most C, then FedAvg. C = ``clip_norm``, or when 0 the median norm of the
    round's deltas [choice: no tuning, and one scaled update cannot move a median]."""

    name = "clip"
    preaggregate = False

    def __init__(self, c: float) -> None:
        if not c >= 0:
            raise ValueError(f"clip_norm must be >= 0, got {c}")
        self.c = c

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        norms = [robust.norm(u.delta) for u in updates]
        c = self.c or float(np.median(norms))
        clipped = []
        for u in updates:
            d, factor = robust.clip(u.delta, c)
            clipped.append((u, d, factor))
        self.last_report = {"clip_norm": c, "clipped": sorted(u.client for u, _, f in clipped if f < 1.0)}
        return mean_delta([Update(u.client, d, u.num_samples) for u, d, _ in clipped])


class DPFedAvg(SyncStrategy):
    """Central differential privacy (``mqttfl.fl.privacy``): clip to C, sum, Gaussian noise of sigma C, divide
    by the expected count; (epsilon, delta) spent so far in ``last_report``. The noise covers trainable
    parameters; BatchNorm statistics are averaged without it (use a model without BatchNorm for a formal
    guarantee over everything a client sends)."""

    name = "dpfedavg"
    preaggregate = False

    def __init__(self, clip: float, noise: float, delta: float) -> None:
        if not (clip > 0 and noise >= 0 and 0 < delta < 1):
            raise ValueError("dp_clip must be > 0, dp_noise >= 0 and dp_delta in (0, 1)")
        self.clip, self.noise = clip, noise
        self.accountant = privacy.Accountant(delta)
        self.rng = np.random.default_rng()

    def combine(self, model: State, updates: Sequence[Update], info: RoundInfo) -> State:
        clipped, n_clipped = [], 0
        for u in updates:
            d, factor = robust.clip(u.delta, self.clip)
            clipped.append(d)
            n_clipped += factor < 1.0
        expected = max(info.expected, len(updates))
        q = min(1.0, expected / max(info.population, expected))
        step = privacy.gaussian_sum(clipped, self.clip, self.noise, expected, self.rng,
                                    frozenset(k for k in model if k not in self.buffers))
        self.accountant.step(q, self.noise)
        spent = self.accountant.spent()
        # No noise, no privacy: epsilon is infinite, reported as null (JSON has no infinity).
        self.last_report = {"epsilon": round(spent, 6) if np.isfinite(spent) else None,
                            "delta": self.accountant.delta,
                            "noise_multiplier": self.noise, "clip_norm": self.clip, "sampling_rate": round(q, 6),
                            "clipped": int(n_clipped), "dp_rounds": self.accountant.rounds}
        return step

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rdp": self.accountant.rdp.copy(), "dp_rounds": self.accountant.rounds}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        self.accountant.rdp = np.array(d["rdp"], np.float64)
        self.accountant.rounds = int(d["dp_rounds"])


# ------------------------------------------------------------------------------------------------ FedAsync


class FedAsync(Strategy):
    """FedAsync (Xie et al., arXiv 1903.03934): x <- (1 - a_t) x + a_t x_new, a_t = alpha * s(t - tau), one
    version per update; with x_new ~ x + delta (module docstring) this is x <- x + a_t delta.

    ``max_staleness`` drops updates older than that many versions (the paper's optional drop rule)."""

    name = "fedasync"
    synchronous = False
    grouping = Grouping.PER_CLIENT

    def __init__(self, alpha: float = 0.6, staleness: StalenessFn | None = None, *,
                 max_staleness: int | None = None) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = staleness if staleness is not None else polynomial()
        self.max_staleness = max_staleness
        self.version = 0

    def mixing_weight(self, staleness: int) -> float:
        return self.alpha * self.staleness(staleness)

    def submit(self, model: State, upd: Update) -> tuple[State, bool]:
        _check_delta(model, upd)
        tau = _staleness(self.version, upd)
        if self.max_staleness is not None and tau > self.max_staleness:
            return model, False
        a = self.mixing_weight(tau)
        if a <= 0.0:
            return model, False
        self.version += 1
        return apply_delta(model, upd.delta, a), True


# ------------------------------------------------------------------------------------------------ FedBuff


class FedBuff(Strategy):
    """FedBuff (Nguyen et al., arXiv 2106.06639): buffer K deltas weighted by s(tau_i) (default
    1/sqrt(1 + tau_i)), then x <- x + eta_g * (sum s(tau_i) delta_i) / K and version += 1.

    The buffer is a running weighted sum (K times less memory than the deltas) and part of ``state_dict``."""

    name = "fedbuff"
    synchronous = False
    grouping = Grouping.PER_CLIENT

    def __init__(self, k: int = 10, eta_g: float = 1.0, staleness: StalenessFn | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.eta_g = eta_g
        self.staleness = staleness if staleness is not None else polynomial(0.5)
        self.version = 0
        self._sum: dict[str, np.ndarray] | None = None
        self._clients: list[str] = []

    @property
    def buffered(self) -> int:
        return len(self._clients)

    def submit(self, model: State, upd: Update) -> tuple[State, bool]:
        _check_delta(model, upd)
        w = self.staleness(_staleness(self.version, upd))
        contrib = {k: w * np.asarray(v, np.float64) for k, v in upd.delta.items()}
        self._sum = contrib if self._sum is None else {k: self._sum[k] + contrib[k] for k in self._sum}
        self._clients.append(upd.client)
        if len(self._clients) < self.k:
            return model, False
        new = apply_delta(model, self._sum, self.eta_g / self.k)
        self._sum, self._clients = None, []
        self.version += 1
        return new, True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clients": list(self._clients),
                "sum": None if self._sum is None else {k: v.copy() for k, v in self._sum.items()}}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        self._clients = [str(c) for c in d["clients"]]
        s = d["sum"]
        self._sum = None if s is None else {k: np.array(v, np.float64) for k, v in s.items()}


# ------------------------------------------------------------------------------------------------ FedAT


class FedAT(Strategy):
    """FedAT (Chai et al., arXiv 2010.05958): synchronous inside a tier, asynchronous across tiers.

    A tier's round (its members' FedAvg, from the global model they pulled) gives the tier model
    w^m = x + delta_m and T_m += 1; then global = sum_m (T_{M+1-m} / T) w^m over the tiers that have a model.

    [choice] The paper indexes tiers fastest first and assumes the fastest updates most often. Here tiers are
    ranked by their actual counts T_m (ties by tier id), and the i-th most frequent tier gets the count of the
    i-th least frequent, so "the tier updated most often gets the smallest weight" holds even when measured
    speeds drift from the initial tiering."""

    name = "fedat"
    synchronous = False
    grouping = Grouping.TIERS

    def __init__(self) -> None:
        self.version = 0
        self._models: dict[int, State] = {}
        self._counts: dict[int, int] = {}

    @property
    def counts(self) -> dict[int, int]:
        return dict(self._counts)

    def tier_weights(self) -> dict[int, float]:
        """T_{M+1-m}/T for every tier with a model; the weights sum to 1."""
        order = sorted(self._counts, key=lambda t: (-self._counts[t], t))
        total = sum(self._counts.values())
        return {t: self._counts[order[len(order) - 1 - i]] / total for i, t in enumerate(order)}

    def submit(self, model: State, upd: Update) -> tuple[State, bool]:
        if upd.group is None or upd.group < 0:
            raise UpdateRejected(f"{upd.client}: FedAT takes one update per tier round")
        _check_delta(model, upd)
        _staleness(self.version, upd)
        tier = int(upd.group)
        self._models[tier] = apply_delta(model, upd.delta)
        self._counts[tier] = self._counts.get(tier, 0) + 1
        weights = self.tier_weights()
        new = {}
        for k, m in model.items():
            acc = sum(w * np.asarray(self._models[t][k], np.float64) for t, w in weights.items())
            new[k] = cast_like(np.asarray(acc), m)
        self.version += 1
        return new, True

    def state_dict(self) -> dict[str, Any]:
        # String keys throughout: msgpack's unpacker refuses integer map keys by default (strict_map_key).
        return {**super().state_dict(), "counts": {str(t): n for t, n in self._counts.items()},
                "models": {str(t): {k: v.copy() for k, v in m.items()} for t, m in self._models.items()}}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        self._counts = {int(t): int(n) for t, n in d["counts"].items()}
        self._models = {int(t): {k: np.array(v) for k, v in m.items()} for t, m in d["models"].items()}


# ------------------------------------------------------------------------------------------------ Eco-FL


class EcoFLHybrid(Strategy):
    """Eco-FL's grouping-based hierarchical aggregation (Ye et al., ICPP 2022), between groups.

    Inside a group members are synchronous (the cloud's group round, :func:`mean_delta`); between groups the
    mix is asynchronous: w <- (1 - a_g) w + a_g w_g, a_g = alpha * s(t - tau_g), with w_g ~ w + delta_g, i.e.
    w <- w + a_g delta_g. With one group and a_g = 1 this is FedAvg (the ``sync`` registry entry)."""

    name = "ecofl"
    synchronous = False
    grouping = Grouping.ECOFL

    def __init__(self, groups: Mapping[str, int] | None = None, alpha: float = 0.6,
                 staleness: StalenessFn | None = None) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = staleness if staleness is not None else polynomial()
        self.version = 0
        self.groups: dict[str, int] = {}
        self.set_groups(groups or {})

    def set_groups(self, groups: Mapping[str, int]) -> None:
        self.groups = {c: int(g) for c, g in groups.items()}

    def group_ids(self) -> set[int]:
        return {g for g in self.groups.values() if g >= 0}

    def mixing_weight(self, staleness: int) -> float:
        return self.alpha * self.staleness(staleness)

    def submit(self, model: State, upd: Update) -> tuple[State, bool]:
        if upd.group is None:
            raise UpdateRejected(f"{upd.client}: Eco-FL takes one update per group round")
        if upd.group not in self.group_ids():
            raise UpdateRejected(f"{upd.client}: unknown group {upd.group}")
        _check_delta(model, upd)
        a = self.mixing_weight(_staleness(self.version, upd))
        if a <= 0.0:
            return model, False
        self.version += 1
        return apply_delta(model, upd.delta, a), True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "groups": dict(self.groups)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        self.set_groups(d["groups"])


class OneGroup(EcoFLHybrid):
    """Everyone in one group, each group round applied in full: synchronous FedAvg run by the asynchronous
    machinery, as a check that it produces the synchronous model."""

    name = "sync"
    grouping = Grouping.ONE

    def __init__(self, groups: Mapping[str, int] | None = None) -> None:
        super().__init__(groups, alpha=1.0, staleness=lambda tau: 1.0)


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class StrategyParams:
    """The strategy parameters an operator may set (``[cloud]`` keys of the same names)."""

    alpha: float = field(default=0.6, metadata={"doc": "FedAsync and Eco-FL mixing weight of a fresh update"})
    staleness: str = field(default="polynomial", metadata={"doc": (
        "staleness function damping stale updates: constant, polynomial or hinge")})
    fedbuff_k: int = field(default=4, metadata={"doc": "FedBuff: updates buffered per global version"})
    eta_g: float = field(default=1.0, metadata={"doc": "FedBuff: server learning rate"})
    mu: float = field(default=0.01, metadata={"doc": "FedProx: weight of the proximal term (0: FedAvg)"})
    server_lr: float = field(default=0.0, metadata={"doc": (
        "FedAdam, FedYogi, FedAdagrad: server learning rate; 0: the variant's default (0.01; FedAdagrad 0.1)")})
    beta1: float = field(default=0.9, metadata={"doc": "FedAdam, FedYogi, FedAdagrad: first-moment decay"})
    beta2: float = field(default=0.99, metadata={"doc": "FedAdam, FedYogi: second-moment decay"})
    tau: float = field(default=1e-3, metadata={"doc": "FedAdam, FedYogi, FedAdagrad: adaptivity (v starts at tau^2)"})
    trim_beta: float = field(default=0.1, metadata={"doc": (
        "trimmed mean: fraction of values dropped at each end, per coordinate")})
    krum_f: int = field(default=1, metadata={"doc": "Krum: number of attacking participants tolerated"})
    krum_m: int = field(default=1, metadata={"doc": "Krum: updates averaged (1: Krum; more: multi-Krum)"})
    clip_norm: float = field(default=0.0, metadata={"doc": (
        "norm clipping: largest update norm; 0: the median norm of the round's updates")})
    dp_clip: float = field(default=1.0, metadata={"doc": "DP-FedAvg: clipping norm C of every device's delta"})
    dp_noise: float = field(default=1.0, metadata={"doc": (
        "DP-FedAvg: noise multiplier sigma (Gaussian noise of sigma * C per coordinate)")})
    dp_delta: float = field(default=1e-5, metadata={"doc": "DP-FedAvg: the delta of the (epsilon, delta) reported"})

    def problems(self) -> list[str]:
        out = []
        if not self.mu >= 0 or not self.server_lr >= 0 or not self.tau > 0:
            out.append("mu and server_lr must be >= 0, tau > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 <= 1):
            out.append("beta1 must be in [0, 1) and beta2 in [0, 1]")
        if not 0 <= self.trim_beta < 0.5:
            out.append("trim_beta must be in [0, 0.5)")
        if self.krum_f < 0 or self.krum_m < 1:
            out.append("krum_f must be >= 0 and krum_m >= 1")
        if not self.clip_norm >= 0:
            out.append("clip_norm must be >= 0")
        if not (self.dp_clip > 0 and self.dp_noise >= 0 and 0 < self.dp_delta < 1):
            out.append("dp_clip must be > 0, dp_noise >= 0, dp_delta in (0, 1)")
        return out


Factory = Callable[[StrategyParams], Strategy]

def _fedopt(variant: str, p: StrategyParams) -> Strategy:
    lr = p.server_lr or (0.1 if variant == "adagrad" else 0.01)  # Reddi et al.'s defaults
    return FedOpt(variant, lr, p.beta1, p.beta2, p.tau)


REGISTRY: dict[str, Factory] = {
    "fedavg": lambda p: FedAvg(),
    "fedprox": lambda p: FedProx(p.mu),
    "fedadam": lambda p: _fedopt("adam", p),
    "fedyogi": lambda p: _fedopt("yogi", p),
    "fedadagrad": lambda p: _fedopt("adagrad", p),
    "fednova": lambda p: FedNova(),
    "median": lambda p: Median(),
    "trimmed": lambda p: TrimmedMean(p.trim_beta),
    "krum": lambda p: Krum(p.krum_f, p.krum_m),
    "clip": lambda p: NormClipping(p.clip_norm),
    "dpfedavg": lambda p: DPFedAvg(p.dp_clip, p.dp_noise, p.dp_delta),
    "fedasync": lambda p: FedAsync(alpha=p.alpha, staleness=staleness_by_name(p.staleness)),
    "fedbuff": lambda p: FedBuff(k=p.fedbuff_k, eta_g=p.eta_g, staleness=staleness_by_name(p.staleness)),
    "fedat": lambda p: FedAT(),
    "ecofl": lambda p: EcoFLHybrid(alpha=p.alpha, staleness=staleness_by_name(p.staleness)),
    "sync": lambda p: OneGroup(),
}


def make_strategy(name: str, params: StrategyParams | None = None) -> Strategy:
    """The strategy called ``name``; ValueError names the known ones."""
    factory = REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(REGISTRY)}")
    return factory(params or StrategyParams())


def names(*, synchronous: bool) -> list[str]:
    return sorted(n for n, f in REGISTRY.items() if f(StrategyParams()).synchronous == synchronous)
