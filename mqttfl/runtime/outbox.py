"""On-disk outbox for must-deliver messages (model deltas; a migration recovers its checkpoint by its own
handshake and timeouts).

paho keeps its session in RAM only, so a QoS 1 publish that was not yet acknowledged is lost when the agent
dies (docs/design.md, "Transport"). Messages put here are appended to the node's journal first (made durable by
its barrier before they are published: ``Transport.publish``), re-sent after a
restart and on a timer until the receiver acknowledges them at the application level (an ``ack`` message naming the id);
receivers dedupe by id, so a re-send is harmless. Pure storage: the agent loop decides when to re-send.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack

from mqttfl.runtime.journal import Journal
from mqttfl.wire.topics import TopicError
from mqttfl.wire.topics import parse as parse_topic


@dataclass(frozen=True)
class OutboxEntry:
    key: str  # hex of the envelope id
    topic: str
    payload: bytes
    created: float
    last_sent: float


JOURNAL_FILE = "journal.log"
PREFIX = "outbox."  # the outbox's keys in a journal it shares with the node's keyed state


class Outbox:
    """Bounded set of pending messages in a journal (``journal``: the node's, shared with its keyed state;
    else one of its own in ``directory``), with an in-memory index so that the agent loop's frequent
    :meth:`due` calls read a payload only when it is due for a re-send. Files ``<key>.msg`` in ``directory``
    (the outbox's earlier format, one file per message) are folded into the journal at start."""

    def __init__(self, directory: str | Path, *, max_entries: int = 256, max_age_s: float = 86_400.0,
                 journal: Journal | None = None, prefix: str = PREFIX) -> None:
        """``prefix``: this outbox's keys in the journal (a process of virtual devices shares one journal among
        its nodes, each under its own prefix)."""
        self.prefix = prefix
        self.dir = Path(directory)  # its own journal's home; with the node's: where earlier versions kept files
        self.journal = journal if journal is not None else Journal(self.dir / JOURNAL_FILE)
        self.max_entries = max_entries
        self.max_age_s = max_age_s  # an unacknowledged message older than this is given up (and counted)
        self.expired = 0
        self._index: dict[str, tuple[str, float, float]] = {}  # key -> (topic, created, last_sent)
        self._fold_legacy()
        for name in self.journal.keys(self.prefix):
            e = self._read(name[len(self.prefix):])
            if e is not None:
                self._index[e.key] = (e.topic, e.created, 0.0)  # after a restart, everything is due at once

    def _fold_legacy(self) -> None:
        files = sorted(self.dir.glob("*.msg"), key=os.path.getmtime)
        done = []
        for p in files:
            try:
                self._check(p.stem)
                d = msgpack.unpackb(p.read_bytes(), raw=False)
                value = msgpack.packb({"topic": d["topic"], "payload": d["payload"], "created": float(d["created"])})
            except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
                done.append(p)  # a torn file cannot be re-sent
                continue
            try:
                self.journal.put(self.prefix + p.stem, value)
            except OverflowError:
                continue  # a full journal: the file stays for a later start
            done.append(p)
        if done:
            self.journal.sync()  # in the journal for good before the files go
            for p in done:
                p.unlink(missing_ok=True)
            if self.journal.path.parent != self.dir:
                with contextlib.suppress(OSError):
                    self.dir.rmdir()  # the earlier format's folder, empty now

    def _check(self, key: str) -> str:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad outbox key {key!r}")
        return self.prefix + key

    def put(self, key: str, topic: str, payload: bytes, now: float) -> None:
        if len(self._index) >= self.max_entries:
            raise OverflowError(f"outbox full ({self.max_entries} unacknowledged messages)")
        self.journal.put(self._check(key), msgpack.packb({"topic": topic, "payload": payload, "created": now}))
        self._index[key] = (topic, now, now)

    def sync(self) -> None:
        """The barrier before publishing: what was put is durable (and the keyed state sharing the journal)."""
        self.journal.sync()

    def destination(self, key: str) -> str | None:
        """The node the entry was sent to (the only one whose ack counts)."""
        entry = self._index.get(key)
        if entry is None:
            return None
        try:
            return parse_topic(entry[0]).dst
        except TopicError:
            return None

    def ack(self, key: str, by: str | None = None) -> bool:
        """Forget an entry its receiver applied; ``by``: the acknowledging node, which must be the receiver."""
        if key not in self._index or (by is not None and self.destination(key) != by):
            return False
        self._index.pop(key)
        # An acknowledged entry a power cut brings back is only re-sent, and receivers dedupe or acknowledge it
        # again: not worth an fdatasync of its own (a virtual device would pay one per round).
        self.journal.delete(self._check(key), durable=False)
        return True

    def mark_sent(self, key: str, now: float) -> None:
        if key in self._index:
            topic, created, _ = self._index[key]
            self._index[key] = (topic, created, now)

    def keys(self) -> list[str]:
        return sorted(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def _read(self, key: str) -> OutboxEntry | None:
        try:
            name = self._check(key)
            raw = self.journal.get(name)
            if raw is None:
                raise KeyError(key)
            d = msgpack.unpackb(raw, raw=False)
            return OutboxEntry(key, d["topic"], d["payload"], float(d["created"]), 0.0)
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            # Not a message we can re-send (the journal's CRC makes a torn value unlikely): forget it.
            if key in self._index or self.prefix + key in self.journal:
                self.journal.delete(self.prefix + key)
            self._index.pop(key, None)
            return None

    def pending(self) -> list[OutboxEntry]:
        out = []
        for key in sorted(self._index, key=lambda k: self._index[k][1]):
            e = self._read(key)
            if e is not None:
                out.append(OutboxEntry(key, e.topic, e.payload, e.created, self._index[key][2]))
        return out

    def due(self, now: float, resend_after: float) -> list[OutboxEntry]:
        out = []
        for key, (_, created, last_sent) in list(self._index.items()):
            if now - last_sent < resend_after:
                continue
            if last_sent and now - created > self.max_age_s:
                self.ack(key)  # the receiver is gone for good; keep the box from filling up
                self.expired += 1
                continue
            e = self._read(key)
            if e is not None:
                out.append(OutboxEntry(key, e.topic, e.payload, e.created, last_sent))
        return out
