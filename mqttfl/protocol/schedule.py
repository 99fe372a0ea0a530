"""1F1B pipeline schedules as data, their validation and simulation, an in-process executor (ALGORITHMS §4).

Theory of operation. Stages ``s = 0..S-1`` each own consecutive blocks (stage 0 owns the data, stage S-1
computes the loss); a mini-batch is cut into ``M`` micro-batches. A schedule is, per stage, the ordered list
of its actions ``F(i)`` (forward of micro-batch ``i``) and ``B(i)`` (its backward). Stage ``s`` runs
``K_s`` forwards (warm-up), then alternates one backward and one forward, then drains its backwards; all
stages step their optimizer once at the flush, so the result equals local SGD on the mini-batch.

``K_s`` (Eco-FL): PipeDream's ``S - s`` forwards in flight hide the round trip to the last stage only when
moving an activation costs nothing. Over a network every hop takes about as long as a stage's compute,
so it behaves like an extra stage and the round trip from stage ``s`` is ``2(S-s)-1`` slots long;
``K_s = min(M, 2(S-s)-1)`` is the smallest warm-up that keeps stage ``s`` busy (``hop_aware=True``,
the default). ``K_s`` is also the stash bound: at most ``K_s`` micro-batches' activations are held at once.

Dependencies between stages: stage ``s`` may run ``F(i)`` once stage ``s-1`` has, and ``B(i)`` once stage
``s+1`` has (the last stage's ``B(i)`` needs only its own ``F(i)``). :func:`validate` checks the schedule
per stage and then executes it in lock-step (one action per stage per step, an action seeing only
results of earlier steps); a schedule that cannot finish is reported with that step x stage grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mqttfl.ml.stage import micro_batches

Op = Literal["F", "B"]


class ScheduleError(ValueError):
    """A pipeline schedule that is malformed or cannot run; the message carries the step x stage grid."""


@dataclass(frozen=True)
class Action:
    stage: int
    op: Op
    micro: int

    def __str__(self) -> str:
        return f"{self.op}{self.micro}"


class Slot(NamedTuple):
    """One action of a simulated timeline."""

    action: Action
    start: float
    end: float


def _check_dims(num_stages: int, num_micro: int) -> None:
    if num_stages < 1 or num_micro < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got S={num_stages}, M={num_micro}")


def warmup(num_stages: int, num_micro: int, stage: int, hop_aware: bool = True) -> int:
    """K_s: forwards stage ``stage`` runs before its first backward, and its stash bound."""
    _check_dims(num_stages, num_micro)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    depth = num_stages - stage
    return min(num_micro, 2 * depth - 1 if hop_aware else depth)


def one_f_one_b(num_stages: int, num_micro: int, stage: int, *, hop_aware: bool = True) -> list[Action]:
    """This stage's ordered actions: K_s forwards, then (backward, forward) pairs, then the drain."""
    k = warmup(num_stages, num_micro, stage, hop_aware)
    actions = [Action(stage, "F", i) for i in range(k)]
    for i in range(num_micro - k):
        actions += [Action(stage, "B", i), Action(stage, "F", k + i)]
    actions += [Action(stage, "B", i) for i in range(num_micro - k, num_micro)]
    return actions


def schedules(num_stages: int, num_micro: int, *, hop_aware: bool = True) -> list[list[Action]]:
    """The 1F1B schedule of every stage."""
    return [one_f_one_b(num_stages, num_micro, s, hop_aware=hop_aware) for s in range(num_stages)]


def _dependency(a: Action, num_stages: int) -> Action | None:
    """The other stage's action ``a`` waits for (its own earlier actions are implied by list order)."""
    if a.op == "F":
        return Action(a.stage - 1, "F", a.micro) if a.stage > 0 else None
    return Action(a.stage + 1, "B", a.micro) if a.stage < num_stages - 1 else None


def lockstep(scheds: Sequence[Sequence[Action]]) -> tuple[list[list[Action | None]], list[list[Action]]]:
    """Run the schedules one action per stage per step; returns (steps x stages grid, unfinished actions).

    An action runs at a step only if its dependency ran at an earlier step. Never raises, so it can lay
    out broken schedules for error messages; a non-empty remainder means the schedule deadlocks.
    """
    num_stages = len(scheds)
    pos = [0] * num_stages
    done: set[Action] = set()
    grid: list[list[Action | None]] = []
    while True:
        row: list[Action | None] = [None] * num_stages
        for s, sched in enumerate(scheds):
            if pos[s] < len(sched):
                a = sched[pos[s]]
                dep = _dependency(a, num_stages) if a.stage == s else None
                if dep is None or dep in done:
                    row[s] = a
        if all(a is None for a in row):
            break
        for s, ran in enumerate(row):
            if ran is not None:
                pos[s] += 1
                done.add(ran)
        grid.append(row)
    return grid, [list(sched[pos[s] :]) for s, sched in enumerate(scheds)]


def format_grid(scheds: Sequence[Sequence[Action]]) -> str:
    """The lock-step execution as a step x stage table, then what each stuck stage still has to do."""
    grid, left = lockstep(scheds)
    width = 5
    lines = ["step " + "".join(f"s{s}".ljust(width) for s in range(len(scheds)))]
    for t, row in enumerate(grid):
        lines.append(f"{t:<5}" + "".join((str(a) if a else ".").ljust(width) for a in row))
    for s, rest in enumerate(left):
        if rest:
            lines.append(f"stage {s} stuck before: {' '.join(str(a) for a in rest[:8])}")
    return "\n".join(lines)


def _stage_problems(sched: Sequence[Action], s: int, num_micro: int, bound: int) -> list[str]:
    problems: list[str] = []
    seen: dict[tuple[Op, int], int] = {}
    live = 0
    for a in sched:
        if a.stage != s:
            problems.append(f"stage {s} lists an action of stage {a.stage}: {a}")
            continue
        if a.op not in ("F", "B") or not 0 <= a.micro < num_micro:
            problems.append(f"stage {s}: invalid action {a!r}")
            continue
        seen[(a.op, a.micro)] = seen.get((a.op, a.micro), 0) + 1
        if seen[(a.op, a.micro)] > 1:
            problems.append(f"stage {s}: {a} duplicated")
        if a.op == "B" and ("F", a.micro) not in seen:
            problems.append(f"stage {s}: {a} before its forward")
        live += 1 if a.op == "F" else -1
        if live > bound:
            problems.append(f"stage {s}: {live} micro-batches stashed at {a}, more than K_s={bound}")
    for op in ("F", "B"):
        missing = [i for i in range(num_micro) if (op, i) not in seen]
        if missing:
            problems.append(f"stage {s}: missing {op} for micro-batch(es) {missing}")
    return problems


def validate(
    scheds: Sequence[Sequence[Action]], num_stages: int, num_micro: int, *, hop_aware: bool = True
) -> None:
    """Raise :class:`ScheduleError` unless every stage does each F and B exactly once, after its own F,
    within its stash bound K_s, and the stages together run to completion without deadlock."""
    _check_dims(num_stages, num_micro)
    if len(scheds) != num_stages:
        raise ScheduleError(f"{len(scheds)} stage schedules for {num_stages} stages")
    problems: list[str] = []
    for s, sched in enumerate(scheds):
        problems += _stage_problems(sched, s, num_micro, warmup(num_stages, num_micro, s, hop_aware))
    if not problems:
        _, left = lockstep(scheds)
        problems += [f"stage {s} cannot run {rest[0]}: deadlock" for s, rest in enumerate(left) if rest]
    if problems:
        raise ScheduleError("\n".join(problems) + "\n" + format_grid(scheds))


def _per_stage(value: float | Sequence[float], num_stages: int, what: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * num_stages
    if len(value) != num_stages:
        raise ValueError(f"{what}: {len(value)} values for {num_stages} stages")
    return [float(v) for v in value]


def simulate(
    scheds: Sequence[Sequence[Action]],
    fwd_time: float | Sequence[float],
    bwd_time: float | Sequence[float],
    hop_time: float,
) -> tuple[float, list[list[Slot]]]:
    """Discrete-event timing of a schedule: (makespan, per-stage timeline).

    Each stage runs its actions in list order, one at a time; an action starts when the stage is free and
    its dependency has finished plus ``hop_time`` for the activation or gradient to cross the link.
    Times may be one number or one per stage.
    """
    num_stages = len(scheds)
    fwd = _per_stage(fwd_time, num_stages, "fwd_time")
    bwd = _per_stage(bwd_time, num_stages, "bwd_time")
    end: dict[Action, float] = {}
    free = [0.0] * num_stages
    pos = [0] * num_stages
    timeline: list[list[Slot]] = [[] for _ in range(num_stages)]
    progress = True
    # Each start time depends only on the stage's previous action and one dependency, so resolving actions
    # in any order in which those are known gives the exact event times.
    while progress:
        progress = False
        for s, sched in enumerate(scheds):
            while pos[s] < len(sched):
                a = sched[pos[s]]
                dep = _dependency(a, num_stages)
                if dep is not None and dep not in end:
                    break
                ready = end[dep] + hop_time if dep is not None else 0.0
                start = max(free[s], ready)
                free[s] = end[a] = start + (fwd[s] if a.op == "F" else bwd[s])
                timeline[s].append(Slot(a, start, free[s]))
                pos[s] += 1
                progress = True
    if any(pos[s] < len(sched) for s, sched in enumerate(scheds)):
        raise ScheduleError("schedule deadlocks\n" + format_grid(scheds))
    return max(free, default=0.0), timeline


def run_pipeline(
    stages: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer | None],
    x: torch.Tensor,
    y: torch.Tensor,
    num_micro: int,
    *,
    hop_aware: bool = True,
    step: bool = True,
) -> tuple[float, int]:
    """Train one mini-batch through ``S`` stages in process with the 1F1B schedule; (loss sum, correct).

    Activations are stashed per (stage, micro-batch) exactly as the distributed stages would hold them;
    the last stage scales each micro-batch's summed loss by 1/B so the accumulated grads are the
    mini-batch mean's. With ``step=False`` the grads are left accumulated (no flush), for inspection.
    """
    num_stages = len(stages)
    if len(optimizers) != num_stages:
        raise ValueError(f"{len(optimizers)} optimizers for {num_stages} stages")
    scheds = schedules(num_stages, num_micro, hop_aware=hop_aware)
    validate(scheds, num_stages, num_micro, hop_aware=hop_aware)
    micros = micro_batches(x, y, num_micro)
    batch = len(x)
    for stage in stages:
        stage.train()
    # (stage, micro) -> (stage input that may need a grad, stage output or, at the last stage, scaled loss)
    stash: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    acts: dict[tuple[int, int], torch.Tensor] = {}  # activations sent to stage s for micro i
    grads: dict[tuple[int, int], torch.Tensor] = {}  # gradients sent back to stage s for micro i
    loss_total, correct = 0.0, 0
    grid, _ = lockstep(scheds)
    for row in grid:
        for a in row:
            if a is None:
                continue
            s, i = a.stage, a.micro
            if a.op == "F":
                inp = micros[i][0] if s == 0 else acts.pop((s, i)).requires_grad_(True)
                out = stages[s](inp)
                if s == num_stages - 1:
                    loss_sum = F.cross_entropy(out, micros[i][1], reduction="sum")
                    loss_total += float(loss_sum.detach())
                    correct += int((out.detach().argmax(dim=1) == micros[i][1]).sum())
                    out = loss_sum / batch
                else:
                    acts[(s + 1, i)] = out.detach()
                stash[(s, i)] = (inp, out)
            else:
                inp, out = stash.pop((s, i))
                if s == num_stages - 1:
                    out.backward()
                else:
                    out.backward(grads.pop((s, i)))
                if s > 0:
                    assert inp.grad is not None
                    grads[(s - 1, i)] = inp.grad
    if step:
        for opt in optimizers:
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return loss_total, correct
