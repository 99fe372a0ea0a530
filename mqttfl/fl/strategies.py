"""Asynchronous aggregation strategies: pure state machines keyed by a global model version, not by rounds.

Theory of operation. The cloud agent owns the global model and feeds every client (or group) update to a
strategy: ``model, advanced = strategy.submit(model, update)``. A strategy never holds a broker, a clock or a
thread; it only remembers what its rule needs between updates (FedBuff's buffer, FedAT's tier models, the
synchronous round of SyncFedAvg), and ``state_dict`` makes that memory survive a restart of the cloud.

``version`` counts the global models produced; it increments exactly when ``submit`` returns a changed model
(``advanced`` is True). An update's staleness is ``version − update.base_version`` at arrival.

Convention for deltas: ``delta = x_trained − x_base`` (what the client adds), so every rule *adds* the
aggregated delta. FedBuff's paper writes ``x ← x − η_g·Δ̄`` with Δ = x_base − x_trained; same update.

Design choice shared by FedAsync and Eco-FL's inter-group mix [choice: the papers mix
``x_new = x_τ + Δ`` but the cloud does not keep old global models]: ``x_new`` is approximated by ``x + Δ``,
so ``(1 − a)·x + a·(x + Δ) = x + a·Δ``. The staleness factor s(t − τ) still damps old deltas; for a fresh
update (τ = t) the approximation is exact.

Errors: a peer's unusable update (unknown client, keys or shapes that do not match the model, a base
version from the future) raises ``UpdateRejected``; benign leftovers (a duplicate, a late answer to a closed
round) are ignored and return ``(model, False)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mqttfl.fl.staleness import StalenessFn, polynomial

State = dict[str, np.ndarray]

_FORMAT = 1


class UpdateRejected(ValueError):
    """A peer sent an update this strategy cannot use (a remote error: the server's state is unchanged)."""


@dataclass(frozen=True)
class Update:
    """A client's (or a whole group's) contribution: ``delta = x_trained − x_base`` at ``base_version``."""

    client: str
    delta: State
    num_samples: int
    base_version: int
    group: int | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise UpdateRejected(f"{self.client}: num_samples must be >= 0, got {self.num_samples}")


@runtime_checkable
class Strategy(Protocol):
    name: str
    version: int

    def submit(self, model: State, upd: Update) -> tuple[State, bool]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: Mapping[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------------------ helpers


def _check_delta(model: State, upd: Update) -> None:
    if set(upd.delta) != set(model):
        missing, extra = sorted(set(model) - set(upd.delta)), sorted(set(upd.delta) - set(model))
        raise UpdateRejected(f"{upd.client}: keys differ from the model (missing {missing}, extra {extra})")
    for k, m in model.items():
        if np.shape(upd.delta[k]) != np.shape(m):
            raise UpdateRejected(f"{upd.client}: {k} has shape {np.shape(upd.delta[k])}, model {np.shape(m)}")


def _staleness(version: int, upd: Update) -> int:
    tau = version - upd.base_version
    if tau < 0:
        raise UpdateRejected(f"{upd.client}: base version {upd.base_version} is ahead of ({version})")
    return tau


def _cast_like(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    # Integer buffers (BatchNorm's num_batches_tracked) round instead of truncating toward zero.
    if not np.issubdtype(like.dtype, np.floating):
        x = np.rint(x)
    return x.astype(like.dtype, copy=False)


def _add(model: State, delta: Mapping[str, np.ndarray], scale: float) -> State:
    # float64 arithmetic, then one rounding to the model's dtype: x + 1·Δ is bit-identical to float32 x + Δ.
    return {
        k: _cast_like(np.asarray(m, np.float64) + scale * np.asarray(delta[k], np.float64), m)
        for k, m in model.items()
    }


def _weighted_mean(items: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Σ w_i·Δ_i / Σ w_i in float64; all-zero weights fall back to equal weights [choice: a group whose
    members report no samples still moves, as FedAvg over equals]."""
    if not items:
        raise ValueError("nothing to average")
    total = float(sum(w for _, w in items))
    weights = [w / total for _, w in items] if total > 0 else [1.0 / len(items)] * len(items)
    keys = list(items[0][0])
    pairs = list(zip(weights, (d for d, _ in items), strict=True))
    return {k: _wsum((w, d[k]) for w, d in pairs) for k in keys}


def _wsum(terms: Iterable[tuple[float, np.ndarray]]) -> np.ndarray:
    acc: np.ndarray | None = None
    for w, a in terms:
        t = w * np.asarray(a, np.float64)
        acc = t if acc is None else acc + t
    if acc is None:
        raise ValueError("nothing to sum")
    return acc


def _f32(state: Mapping[str, np.ndarray]) -> State:
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _pack_round(r: Mapping[str, tuple[State, int]]) -> dict[str, Any]:
    return {c: {"delta": {k: v.copy() for k, v in d.items()}, "num_samples": n} for c, (d, n) in r.items()}


def _unpack_round(r: Mapping[str, Any]) -> dict[str, tuple[State, int]]:
    return {c: ({k: np.array(v) for k, v in e["delta"].items()}, int(e["num_samples"])) for c, e in r.items()}


def _check_loaded(name: str, d: Mapping[str, Any]) -> None:
    if d.get("name") != name or d.get("format") != _FORMAT:
        raise ValueError(f"state is for {d.get('name')!r} format {d.get('format')!r}, not {name!r} {_FORMAT}")


# ------------------------------------------------------------------------------------------------ FedAsync


class FedAsync:
    """FedAsync (Xie et al., arXiv 1903.03934): x ← (1 − α_t)·x + α_t·x_new, α_t = α·s(t − τ), one version per
    update. With ``x_new ≈ x + Δ`` (module docstring) this is x ← x + α_t·Δ.

    ``max_staleness`` drops updates older than that many versions (the paper's optional drop rule).
    """

    name = "fedasync"

    def __init__(
        self, alpha: float = 0.6, staleness: StalenessFn | None = None, *, max_staleness: int | None = None
    ) -> None:
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
        return _add(model, upd.delta, a), True

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "format": _FORMAT, "version": self.version}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        _check_loaded(self.name, d)
        self.version = int(d["version"])


# ------------------------------------------------------------------------------------------------ FedBuff


class FedBuff:
    """FedBuff (Nguyen et al., arXiv 2106.06639): buffer K deltas weighted by s(τ_i) (default 1/√(1 + τ_i)),
    then x ← x + η_g·(Σ s(τ_i)·Δ_i)/K and version += 1.

    Staleness is measured when an update arrives, as in the paper's server loop. The buffer is kept as a
    running weighted sum (K times less memory than the deltas themselves) and is part of ``state_dict``.
    """

    name = "fedbuff"

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
        new = _add(model, self._sum, self.eta_g / self.k)
        self._sum, self._clients = None, []
        self.version += 1
        return new, True

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": _FORMAT,
            "version": self.version,
            "clients": list(self._clients),
            "sum": None if self._sum is None else {k: v.copy() for k, v in self._sum.items()},
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        _check_loaded(self.name, d)
        self.version = int(d["version"])
        self._clients = [str(c) for c in d["clients"]]
        s = d["sum"]
        self._sum = None if s is None else {k: np.array(v, np.float64) for k, v in s.items()}


# ------------------------------------------------------------------------------------------------ FedAT


class FedAT:
    """FedAT (Chai et al., arXiv 2010.05958): synchronous inside a tier, asynchronous across tiers.

    A tier updates when all its members have answered (or when a pre-aggregated ``Update`` with ``group``
    set arrives, e.g. from a ``GroupRound`` closed at its deadline): w^m ← x + Σ n_i·Δ_i / Σ n_i, T_m += 1.
    Members trained from the global model they pulled, so the tier model is that global plus the tier's delta
    (the global approximated by the current one, as in FedAsync). Then global = Σ_m (T_{M+1−m}/T)·w^m over the
    tiers that have produced a model.

    [choice] The paper indexes tiers fastest first and assumes the fastest updates most often. Here tiers are
    ranked by their actual counts T_m (ties by tier id), and the i-th most frequent tier gets the count of the
    i-th least frequent, so "the tier updated most often gets the smallest weight" holds even when measured
    speeds drift from the initial tiering.
    """

    name = "fedat"

    def __init__(self, tiers: Mapping[str, int]) -> None:
        self._reset(tiers)

    def _reset(self, tiers: Mapping[str, int]) -> None:
        if not tiers:
            raise ValueError("FedAT needs at least one tier member")
        self._tiers = {str(c): int(t) for c, t in tiers.items()}
        self._members: dict[int, set[str]] = {}
        for client, tier in self._tiers.items():
            self._members.setdefault(tier, set()).add(client)
        self.version = 0
        self._models: dict[int, State] = {}
        self._counts: dict[int, int] = {}
        self._pending: dict[int, dict[str, tuple[State, int]]] = {}

    @property
    def counts(self) -> dict[int, int]:
        return dict(self._counts)

    def tier_weights(self) -> dict[int, float]:
        """T_{M+1−m}/T for every tier with a model; the weights sum to 1."""
        order = sorted(self._counts, key=lambda t: (-self._counts[t], t))
        total = sum(self._counts.values())
        return {t: self._counts[order[len(order) - 1 - i]] / total for i, t in enumerate(order)}

    def submit(self, model: State, upd: Update) -> tuple[State, bool]:
        _check_delta(model, upd)
        _staleness(self.version, upd)
        if upd.group is not None:
            tier = int(upd.group)
            if tier not in self._members:
                raise UpdateRejected(f"{upd.client}: unknown tier {tier}")
            tier_delta: Mapping[str, np.ndarray] = upd.delta
        else:
            if upd.client not in self._tiers:
                raise UpdateRejected(f"{upd.client}: not in any tier")
            tier = int(self._tiers[upd.client])
            pending = self._pending.setdefault(tier, {})
            if upd.client in pending:
                return model, False
            pending[upd.client] = (upd.delta, upd.num_samples)
            if set(pending) != self._members[tier]:
                return model, False
            tier_delta = _weighted_mean([(d, float(n)) for d, n in pending.values()])
            del self._pending[tier]
        self._models[tier] = _add(model, tier_delta, 1.0)
        self._counts[tier] = self._counts.get(tier, 0) + 1
        weights = self.tier_weights()
        new = {
            k: _cast_like(_wsum((w, self._models[t][k]) for t, w in weights.items()), m)
            for k, m in model.items()
        }
        self.version += 1
        return new, True

    def state_dict(self) -> dict[str, Any]:
        # String keys throughout: msgpack's unpacker refuses integer map keys by default (strict_map_key).
        return {
            "name": self.name,
            "format": _FORMAT,
            "version": self.version,
            "tiers": {c: int(t) for c, t in self._tiers.items()},
            "counts": {str(t): n for t, n in self._counts.items()},
            "models": {str(t): {k: v.copy() for k, v in m.items()} for t, m in self._models.items()},
            "pending": {str(t): _pack_round(p) for t, p in self._pending.items()},
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        _check_loaded(self.name, d)
        self._reset(d["tiers"])
        self.version = int(d["version"])
        self._counts = {int(t): int(n) for t, n in d["counts"].items()}
        self._models = {int(t): {k: np.array(v) for k, v in m.items()} for t, m in d["models"].items()}
        self._pending = {int(t): _unpack_round(p) for t, p in d["pending"].items()}


# ------------------------------------------------------------------------------------------------ Eco-FL


class EcoFLHybrid:
    """Eco-FL's grouping-based hierarchical aggregation (Ye et al., ICPP 2022), between groups.

    Inside a group members are synchronous: a ``GroupRound`` turns their deltas into ONE ``Update`` with
    ``group`` set. Between groups the mix is asynchronous: w ← (1 − a_g)·w + a_g·w_g, a_g = α·s(t − τ_g), with
    w_g ≈ w + Δ_g (module docstring), i.e. w ← w + a_g·Δ_g. With one group and a_g = 1 this is FedAvg.
    """

    name = "ecofl"

    def __init__(
        self, groups: Mapping[str, int], alpha: float = 0.6, staleness: StalenessFn | None = None
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = staleness if staleness is not None else polynomial()
        self.version = 0
        self.set_groups(groups)

    def set_groups(self, groups: Mapping[str, int]) -> None:
        """Install a new grouping (after ``grouping.regroup``); dropped clients (group −1) belong to none."""
        self.groups = {c: int(g) for c, g in groups.items()}

    def group_ids(self) -> set[int]:
        return {g for g in self.groups.values() if g >= 0}

    def members(self, group: int) -> set[str]:
        return {c for c, g in self.groups.items() if g == group}

    def mixing_weight(self, staleness: int) -> float:
        return self.alpha * self.staleness(staleness)

    def submit(self, model: State, upd: Update) -> tuple[State, bool]:
        if upd.group is None:
            raise UpdateRejected(f"{upd.client}: Eco-FL takes one update per group (from a GroupRound)")
        if upd.group not in self.group_ids():
            raise UpdateRejected(f"{upd.client}: unknown group {upd.group}")
        _check_delta(model, upd)
        a = self.mixing_weight(_staleness(self.version, upd))
        if a <= 0.0:
            return model, False
        self.version += 1
        return _add(model, upd.delta, a), True

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "format": _FORMAT, "version": self.version, "groups": dict(self.groups)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        _check_loaded(self.name, d)
        self.version = int(d["version"])
        self.set_groups(d["groups"])


# ------------------------------------------------------------------------------------------------ SyncFedAvg


class SyncFedAvg:
    """Synchronous FedAvg (McMahan et al., arXiv 1602.05629) for comparison: wait for every expected client's
    delta against the current version, apply the sample-weighted mean, version += 1.

    ``flush`` closes a round with whoever answered: the deadline is the caller's, since time is not ours.
    """

    name = "fedavg"

    def __init__(self, clients: Iterable[str]) -> None:
        self.clients = frozenset(clients)
        if not self.clients:
            raise ValueError("SyncFedAvg needs at least one client")
        self.version = 0
        self._round: dict[str, tuple[State, int]] = {}

    def missing(self) -> set[str]:
        return set(self.clients - set(self._round))

    def submit(self, model: State, upd: Update) -> tuple[State, bool]:
        if upd.client not in self.clients:
            raise UpdateRejected(f"{upd.client}: not an expected client")
        _check_delta(model, upd)
        if _staleness(self.version, upd) > 0 or upd.client in self._round:
            return model, False  # a late answer to a closed round, or a duplicate
        self._round[upd.client] = (upd.delta, upd.num_samples)
        if len(self._round) < len(self.clients):
            return model, False
        return self.flush(model)

    def flush(self, model: State) -> tuple[State, bool]:
        if not self._round:
            return model, False
        mean = _weighted_mean([(d, float(n)) for d, n in self._round.values()])
        self._round = {}
        self.version += 1
        return _add(model, mean, 1.0), True

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": _FORMAT,
            "version": self.version,
            "clients": sorted(self.clients),
            "round": _pack_round(self._round),
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        _check_loaded(self.name, d)
        self.clients = frozenset(str(c) for c in d["clients"])
        self.version = int(d["version"])
        self._round = _unpack_round(d["round"])


# ------------------------------------------------------------------------------------------------ GroupRound


class GroupRound:
    """One synchronous FedAvg round inside an Eco-FL group (or a FedAT tier), with a deadline.

    ``ready(now)`` is True when a quorum of members has answered (``quorum`` = 1.0: all of them), or when the
    deadline has passed and at least one has [choice: Eco-FL waits for the group synchronously and is silent
    on stragglers; a deadline with a one-answer floor keeps a dead member from stalling its group, as in
    Flower's on-device deadlines, arXiv 2007.14390].
    """

    def __init__(
        self,
        group: int,
        members: Iterable[str],
        base_version: int,
        opened_at: float,
        deadline_s: float,
        quorum: float = 1.0,
    ) -> None:
        self.group = group
        self.members = frozenset(members)
        if not self.members:
            raise ValueError(f"group {group} has no members")
        if not 0.0 < quorum <= 1.0:
            raise ValueError(f"quorum must be in (0, 1], got {quorum}")
        if deadline_s < 0:
            raise ValueError(f"deadline_s must be >= 0, got {deadline_s}")
        self.base_version = base_version
        self.opened_at = opened_at
        self.deadline_s = deadline_s
        self.quorum = quorum
        # The tolerance keeps 0.7 × 10 = 7.000000000000001 from demanding 8 answers.
        self._needed = max(1, math.ceil(quorum * len(self.members) - 1e-9))
        self._received: dict[str, tuple[State, int]] = {}
        self.closed = False

    @property
    def received(self) -> set[str]:
        return set(self._received)

    def missing(self) -> set[str]:
        return set(self.members - set(self._received))

    def add(self, client: str, delta: State, num_samples: int) -> bool:
        """Record a member's delta; False for a non-member, a duplicate or a closed round."""
        if self.closed or client not in self.members or client in self._received:
            return False
        if num_samples < 0:
            raise UpdateRejected(f"{client}: num_samples must be >= 0, got {num_samples}")
        if self._received:
            first = next(iter(self._received.values()))[0]
            if set(first) != set(delta) or any(np.shape(first[k]) != np.shape(delta[k]) for k in first):
                raise UpdateRejected(f"{client}: delta keys or shapes differ from the group's other members")
        self._received[client] = (delta, num_samples)
        return True

    def ready(self, now: float) -> bool:
        n = len(self._received)
        return n >= self._needed or (now >= self.opened_at + self.deadline_s and n >= 1)

    def close(self) -> Update | None:
        """The members' sample-weighted mean delta as one ``Update``; None if nobody answered."""
        if self.closed:
            raise RuntimeError(f"group {self.group}'s round is already closed")
        self.closed = True
        if not self._received:
            return None
        items = list(self._received.values())
        return Update(
            client=f"group-{self.group}",
            delta=_f32(_weighted_mean([(d, float(n)) for d, n in items])),
            num_samples=sum(n for _, n in items),
            base_version=self.base_version,
            group=self.group,
        )


__all__ = [
    "EcoFLHybrid",
    "FedAT",
    "FedAsync",
    "FedBuff",
    "GroupRound",
    "State",
    "Strategy",
    "SyncFedAvg",
    "Update",
    "UpdateRejected",
]
