"""On-disk outbox for must-deliver messages (model deltas, checkpoints).

paho keeps its session in RAM only, so a QoS 1 publish that was not yet acknowledged is lost when the agent
dies (DESIGN §4). Messages put here are written atomically to disk first, re-sent after a restart and on a
timer until the receiver acknowledges them at the application level (an ``ack`` message naming the id);
receivers dedupe by id, so a re-send is harmless. Pure storage: the agent loop decides when to re-send.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgpack

from mqttfl.persist import atomic_write


@dataclass(frozen=True)
class OutboxEntry:
    key: str  # hex of the envelope id
    topic: str
    payload: bytes
    created: float
    last_sent: float


class Outbox:
    """Bounded directory of pending messages, one file each (``<key>.msg``)."""

    def __init__(self, directory: str | Path, *, max_entries: int = 256) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self._last_sent: dict[str, float] = {}

    def _path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad outbox key {key!r}")
        return self.dir / f"{key}.msg"

    def put(self, key: str, topic: str, payload: bytes, now: float) -> None:
        if len(self) >= self.max_entries:
            raise OverflowError(f"outbox full ({self.max_entries} unacknowledged messages)")
        atomic_write(self._path(key), msgpack.packb({"topic": topic, "payload": payload, "created": now}))
        self._last_sent[key] = now

    def ack(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, ValueError):
            return False
        self._last_sent.pop(key, None)
        return True

    def mark_sent(self, key: str, now: float) -> None:
        self._last_sent[key] = now

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.msg"))

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*.msg"))

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    def pending(self) -> list[OutboxEntry]:
        out = []
        for p in sorted(self.dir.glob("*.msg"), key=os.path.getmtime):
            try:
                d = msgpack.unpackb(p.read_bytes(), raw=False)
            except (OSError, ValueError, msgpack.UnpackException):
                p.unlink(missing_ok=True)  # a torn file cannot be re-sent; atomic_write makes this rare
                continue
            key = p.stem
            out.append(OutboxEntry(key, d["topic"], d["payload"], d["created"], self._last_sent.get(key, 0.0)))
        return out

    def due(self, now: float, resend_after: float) -> list[OutboxEntry]:
        return [e for e in self.pending() if now - e.last_sent >= resend_after]
