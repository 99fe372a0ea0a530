"""The queue between paho's network thread and the agent's loop: bounded, and fair across senders.

Why (docs/design.md, "Trust" and "Transport"): one queue for everyone let a single sender that floods a node
fill it, and then every other sender's messages were dropped (``inbox_full``). Here each sender has its own
queue, bounded in messages and bytes, and a token bucket of messages per second; the agent's loop takes one
message per sender in turn. A flooding sender therefore fills, and loses, only its own queue: others wait
behind at most one of its messages. ``src`` is the topic's sender level, which the broker authenticates, so a
node cannot spend another node's budget. Order is kept per sender (MQTT promises no more).

``put`` runs on paho's thread and must never block; ``get`` belongs to the agent's thread. Refusals are
returned as a reason for the transport to count and report from its own thread.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

MAX_IDLE_SENDERS = 4096  # token buckets kept for senders with nothing queued; the oldest are forgotten


@dataclass(slots=True)
class _Queue:
    # A sender with nothing queued keeps only its token bucket: an empty deque costs ~600 bytes, and a cloud
    # hears from thousands of devices that are idle between their messages.
    items: collections.deque[tuple[Any, int]] | None = None
    bytes: int = 0
    tokens: float = 0.0
    refilled: float = 0.0


class FairInbox:
    def __init__(self, *, max_messages: int, max_bytes: int, sender_messages: int, sender_bytes: int,
                 sender_rate: float) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.sender_messages = sender_messages
        self.sender_bytes = sender_bytes
        self.sender_rate = sender_rate
        self.burst = max(1.0, 2.0 * sender_rate)  # two seconds' worth, so a legitimate burst passes
        self._cv = threading.Condition()
        self._queues: collections.OrderedDict[str, _Queue] = collections.OrderedDict()
        self._turns: collections.deque[str] = collections.deque()  # senders with queued items, in turn
        self._count = 0
        self._bytes = 0

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    def queued_by(self, src: str) -> tuple[int, int]:
        """Messages and bytes queued from ``src``."""
        with self._cv:
            q = self._queues.get(src)
            return (len(q.items or ()), q.bytes) if q is not None else (0, 0)

    def put(self, src: str, item: Any, nbytes: int, now: float | None = None) -> str | None:
        """Queue ``item`` from ``src``; the reason it was refused, or None. Never blocks."""
        now = time.monotonic() if now is None else now
        with self._cv:
            q = self._queues.get(src)
            if q is None:
                q = self._queues[src] = _Queue(tokens=self.burst, refilled=now)
                self._forget_idle(src)
            self._queues.move_to_end(src)
            q.tokens = min(self.burst, q.tokens + (now - q.refilled) * self.sender_rate)
            q.refilled = now
            if q.tokens < 1.0:
                return "rate_limited"
            if len(q.items or ()) >= self.sender_messages or q.bytes + nbytes > self.sender_bytes:
                return "sender_queue_full"
            if self._count >= self.max_messages or self._bytes + nbytes > self.max_bytes:
                return "inbox_full"
            q.tokens -= 1.0
            if not q.items:
                self._turns.append(src)
            if q.items is None:
                q.items = collections.deque()
            q.items.append((item, nbytes))
            q.bytes += nbytes
            self._count += 1
            self._bytes += nbytes
            self._cv.notify()
            return None

    def get(self, timeout: float = 0.0) -> Any | None:
        """The next item, taking senders in turn; None when nothing arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cv:
            while not self._turns:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cv.wait(remaining)
            src = self._turns.popleft()
            q = self._queues[src]
            assert q.items is not None  # a sender takes a turn only with something queued
            item, nbytes = q.items.popleft()
            q.bytes -= nbytes
            self._count -= 1
            self._bytes -= nbytes
            if q.items:
                self._turns.append(src)
            else:
                q.items = None
            return item

    def _forget_idle(self, keep: str) -> None:
        while len(self._queues) > MAX_IDLE_SENDERS:
            victim = next((k for k, q in self._queues.items() if not q.items and k != keep), None)
            if victim is None:
                return
            del self._queues[victim]
