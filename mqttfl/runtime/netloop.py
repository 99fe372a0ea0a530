"""One network loop for many MQTT clients: the sockets of every transport in one ``selectors`` selector.

A :class:`Transport` built with ``driver=SocketLoop()`` has no network thread of its own (docs/design.md,
"Transport"): paho tells it when its socket opens or closes and when it has bytes to write (the external event
loop callbacks), the transport tells the loop, and whoever owns the loop calls :meth:`SocketLoop.poll`, which
reads and writes the sockets that are ready and, every ``TEND_S``, lets each transport do what paho's own loop
would (keepalive pings, the reconnect after a jittered backoff). ``DefaultSelector`` is epoll on Linux: no
limit on file descriptor numbers, unlike paho's select(), so one process holds thousands of clients
(``mqttfl virtual``, docs/operations.md, "Virtual devices"). Everything happens on the calling thread.

A connection attempt is paho's ``reconnect()``: a blocking TCP connect (and TLS handshake) of at most paho's
``connect_timeout`` (5 s). A refused or local connection returns at once; a broker host that silently drops
packets stalls the whole loop for that long per attempt, so the loop suits a broker on the same network.
"""

from __future__ import annotations

import resource
import selectors
import time
from typing import Any, Protocol

TEND_S = 0.1  # reconnect timing and keepalive granularity (paho's own loop wakes at least once a second)


class Driven(Protocol):
    """What the loop needs of a transport."""

    def on_readable(self) -> None: ...

    def on_writable(self) -> None: ...

    def tend(self, now: float) -> None: ...

    def wants_write(self) -> bool: ...


class Barrier(Protocol):
    def sync(self) -> Any: ...


class SocketLoop:
    """The sockets of many transports, served from the thread that calls :meth:`poll`."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.transports: dict[int, Driven] = {}
        self.ready: set[Any] = set()  # transports with something new for their owner (messages, link changes)
        self._tend_at = 0.0
        self._flush: dict[Driven, Any] = {}  # transports with bytes to write, and their sockets
        self._blocked: set[Driven] = set()  # transports whose socket was full: the selector waits for room
        self._barriers: dict[int, Barrier] = {}  # by identity: nodes sharing a journal add it once

    def add_barrier(self, barrier: Barrier) -> None:
        """A journal (or anything with ``sync()``) to make durable before any byte of this loop's sockets is
        written: the transports it serves publish without their own barrier, so several nodes' writes between two
        turns of the loop cost one ``fdatasync`` per journal (group commit; docs/design.md, "The journal")."""
        self._barriers[id(barrier)] = barrier

    def _barrier(self) -> None:
        for b in self._barriers.values():
            b.sync()

    def add(self, t: Driven) -> None:
        self.transports[id(t)] = t

    def remove(self, t: Driven) -> None:
        self.transports.pop(id(t), None)
        self.ready.discard(t)
        self._flush.pop(t, None)
        self._blocked.discard(t)

    # ------------------------------------------------------------------ from the transports' paho callbacks
    def opened(self, t: Driven, sock: Any) -> None:
        self.closed(sock)  # a descriptor number the kernel reused before we heard of its close
        self._flush.pop(t, None)  # whatever was said of the previous socket
        self._blocked.discard(t)
        self.selector.register(sock, selectors.EVENT_READ, t)

    def closed(self, sock: Any) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def want_write(self, t: Driven, sock: Any, on: bool) -> None:
        """paho has bytes to write for ``t`` (or no longer). They are written at the next :meth:`poll` without
        asking the selector: a socket almost always has room, and two epoll_ctl calls per message were a twentieth
        of a virtual fleet's CPU. Only a full socket is watched for room."""
        if on:
            self._flush[t] = sock
            return
        self._flush.pop(t, None)
        if t in self._blocked:
            self._blocked.discard(t)
            self._watch(t, sock, write=False)

    def _watch(self, t: Driven, sock: Any, *, write: bool) -> None:
        try:
            self.selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0), t)
        except (KeyError, ValueError):
            pass  # closed meanwhile

    def _write_pending(self) -> None:
        if self._flush:
            self._barrier()
        while self._flush:
            t, sock = self._flush.popitem()
            t.on_writable()
            if t.wants_write() and t not in self._blocked:
                self._blocked.add(t)
                self._watch(t, sock, write=True)

    # ------------------------------------------------------------------ the owner's thread
    def poll(self, timeout: float) -> int:
        """Wait up to ``timeout`` for sockets to be ready, serve them, and tend the transports when due; how many
        sockets were ready."""
        self._write_pending()
        events = self.selector.select(max(0.0, timeout)) if self.selector.get_map() else self._idle(timeout)
        for key, mask in events:
            t = key.data
            if mask & selectors.EVENT_READ:
                t.on_readable()
            if mask & selectors.EVENT_WRITE:
                self._barrier()
                t.on_writable()
        now = time.monotonic()
        if now >= self._tend_at:
            self._tend_at = now + TEND_S
            for t in list(self.transports.values()):
                t.tend(now)
        return len(events)

    def next_tend(self) -> float:
        return self._tend_at

    @staticmethod
    def _idle(timeout: float) -> list[Any]:
        time.sleep(max(0.0, min(timeout, TEND_S)))  # nothing registered (all links down): epoll has nothing to wait on
        return []

    def close(self) -> None:
        self.selector.close()


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (at most the hard limit, which only root
    may raise); the soft limit now in force. A virtual device holds two descriptors (its socket, its state
    directory's lock) and briefly a third while its outbox writes; the default soft limit is often 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
