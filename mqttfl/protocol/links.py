"""The two ends of a split link: activations go down, gradients come back (docs/design.md, "Stages").

Every stage but the last sends activations downstream and waits for their gradients (:class:`Downstream`);
every stage but the first receives activations from upstream and answers each with a gradient
(:class:`Upstream`). The rules that make a lossy link exactly-once live here, once:

- the sender keeps every activation until its gradient arrives and re-sends all of them when a gradient is
  overdue or the link comes back;
- the receiver takes activations in (step, micro) order only, answers a re-sent one from a cache of the
  gradients it returned, and so never trains on a micro-batch twice.

The device is a first stage (one ``Downstream``), the edge a last stage (one ``Upstream`` per device); a
pipeline stage in the middle holds one of each.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.messages import Activations, Gradients

Key = tuple[int, int]
GRAD_CACHE = 16  # >= the most micro-batches of one mini-batch that can be re-sent at once


@dataclass
class Downstream:
    """What a stage sent downstream and still needs a gradient for."""

    timeout_s: float
    outstanding: dict[Key, Activations] = field(default_factory=dict)
    grads: dict[Key, Gradients] = field(default_factory=dict)
    last_send: float = 0.0
    blocked_since: float | None = None  # waiting for a gradient since
    resends: int = 0

    def sent(self, act: Activations, now: float) -> None:
        self.outstanding[act.key] = act
        self.last_send = now

    def accept(self, g: Gradients) -> bool:
        """Keep a gradient for an outstanding micro-batch; False for the answer to a re-send we already have.
        ProtocolError when it cannot be the gradient of what we sent."""
        sent = self.outstanding.get(g.key)
        if sent is None or g.key in self.grads:
            return False
        if g.g.shape != sent.x.shape or g.g.dtype != np.float32:
            raise ProtocolError("bad_shape", f"grad {g.g.shape} for activations {sent.x.shape}")
        self.grads[g.key] = g
        return True

    def settled(self, key: Key) -> None:
        """The gradient for ``key`` is back-propagated: forget the micro-batch."""
        self.outstanding.pop(key, None)
        self.grads.pop(key, None)

    @property
    def due(self) -> float:
        """When the oldest wait becomes overdue (the re-send timer's time)."""
        return self.last_send + self.timeout_s

    def resend(self, now: float) -> list[Activations]:
        """Everything still outstanding, to send again (the receiver answers what it has from its cache)."""
        self.resends += len(self.outstanding)
        self.last_send = now
        return list(self.outstanding.values())


@dataclass
class Upstream:
    """Activations a stage takes from upstream: in order, each answered once, re-sends from the cache."""

    expected: Key = (0, 0)  # next (step, micro) to process
    n_micro: int = 0
    cache: OrderedDict[Key, Gradients] = field(default_factory=OrderedDict)

    def answered(self, act: Activations) -> Gradients | None:
        """The gradient already returned for this micro-batch, if it is a re-send of one we processed."""
        return self.cache.get(act.key)

    def take(self, act: Activations) -> bool:
        """Accept the next micro-batch in order (ProtocolError otherwise); True when it completes its mini-batch
        (the stage steps its optimizer: one flush per mini-batch)."""
        if act.key != self.expected:
            raise ProtocolError("out_of_order", f"act {act.key}, expected {self.expected}")
        if act.micro > 0 and act.n_micro != self.n_micro:
            raise ProtocolError("bad_field", f"n_micro changed mid-batch ({self.n_micro} -> {act.n_micro})")
        self.n_micro = act.n_micro
        last = act.micro + 1 == act.n_micro
        self.expected = (act.step + 1, 0) if last else (act.step, act.micro + 1)
        return last

    def remember(self, g: Gradients) -> None:
        self.cache[g.key] = g
        # At least a whole mini-batch: a pipelined device that redoes one on a new layout re-sends all of it.
        while len(self.cache) > max(GRAD_CACHE, self.n_micro):
            self.cache.popitem(last=False)

    @property
    def at_boundary(self) -> bool:
        """No micro-batch of a mini-batch is half done (where a migration may happen)."""
        return self.expected[1] == 0
