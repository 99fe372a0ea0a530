"""The common agent loop: one thread owns all state; paho's thread only enqueues.

An agent = config + transport + a table of control commands + a ``handle`` method for its protocol.
Long operations (a device's local training) call :meth:`Agent.pump`, which keeps serving control
messages, presence and the systemd watchdog while they wait for the messages they need.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mqttfl.runtime import sdnotify
from mqttfl.runtime.config import AgentConfig
from mqttfl.runtime.log import get_logger
from mqttfl.runtime.outbox import Outbox
from mqttfl.runtime.transport import Inbound, Transport

CommandHandler = Callable[[Inbound, dict[str, Any]], Any]


class CommandError(Exception):
    """A control command that cannot be carried out; the message goes back in the reply."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class Shutdown(Exception):
    """Raised inside long operations when the agent has been asked to stop."""


class Agent:
    role = "agent"
    metrics_interval_s = 10.0
    resend_after_s = 5.0

    def __init__(self, cfg: AgentConfig, *, cloud_id: str = "cloud") -> None:
        self.cfg = cfg
        self.node = cfg.node
        self.cloud_id = cloud_id
        self.log = get_logger(node=cfg.node, role=self.role, fleet=cfg.fleet)
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else None
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(self.state_dir / "outbox") if self.state_dir else None
        self.transport = Transport(
            cfg, log=self.log, outbox=self.outbox, subscriptions=self.subscriptions(),
            status_fields=self.initial_status(),
        )
        self.running = True
        self.commands: dict[str, CommandHandler] = {
            "ping": self.cmd_ping,
            "status": self.cmd_status,
            "shutdown": self.cmd_shutdown,
        }
        interval = sdnotify.watchdog_interval()
        self.watchdog = sdnotify.Watchdog(interval) if interval else None
        self._last_metrics = 0.0
        self.started = time.time()

    # ----------------------------------------------------------------- hooks for roles
    def subscriptions(self) -> list[str]:
        return []

    def initial_status(self) -> dict[str, Any]:
        return {}

    def allowed_commanders(self) -> set[str]:
        return set(self.cfg.operators) | {self.cloud_id}

    def handle(self, msg: Inbound) -> None:
        """Protocol messages (everything except ctl)."""

    def tick(self, now: float) -> None:
        """Called every loop iteration: deadlines, timers."""

    def metrics_fields(self) -> dict[str, Any]:
        return {}

    def on_start(self) -> None:
        """After connect + subscribe, before READY=1."""

    # ----------------------------------------------------------------- loop
    def run(self, *, connect_timeout: float | None = 60.0) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.log.info("starting", broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}", boot=self.transport.boot)
        self.transport.start(timeout=connect_timeout)
        self.on_start()
        sdnotify.ready()
        self.log.info("ready")
        try:
            while self.running:
                msg = self.transport.get(timeout=0.05)
                if msg is not None:
                    self.dispatch(msg)
                self.housekeeping()
        except Shutdown:
            pass
        finally:
            self.stop()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.running = False

    def housekeeping(self) -> None:
        now = time.monotonic()
        if not self.running:
            raise Shutdown()
        self.transport.housekeeping(now, resend_after=self.resend_after_s)
        for change in self.transport.link_changes():
            self.on_link(change.up)
        try:
            self.tick(now)
        except Shutdown:
            raise
        except Exception as e:
            # Timers act on data that came from the wire (reports, deltas): a bug there must not kill the node.
            self.log.exception("timer failed")
            self.transport.drop("handler_error", f"tick: {type(e).__name__}: {e}", "")
        if now - self._last_metrics >= self.metrics_interval_s:
            self._last_metrics = now
            self.transport.metrics(kind="agent", transport=self.transport.stats_snapshot(), **self.metrics_fields())
        if self.watchdog is not None:
            self.watchdog.progress(now)
            self.watchdog.tick(now)

    def on_link(self, up: bool) -> None:
        self.log.info("link", up=up)

    def pump(self, timeout: float) -> Inbound | None:
        """Wait for the next protocol message while serving control messages and timers."""
        deadline = time.monotonic() + timeout
        while True:
            self.housekeeping()
            remaining = deadline - time.monotonic()
            msg = self.transport.get(timeout=min(max(remaining, 0.0), 0.05))
            if msg is not None:
                if msg.kind == "ctl":
                    self.on_ctl(msg)
                else:
                    return msg
            if remaining <= 0:
                return None

    def dispatch(self, msg: Inbound) -> None:
        try:
            if msg.kind == "ctl":
                self.on_ctl(msg)
            else:
                self.handle(msg)
        except Shutdown:
            raise
        except Exception as e:
            # A message that trips a bug must not take the node down with it: report it and go on.
            self.log.exception("handler failed", kind=msg.kind, src=msg.src)
            self.transport.drop("handler_error", f"{type(e).__name__}: {e}", str(msg.topic))

    def stop(self) -> None:
        sdnotify.stopping()
        self.log.info("stopping")
        self.transport.stop()

    # ----------------------------------------------------------------- control
    def on_ctl(self, msg: Inbound) -> None:
        data = msg.data or {}
        cmd_id = str(data.get("id", ""))
        cmd = data.get("cmd")
        reply: dict[str, Any] = {"id": cmd_id, "cmd": cmd, "node": self.node}
        if msg.src not in self.allowed_commanders() and msg.src != self.node:
            self.transport.drop("unauthorised", f"{msg.src} may not command {self.node}", str(msg.topic))
            reply.update(ok=False, error=f"unauthorised: {msg.src} may not command {self.node}",
                         code="unauthorised")
        elif not isinstance(cmd, str) or cmd not in self.commands:
            reply.update(ok=False, error=f"unknown command {cmd!r}; known: {sorted(self.commands)}",
                         code="unknown_command")
        else:
            args = data.get("args", {})
            if not isinstance(args, dict):
                reply.update(ok=False, error="'args' must be an object", code="bad_request")
            else:
                try:
                    result = self.commands[cmd](msg, args)
                    reply.update(ok=True, result=result)
                except CommandError as e:
                    reply.update(ok=False, error=str(e), code=e.code)
                except Shutdown:
                    raise
                except Exception as e:  # a command bug must not kill the agent
                    self.log.exception("command failed", cmd=cmd)
                    reply.update(ok=False, error=f"internal error: {e}", code="internal")
        if msg.src != self.node:
            self.transport.send_json("reply", msg.src, reply)
        self.log.info("ctl", cmd=cmd, src=msg.src, ok=reply.get("ok"))

    def cmd_ping(self, msg: Inbound, args: dict[str, Any]) -> Any:
        return {"pong": True, "ts": time.time()}

    def cmd_status(self, msg: Inbound, args: dict[str, Any]) -> Any:
        return {**self.transport.status, "uptime_s": round(time.time() - self.started, 1),
                "transport": self.transport.stats_snapshot(), **self.metrics_fields()}

    def cmd_shutdown(self, msg: Inbound, args: dict[str, Any]) -> Any:
        self.running = False
        return {"stopping": True}


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], *, default: Any = ...,
        check: Callable[[Any], bool] | None = None, why: str = "") -> Any:
    """Fetch and check one command argument, raising a CommandError that names it."""
    if name not in args:
        if default is ...:
            raise CommandError(f"missing argument '{name}'")
        return default
    value = args[name]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise CommandError(f"argument '{name}' must be a number")
    if not isinstance(value, kind):
        raise CommandError(f"argument '{name}' has the wrong type ({type(value).__name__})")
    if check is not None and not check(value):
        raise CommandError(f"argument '{name}' is out of range{': ' + why if why else ''}")
    return value
