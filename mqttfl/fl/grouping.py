"""Eco-FL client grouping by response latency and label distribution (Ye et al., ICPP 2022).

Eco-FL groups clients so that a group's members answer at similar speeds (a synchronous round inside a group
waits for its slowest member) and the group's pooled label distribution is close to the fleet's (so every
group's update pulls toward the global optimum, not toward its own classes). Groups then mix asynchronously
(``strategies.EcoFLHybrid``).

Objective [choice: the paper states the two aims, not a formula]:

    J = Σ_g Σ_{n∈g} ((RT_n − RT̄_g) / RT̄_g)²  +  λ · Σ_g D(p_g ‖ p)

RT_n is client n's response latency, RT̄_g its group's mean; the squared *relative* deviation makes the latency
term scale-free, so a 1 s spread in a 2 s group costs as much as a 10 s spread in a 20 s group. p_g is the
group's pooled label histogram, normalised; p the fleet's (every profile given, dropped clients included: the
target is the population the model serves). D is the L1 distance (default) or a smoothed KL divergence.
Defaults G = 3, λ = 1 (docs/algorithms.md, "Eco-FL").

Privacy. A label histogram reveals a client's class mix to the cloud. Clients may opt out
(``histogram=None``): they then count only in the latency term, and a group whose members all opted out has no
label term. The cost of opting out is a grouping that cannot balance that client's labels.

Everything here is pure: latencies are measurements handed in by the caller, nothing is timed here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

DROPPED = -1
_KL_SMOOTHING = 1e-3

# A group's running sums: members, Σ latency, Σ latency², pooled label histogram.
_Sums = tuple[int, float, float, np.ndarray]


@dataclass(frozen=True, eq=False)
class ClientProfile:
    """What the cloud knows of a client: its measured response latency and, if shared, its label histogram."""

    client: str
    latency_s: float
    histogram: np.ndarray | None = None


@dataclass(frozen=True)
class GroupStats:
    """A group's mean latency L^g and the range RT^g of latencies it accepts.

    [choice] Eco-FL's Algorithm 1 tests |L^g − L_n| > RT^g without fixing RT^g; here RT^g = ``rel_range``·L^g
    with ``rel_range`` = 1 by default, i.e. a client leaves once it is more than twice as slow as its group.
    With ``rel_range`` ≥ 1 a client that becomes faster never leaves on latency alone: it only waits longer,
    it does not slow the group.
    """

    group: int
    members: tuple[str, ...]
    latency: float
    range: float

    def fits(self, latency_s: float) -> bool:
        return abs(self.latency - latency_s) <= self.range


# ------------------------------------------------------------------------------------------------- the cost


class _Costs:
    """Per-group cost from running sums, so a move or a swap is re-costed in O(classes), not O(clients)."""

    def __init__(self, profiles: Mapping[str, ClientProfile], lam: float, divergence: str) -> None:
        if divergence not in ("l1", "kl"):
            raise ValueError(f"divergence must be 'l1' or 'kl', got {divergence!r}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam, self.divergence = lam, divergence
        sizes = {np.shape(p.histogram) for p in profiles.values() if p.histogram is not None}
        if len(sizes) > 1 or any(len(s) != 1 for s in sizes):
            raise ValueError(f"label histograms must be 1-D and of one length, got shapes {sorted(sizes)}")
        self.classes = sizes.pop()[0] if sizes else 0
        self.lat: dict[str, float] = {}
        self.hist: dict[str, np.ndarray | None] = {}
        for name, p in profiles.items():
            if not np.isfinite(p.latency_s) or p.latency_s < 0:
                raise ValueError(f"{name}: latency must be finite and >= 0, got {p.latency_s}")
            self.lat[name] = float(p.latency_s)
            h = None if p.histogram is None else np.asarray(p.histogram, np.float64)
            if h is not None and (h < 0).any():
                raise ValueError(f"{name}: label histogram has negative counts")
            self.hist[name] = h
        total = sum((h for h in self.hist.values() if h is not None), np.zeros(self.classes))
        self.p = total / total.sum() if total.sum() > 0 else None

    def sums(self, members: Iterable[str]) -> _Sums:
        n, s1, s2, h = 0, 0.0, 0.0, np.zeros(self.classes)
        for m in members:
            n, s1, s2 = n + 1, s1 + self.lat[m], s2 + self.lat[m] ** 2
            hist = self.hist[m]
            if hist is not None:
                h = h + hist
        return n, s1, s2, h

    def plus(self, sums: _Sums, client: str, sign: int) -> _Sums:
        n, s1, s2, h = sums
        lat, hist = self.lat[client], self.hist[client]
        return (n + sign, s1 + sign * lat, s2 + sign * lat**2, h if hist is None else h + sign * hist)

    def cost(self, sums: _Sums) -> float:
        n, s1, s2, h = sums
        # Σ ((x − m)/m)² with m = s1/n equals n²·s2/s1² − n; clipped because rounding can take it below 0.
        latency = max(0.0, n * n * s2 / (s1 * s1) - n) if n > 0 and s1 > 0 else 0.0
        total = float(h.sum())
        if self.lam == 0 or self.p is None or total <= 0:
            return latency
        pg = h / total
        if self.divergence == "l1":
            d = float(np.abs(pg - self.p).sum())
        else:
            # Smoothing keeps KL finite when a group lacks a class the fleet has.
            q = (pg + _KL_SMOOTHING) / (1 + self.classes * _KL_SMOOTHING)
            r = (self.p + _KL_SMOOTHING) / (1 + self.classes * _KL_SMOOTHING)
            d = float((q * np.log(q / r)).sum())
        return latency + self.lam * d


def _by_name(profiles: Iterable[ClientProfile] | Mapping[str, ClientProfile]) -> dict[str, ClientProfile]:
    items = list(profiles.values()) if isinstance(profiles, Mapping) else list(profiles)
    out: dict[str, ClientProfile] = {}
    for p in items:
        if p.client in out:
            raise ValueError(f"client {p.client!r} profiled twice")
        out[p.client] = p
    return out


def _members(assign: Mapping[str, int], num_groups: int) -> list[list[str]]:
    groups: list[list[str]] = [[] for _ in range(num_groups)]
    for client, g in sorted(assign.items()):
        if g == DROPPED:
            continue
        if not 0 <= g < num_groups:
            raise ValueError(f"{client}: group {g} outside 0..{num_groups - 1} (or {DROPPED} for dropped)")
        groups[g].append(client)
    return groups


def objective(
    assign: Mapping[str, int],
    profiles: Iterable[ClientProfile] | Mapping[str, ClientProfile],
    num_groups: int,
    lam: float = 1.0,
    divergence: str = "l1",
) -> float:
    """J of an assignment (module docstring); dropped clients (group −1) count in no group."""
    by_name = _by_name(profiles)
    unknown = set(assign) - set(by_name)
    if unknown:
        raise ValueError(f"no profile for {sorted(unknown)}")
    costs = _Costs(by_name, lam, divergence)
    return sum(costs.cost(costs.sums(m)) for m in _members(assign, num_groups))


# ------------------------------------------------------------------------------------------------- forming


def initial_groups(
    profiles: Iterable[ClientProfile] | Mapping[str, ClientProfile], num_groups: int = 3
) -> dict[str, int]:
    """Clients sorted by latency (ties by name) cut into ``num_groups`` contiguous, near-equal groups."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    order = sorted(_by_name(profiles).values(), key=lambda p: (p.latency_s, p.client))
    chunks = np.array_split(np.arange(len(order)), num_groups)
    return {order[i].client: g for g, chunk in enumerate(chunks) for i in chunk}


def form_groups(
    profiles: Iterable[ClientProfile] | Mapping[str, ClientProfile],
    num_groups: int = 3,
    lam: float = 1.0,
    *,
    divergence: str = "l1",
    seed: int = 0,
    iters: int = 100,
) -> dict[str, int]:
    """Minimise J by local search from ``initial_groups``: moves of one client, then swaps of two, accepted
    while J strictly decreases, for at most ``iters`` passes [choice: the paper does not give its search].

    Deterministic for a given ``seed`` (it only orders the scan). Every client ends in exactly one group, and
    no group is emptied, so there is no empty group when there are at least ``num_groups`` clients. A pass
    costs O(N² · classes), fine for the tens to hundreds of clients one cloud groups.
    """
    by_name = _by_name(profiles)
    assign = initial_groups(by_name, num_groups)
    costs = _Costs(by_name, lam, divergence)
    names = sorted(by_name)
    groups = _members(assign, num_groups)
    sums = [costs.sums(m) for m in groups]
    cost = [costs.cost(s) for s in sums]
    rng = np.random.default_rng(seed)
    tol = 1e-12 * max(1.0, sum(cost))

    for _ in range(iters):
        improved = False
        order = [names[i] for i in rng.permutation(len(names))]
        for c in order:
            g = assign[c]
            if sums[g][0] <= 1:
                continue
            for h in range(num_groups):
                if h == g:
                    continue
                new_g, new_h = costs.plus(sums[g], c, -1), costs.plus(sums[h], c, +1)
                cg, ch = costs.cost(new_g), costs.cost(new_h)
                if cg + ch < cost[g] + cost[h] - tol:
                    sums[g], sums[h], cost[g], cost[h] = new_g, new_h, cg, ch
                    assign[c], g, improved = h, h, True
                    if sums[g][0] <= 1:
                        break
        for i, a in enumerate(order):
            for b in order[i + 1 :]:
                g, h = assign[a], assign[b]
                if g == h:
                    continue
                new_g = costs.plus(costs.plus(sums[g], a, -1), b, +1)
                new_h = costs.plus(costs.plus(sums[h], b, -1), a, +1)
                cg, ch = costs.cost(new_g), costs.cost(new_h)
                if cg + ch < cost[g] + cost[h] - tol:
                    sums[g], sums[h], cost[g], cost[h] = new_g, new_h, cg, ch
                    assign[a], assign[b], improved = h, g, True
        if not improved:
            break
    return assign


# ------------------------------------------------------------------------------------------------- regrouping


def group_stats(
    assign: Mapping[str, int],
    profiles: Iterable[ClientProfile] | Mapping[str, ClientProfile],
    num_groups: int,
    *,
    rel_range: float = 1.0,
) -> dict[int, GroupStats]:
    """L^g and RT^g of every non-empty group, from the profiled members' current latencies."""
    by_name = _by_name(profiles)
    out: dict[int, GroupStats] = {}
    for g, members in enumerate(_members(assign, num_groups)):
        known = tuple(m for m in members if m in by_name)
        if known:
            mean = float(np.mean([by_name[m].latency_s for m in known]))
            out[g] = GroupStats(g, known, mean, rel_range * mean)
    return out


def _label(g: int | None) -> str:
    return "new" if g is None else "dropped" if g == DROPPED else f"g{g}"


def regroup(
    assign: Mapping[str, int],
    profiles: Iterable[ClientProfile] | Mapping[str, ClientProfile],
    num_groups: int,
    lam: float = 1.0,
    *,
    divergence: str = "l1",
    rel_range: float = 1.0,
) -> tuple[dict[str, int], dict[str, str]]:
    """Eco-FL's Algorithm 1 on fresh latency measurements.

    For each profiled client n (in name order, each decision seeing the earlier ones): if |L^g − L_n| > RT^g
    for its group g, move n to the fitting group (|L^h − L_n| ≤ RT^h) with the smallest COST_n^h, the increase
    of J when n joins h; if none fits, drop n (group −1). A dropped client that fits a group again is
    re-admitted the same way, and so is a profiled client absent from ``assign`` (a newcomer).

    [choice] L^g excludes n itself, so a client whose latency jumps cannot drag its own group's mean along; a
    client alone in its group stays. Clients in ``assign`` without a profile keep their group.

    Returns the new assignment and the moves, ``{client: "g1->g2" | "g1->dropped" | "dropped->g0" |
    "new->g0"}``, for events and monitoring.
    """
    by_name = _by_name(profiles)
    if rel_range < 0:
        raise ValueError(f"rel_range must be >= 0, got {rel_range}")
    costs = _Costs(by_name, lam, divergence)
    new = dict(assign)
    groups = [set(m) for m in _members(new, num_groups)]
    moves: dict[str, str] = {}

    def latency_of(members: Iterable[str]) -> float | None:
        lats = [by_name[m].latency_s for m in members if m in by_name]
        return float(np.mean(lats)) if lats else None

    for client in sorted(by_name):
        lat = by_name[client].latency_s
        cur = new.get(client)
        if cur is not None and cur != DROPPED:
            ref = latency_of(groups[cur] - {client})
            if ref is None or abs(ref - lat) <= rel_range * ref:
                continue
        best: tuple[float, int] | None = None
        for h in range(num_groups):
            if h == cur:
                continue
            ref = latency_of(groups[h])
            if ref is None or abs(ref - lat) > rel_range * ref:
                continue
            before = costs.sums(m for m in groups[h] if m in by_name)
            rise = costs.cost(costs.plus(before, client, +1)) - costs.cost(before)
            if best is None or rise < best[0]:
                best = (rise, h)
        target = DROPPED if best is None else best[1]
        if target == cur:
            continue
        if cur is not None and cur != DROPPED:
            groups[cur].discard(client)
        if target != DROPPED:
            groups[target].add(client)
        new[client] = target
        moves[client] = f"{_label(cur)}->{_label(target)}"
    return new, moves


__all__ = [
    "DROPPED",
    "ClientProfile",
    "GroupStats",
    "form_groups",
    "group_stats",
    "initial_groups",
    "objective",
    "regroup",
]
