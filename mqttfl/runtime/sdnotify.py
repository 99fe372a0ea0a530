"""The sd_notify protocol without a dependency: one datagram to ``$NOTIFY_SOCKET`` (docs/operations.md,
"Installing agents as systemd services").

The units run the agents with ``Type=notify`` and ``WatchdogSec=``: an agent says ``READY=1`` once it is
connected and subscribed, and ``WATCHDOG=1`` only while its main loop makes progress, so systemd restarts an
agent that hangs (a deadlocked queue, a blocked broker write) and not merely one that crashed.

Outside systemd ``NOTIFY_SOCKET`` is unset and every call is a no-op returning False, so agents call these
functions unconditionally. A leading ``@`` names a socket in the Linux abstract namespace (systemd uses one
for some containers); Python spells that with a leading NUL byte.

:class:`Watchdog` takes the time as a parameter, like the other cores, so its policy is tested without
sleeping.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

__all__ = ["Watchdog", "notify", "ready", "reloading", "status", "stopping", "watchdog_interval"]


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(state: str) -> bool:
    """Send one state string (``"READY=1"``, ``"STATUS=..."``, several joined by newlines).

    Returns whether a datagram was sent. Failures are swallowed: a service manager that went away must not
    take the agent down with it, and the watchdog turns a persistently failing notify into a restart anyway.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw or raw[0] not in "/@":
        # systemd only hands out filesystem paths and abstract names; anything else (vsock addresses from
        # newer systemd) is not ours to interpret.
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(raw))
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Startup finished: connected to the broker and subscribed. systemd starts dependent units now."""
    return notify("READY=1" if status_text is None else f"READY=1\nSTATUS={status_text}")


def stopping() -> bool:
    """A clean shutdown began (after SIGTERM): the watchdog stops counting against us."""
    return notify("STOPPING=1")


def reloading() -> bool:
    return notify("RELOADING=1")


def status(text: str) -> bool:
    """Free-form line shown by ``systemctl status`` (e.g. ``round 12, 8/10 devices``)."""
    return notify(f"STATUS={text.replace(chr(10), ' ')}")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1``, or None when no watchdog applies to us.

    ``WATCHDOG_PID`` names the process the watchdog is meant for: a child that inherited the environment
    must not feed it on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class Watchdog:
    """Feeds systemd's watchdog only while the main loop reports progress.

    The main loop calls :meth:`progress` whenever it handled a message or finished a step, and :meth:`tick`
    on every iteration. A ping goes out at most every ``interval / 2`` (systemd's recommendation, leaving
    half the interval for scheduling delays) and only if progress was reported since the previous ping: a
    loop that still spins but is stuck stops feeding, and systemd restarts the unit after ``interval``.
    An idle agent is not stuck; its loop wakes on a timeout and reports that as progress.
    """

    def __init__(self, interval: float | None, *, send: Callable[[str], object] = notify) -> None:
        self.interval = interval
        self._send = send
        self._progressed = False
        self.last_progress: float | None = None
        self._last_ping: float | None = None
        self.pings = 0

    @classmethod
    def from_env(cls) -> Watchdog:
        return cls(watchdog_interval())

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.interval > 0

    def progress(self, now: float) -> None:
        self._progressed = True
        # Kept for the agent's status line ("stalled for 40 s") when it logs why it stopped feeding.
        self.last_progress = now

    def due(self, now: float) -> bool:
        if not self.enabled or not self._progressed:
            return False
        assert self.interval is not None
        return self._last_ping is None or now - self._last_ping >= self.interval / 2

    def tick(self, now: float) -> bool:
        """Ping if due; returns whether a ping was sent."""
        if not self.due(now):
            return False
        self._send("WATCHDOG=1")
        self._last_ping = now
        self._progressed = False
        self.pings += 1
        return True
