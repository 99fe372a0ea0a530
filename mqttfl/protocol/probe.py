"""Measuring a device's link to its edge on the real connection (split-point planning, docs/algorithms.md).

The device sends :class:`~mqttfl.protocol.messages.Probe` messages to its edge, one at a time, and the edge
answers each with an :class:`~mqttfl.protocol.messages.Echo` of the size asked: ``REPEATS`` small ones (a few
hundred bytes: the round trip is latency) and ``REPEATS`` large ones (``LARGE`` bytes each way). With the
smallest round trip of each size, ``rtt(s) = 2 lat + 2 s / B``::

    lat = rtt_small / 2 - small / B
    B   = 2 (LARGE - SMALL) / (rtt_large - rtt_small)

The minimum over repeats filters out the time a probe waits behind the edge's other work. A probe without an
answer within the timeout ends the measurement with what it has: a large probe still out after ``t`` seconds
bounds the bandwidth by ``2 LARGE / t`` (a link that slow is reported as that slow); without even a small
answer the bandwidth is 0 (unknown: the cloud does not plan that device's cut from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mqttfl.protocol.messages import Echo, Probe

SMALL = 256
LARGE = 64 * 1024
REPEATS = 2


@dataclass
class LinkProbe:
    seq0: int  # probe sequence numbers start here (a device's probes never collide across rounds)
    sent_at: float = 0.0
    rtts: dict[int, list[float]] = field(default_factory=lambda: {SMALL: [], LARGE: []})
    seq: int = 0

    def __post_init__(self) -> None:
        self.seq = self.seq0

    @property
    def plan(self) -> list[int]:
        return [SMALL] * REPEATS + [LARGE] * REPEATS

    @property
    def done(self) -> bool:
        return self.seq - self.seq0 >= len(self.plan)

    def next(self, now: float) -> Probe:
        size = self.plan[self.seq - self.seq0]
        self.sent_at = now
        return Probe(seq=self.seq, reply_bytes=size, pad=np.zeros(size, np.uint8))

    def answered(self, echo: Echo, now: float) -> bool:
        """Record an echo; False for one that does not answer the probe in flight."""
        if self.done or echo.seq != self.seq:
            return False
        self.rtts[self.plan[self.seq - self.seq0]].append(max(now - self.sent_at, 1e-9))
        self.seq += 1
        return True

    def timed_out(self, now: float) -> None:
        """The probe in flight has not come back by ``now``: a large one's wait is a lower bound of its round trip."""
        if not self.done and self.plan[self.seq - self.seq0] == LARGE and not self.rtts[LARGE]:
            self.rtts[LARGE].append(max(now - self.sent_at, 1e-9))

    def result(self) -> tuple[float, float]:
        """(bandwidth in bytes per second, one-way latency in seconds); bandwidth 0 when not measured."""
        small, large = self.rtts[SMALL], self.rtts[LARGE]
        if not small or not large:
            return 0.0, (min(small) / 2 if small else 0.0)
        r_small, r_large = min(small), min(large)
        if r_large > r_small:
            bandwidth = 2.0 * (LARGE - SMALL) / (r_large - r_small)
        else:  # noise swamped the difference: all of the large round trip counts as transfer
            bandwidth = 2.0 * LARGE / r_large
        latency = max(0.0, r_small / 2 - SMALL / bandwidth)
        return bandwidth, latency
