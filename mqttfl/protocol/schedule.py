"""1F1B pipeline schedules as data (Eco-FL; docs/design.md, "Stages").

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

GPipe (``gpipe``, for comparison): every forward of the mini-batch first, then every backward; stage ``s``
stashes all ``M`` micro-batches at once.

Dependencies between stages: stage ``s`` may run ``F(i)`` once stage ``s-1`` has, and ``B(i)`` once stage
``s+1`` has (the last stage's ``B(i)`` needs only its own ``F(i)``); the machines wait for those messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mqttfl.protocol.plan import PIPELINE_SCHEDULES as SCHEDULES

Op = Literal["F", "B"]


@dataclass(frozen=True)
class Action:
    stage: int
    op: Op
    micro: int

    def __str__(self) -> str:
        return f"{self.op}{self.micro}"


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


def stash_bound(num_stages: int, num_micro: int, stage: int, schedule: str = "1f1b") -> int:
    """The most micro-batches stage ``stage`` holds at once under ``schedule``: K_s for 1F1B, M for GPipe."""
    if schedule == "gpipe":
        _check_dims(num_stages, num_micro)
        return num_micro
    return warmup(num_stages, num_micro, stage)


def actions(num_stages: int, num_micro: int, stage: int, schedule: str = "1f1b") -> list[Action]:
    """This stage's ordered actions under ``schedule`` (``1f1b``: Eco-FL's, ``gpipe``: all forwards, then all
    backwards)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "gpipe":
        _check_dims(num_stages, num_micro)
        return [Action(stage, "F", i) for i in range(num_micro)] + [Action(stage, "B", i) for i in range(num_micro)]
    return one_f_one_b(num_stages, num_micro, stage)
