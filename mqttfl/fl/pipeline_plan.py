"""Eco-FL pipeline partitioning: which consecutive blocks each stage of a client's pipeline trains (pure maths).

Theory of operation (docs/algorithms.md, "Pipeline"). Stages ``k = 0..S-1`` stand in chain order: stage 0 owns
the data, stage ``S-1`` computes the loss; each gets a consecutive, non-empty range of the model's ``L`` blocks.
A stage's profile (:class:`StageCost`) gives, per block, the forward+backward time of one micro-batch *on that
stage*, the bytes of its weights and optimizer state and the bytes of activations it stashes per micro-batch, and
the memory the stage offers. A link's cost for a cut at boundary ``i`` is ``2 a_i / B`` (activations down,
gradients back). The planner minimises the slowest stage (the pipeline's steady-state period) with the DP

    A(j, 1) = sum_{l<j} t_l^(0)
    A(j, k) = min_{i<j} max{ A(i, k-1), 2 a_i / B_{k-2}, sum_{l=i..j-1} t_l^(k-1) }

subject to every stage's memory: weights and optimizer state of its blocks plus ``K_s`` stashed micro-batches
(``K_s`` of the schedule, ``mqttfl.protocol.schedule``) fitting what it offers. ``brute_force`` checks it on
small cases.

Rebalancing: the stages report a moving average of their time per micro-batch; :class:`Drift` says when the
slowest stage has exceeded the plan by ``threshold`` for ``windows`` windows in a row, and :func:`rescaled`
scales each stage's profile by measured / predicted before the DP runs again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

INF = math.inf


@dataclass(frozen=True)
class StageCost:
    """One stage's profile, per block of the model (all ``L`` blocks, whichever it trains now)."""

    block_s: tuple[float, ...]  # forward + backward of one micro-batch through the block, on this stage
    param_bytes: tuple[int, ...] = ()  # weights + optimizer state of the block (empty: not counted)
    act_bytes: tuple[int, ...] = ()  # activations the block stashes per micro-batch (empty: not counted)
    memory_bytes: int = 0  # what the stage offers for training; 0: no limit

    def time(self, start: int, stop: int) -> float:
        return float(sum(self.block_s[start:stop]))

    def memory(self, start: int, stop: int, stash: int) -> int:
        return int(sum(self.param_bytes[start:stop]) + stash * sum(self.act_bytes[start:stop]))

    def fits(self, start: int, stop: int, stash: int) -> bool:
        return self.memory_bytes <= 0 or self.memory(start, stop, stash) <= self.memory_bytes


@dataclass(frozen=True)
class Partition:
    """A plan: stage ``k`` trains blocks ``[bounds[k], bounds[k+1])``; predicted seconds per micro-batch."""

    bounds: tuple[int, ...]  # S+1 block indices, 0 first and L last
    stage_s: tuple[float, ...]  # compute per micro-batch on each stage
    link_s: tuple[float, ...]  # moving one micro-batch's activations and gradients over each of the S-1 links

    @property
    def cuts(self) -> tuple[int, ...]:
        return self.bounds[1:-1]

    @property
    def bottleneck_s(self) -> float:
        return max((*self.stage_s, *self.link_s), default=0.0)

    def ranges(self) -> list[tuple[int, int]]:
        return list(itertools.pairwise(self.bounds))

    def batch_s(self, micro: int) -> float:
        """Predicted time of one mini-batch of ``micro`` micro-batches with 1F1B and a flush: the first
        micro-batch crosses every stage and link down and back, the others follow at the bottleneck's pace."""
        return sum(self.stage_s) + sum(self.link_s) + max(micro - 1, 0) * self.bottleneck_s

    def bubble(self, micro: int) -> float:
        """Predicted fraction of stage time spent idle in a mini-batch (fill, drain and imbalance)."""
        t = self.batch_s(micro)
        return 0.0 if t <= 0 else max(0.0, 1.0 - micro * sum(self.stage_s) / (len(self.stage_s) * t))


def link_cost(boundary_bytes: Sequence[int], bandwidth: Sequence[float], link: int, boundary: int) -> float:
    """``2 a_i / B``: one micro-batch's activations at ``boundary`` down ``link`` and its gradients back."""
    b = bandwidth[link] if link < len(bandwidth) else INF
    if b <= 0 or b == INF or not boundary_bytes:
        return 0.0
    return 2.0 * boundary_bytes[boundary] / b


def evaluate(costs: Sequence[StageCost], bounds: Sequence[int], *, boundary_bytes: Sequence[int] = (),
             bandwidth: Sequence[float] = ()) -> Partition:
    """The predicted times of a given partition (``bounds``: S+1 block indices)."""
    b = tuple(int(v) for v in bounds)
    stage_s = tuple(costs[k].time(b[k], b[k + 1]) for k in range(len(costs)))
    link_s = tuple(link_cost(boundary_bytes, bandwidth, k, b[k + 1]) for k in range(len(costs) - 1))
    return Partition(b, stage_s, link_s)


def _check(costs: Sequence[StageCost], stash: Sequence[int]) -> int:
    if not costs:
        raise ValueError("a pipeline needs at least one stage")
    n = len(costs[0].block_s)
    if any(len(c.block_s) != n for c in costs):
        raise ValueError("every stage's profile must cover the same blocks")
    if len(stash) != len(costs):
        raise ValueError(f"{len(costs)} stages but {len(stash)} stash bounds")
    if n < len(costs):
        raise ValueError(f"{n} blocks cannot give {len(costs)} stages a block each")
    return n


def plan(costs: Sequence[StageCost], stash: Sequence[int], *, boundary_bytes: Sequence[int] = (),
         bandwidth: Sequence[float] = (), fixed: dict[int, int] | None = None) -> Partition | None:
    """The partition that minimises the slowest stage or link (the DP above), or None when no partition fits
    the stages' memory. ``stash[k]``: micro-batches stage k stashes at most (``K_s``). ``fixed``: boundaries
    that must stay where they are (boundary index k -> block), e.g. the last stage's start mid-round."""
    n = _check(costs, stash)
    s = len(costs)
    fixed = dict(fixed or {})
    # a[k][j]: best bottleneck with the first k stages on blocks [0, j); arg[k][j]: where stage k-1 starts.
    a = [[INF] * (n + 1) for _ in range(s + 1)]
    arg = [[-1] * (n + 1) for _ in range(s + 1)]
    a[0][0] = 0.0
    for k in range(1, s + 1):
        c = costs[k - 1]
        for j in range(k, n - (s - k) + 1):
            if fixed.get(k, j) != j:
                continue
            for i in range(k - 1, j):
                if a[k - 1][i] == INF or not c.fits(i, j, stash[k - 1]):
                    continue
                link = link_cost(boundary_bytes, bandwidth, k - 2, i) if k >= 2 else 0.0
                v = max(a[k - 1][i], link, c.time(i, j))
                if v < a[k][j] - 1e-15:
                    a[k][j], arg[k][j] = v, i
    if a[s][n] == INF:
        return None
    bounds = [n]
    for k in range(s, 0, -1):
        bounds.append(arg[k][bounds[-1]])
    return evaluate(costs, bounds[::-1], boundary_bytes=boundary_bytes, bandwidth=bandwidth)


def brute_force(costs: Sequence[StageCost], stash: Sequence[int], *, boundary_bytes: Sequence[int] = (),
                bandwidth: Sequence[float] = ()) -> Partition | None:
    """Every partition tried (the check of :func:`plan` on small cases)."""
    n = _check(costs, stash)
    best: Partition | None = None
    for cuts in itertools.combinations(range(1, n), len(costs) - 1):
        bounds = (0, *cuts, n)
        if not all(costs[k].fits(bounds[k], bounds[k + 1], stash[k]) for k in range(len(costs))):
            continue
        p = evaluate(costs, bounds, boundary_bytes=boundary_bytes, bandwidth=bandwidth)
        if best is None or p.bottleneck_s < best.bottleneck_s - 1e-15:
            best = p
    return best


def equal(n_blocks: int, stages: int) -> tuple[int, ...]:
    """The equal-layer partition's bounds: blocks spread as evenly as they go, the first stages one more."""
    if not 1 <= stages <= n_blocks:
        raise ValueError(f"cannot give {stages} stages a block each out of {n_blocks}")
    size, extra = divmod(n_blocks, stages)
    bounds = [0]
    for k in range(stages):
        bounds.append(bounds[-1] + size + (1 if k < extra else 0))
    return tuple(bounds)


def rescaled(costs: Sequence[StageCost], bounds: Sequence[int], measured_s: Sequence[float]) -> list[StageCost]:
    """Each stage's profile scaled by what it measured over what its profile predicts for its current blocks
    (a stage that measured nothing keeps its profile)."""
    out = []
    for k, c in enumerate(costs):
        predicted = c.time(bounds[k], bounds[k + 1])
        m = measured_s[k] if k < len(measured_s) else 0.0
        if predicted > 0 and m > 0:
            f = m / predicted
            c = replace(c, block_s=tuple(t * f for t in c.block_s))
        out.append(c)
    return out


@dataclass
class Drift:
    """Eco-FL's trigger: the slowest stage measured beyond ``(1 + threshold)`` x the plan's bottleneck for
    ``windows`` windows in a row (a window is one mini-batch). ``threshold`` 0 never triggers."""

    threshold: float
    windows: int
    count: int = 0

    def observe(self, measured_bottleneck: float, predicted_bottleneck: float) -> bool:
        if self.threshold <= 0 or predicted_bottleneck <= 0:
            return False
        if measured_bottleneck > (1.0 + self.threshold) * predicted_bottleneck:
            self.count += 1
        else:
            self.count = 0
        if self.count >= self.windows:
            self.count = 0
            return True
        return False
