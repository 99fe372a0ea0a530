"""The runtime loop: one thread feeds a protocol machine its events and carries out its effects.

Theory of operation (docs/design.md, "Runtime"). paho's network thread only enqueues (``Transport``). This
loop takes one inbound message at a time, turns it into an event (a typed message, a status, a command),
hands it to the machine with the monotonic clock as ``now``, and executes the effects the machine returns,
in order: messages are published, timers armed, stage jobs run on the training backend (their results are
fed back as ``JobDone`` events before the next message is read, so a machine sees its jobs complete in the
order it asked), state written atomically, statuses, events and metrics published. Timers fire from the
same loop. Nothing else touches the machine, so it needs no locks.

Control: the node answers ``ping``, ``status`` and ``shutdown`` itself; any other command from an allowed
commander (an operator, the cloud, the node itself) goes to the machine.
"""

from __future__ import annotations

import collections
import fcntl
import json
import resource
import signal
import time
import uuid
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Protocol

from mqttfl.protocol import events as E
from mqttfl.protocol import stage
from mqttfl.protocol.control import may_command
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.messages import parse
from mqttfl.protocol.status import parse_status
from mqttfl.runtime import sdnotify
from mqttfl.runtime.config import AgentConfig
from mqttfl.runtime.log import get_logger
from mqttfl.runtime.outbox import Outbox
from mqttfl.runtime.persist import save_state
from mqttfl.runtime.transport import Inbound, Transport
from mqttfl.wire.topics import filter_for


class Machine(Protocol):
    def handle(self, ev: E.Event, now: float) -> list[E.Effect]: ...

    def presence(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...


class Backend(Protocol):
    def run(self, job: stage.Job) -> Any: ...


class Shutdown(Exception):
    """Raised inside the loop when the node has been asked to stop."""


def lock_state_dir(path: Path, node: str) -> Any:
    """Hold an exclusive lock on the node's state directory for the life of the process: two agents with
    the same node id on one host would share an outbox and a boot counter and corrupt both."""
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"another agent already runs as {node!r} with state directory {path}") from None
    return f


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


RUNTIME_COMMANDS = ("ping", "status", "shutdown")


class Node:
    metrics_interval_s = 10.0
    resend_after_s = 5.0

    def __init__(self, cfg: AgentConfig, machine: Machine, backend: Backend | None = None, *,
                 cloud: str = "cloud", state_file: str = "", broadcasts: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.node = cfg.node
        self.machine = machine
        self.backend = backend
        self.cloud = cloud
        self.log = get_logger(node=cfg.node, role=cfg.role, fleet=cfg.fleet)
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else None
        self._lock = lock_state_dir(self.state_dir, cfg.node) if self.state_dir else None
        self.state_path = self.state_dir / state_file if self.state_dir and state_file else None
        self.runlog = self.state_dir / "runlog.jsonl" if self.state_dir else None
        self.outbox = Outbox(self.state_dir / "outbox") if self.state_dir else None
        # Every node hears what is addressed to it; broadcasts only of the kinds its role needs (the cloud:
        # status), so fleet-wide status traffic does not reach every board.
        subs = [filter_for(cfg.fleet, dst=cfg.node), *(filter_for(cfg.fleet, kind=k, dst="all") for k in broadcasts)]
        self.transport = Transport(cfg, log=self.log, outbox=self.outbox, subscriptions=subs, inbox=False,
                                   status_fields=machine.presence())
        self.running = True
        self.timers: dict[Hashable, float] = {}
        self.watchdog = sdnotify.Watchdog(interval) if (interval := sdnotify.watchdog_interval()) else None
        self._last_metrics = 0.0
        self.started = time.time()

    # ------------------------------------------------------------------ loop
    def run(self, *, connect_timeout: float | None = 60.0) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.log.info("starting", broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}", boot=self.transport.boot)
        self.transport.start(timeout=connect_timeout)
        self.feed(E.Started())
        sdnotify.ready()
        self.log.info("ready")
        try:
            while self.running:
                self.step(timeout=0.05)
        except Shutdown:
            pass
        finally:
            self.stop()
        return 0

    def step(self, timeout: float) -> None:
        now = time.monotonic()
        due = min(self.timers.values(), default=now + timeout)
        msg = self.transport.get(timeout=max(0.0, min(timeout, due - now)))
        if msg is not None:
            self.dispatch(msg)
        self.housekeeping()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.running = False

    def housekeeping(self) -> None:
        now = time.monotonic()
        if not self.running:
            raise Shutdown()
        self.transport.housekeeping(now, resend_after=self.resend_after_s)
        for change in self.transport.link_changes():
            self.log.info("link", up=change.up)
            self.feed(E.LinkChanged(change.up))
        for key, at in sorted(self.timers.items(), key=lambda kv: kv[1]):
            if at <= now and self.timers.get(key) == at:
                del self.timers[key]
                self.feed(E.TimerFired(key))
        if now - self._last_metrics >= self.metrics_interval_s:
            self._last_metrics = now
            self.transport.metrics(kind="agent", transport=self.transport.stats_snapshot(),
                                   peak_rss_mb=round(peak_rss_mb(), 1), **self.machine.metrics())
        if self.watchdog is not None:
            self.watchdog.progress(now)
            self.watchdog.tick(now)

    def stop(self) -> None:
        sdnotify.stopping()
        self.log.info("stopping")
        self.transport.stop()

    # ------------------------------------------------------------------ events in
    def dispatch(self, msg: Inbound) -> None:
        if msg.kind == "ctl":
            self.on_ctl(msg)
        elif msg.kind == "status" and msg.data is not None:
            try:
                presence = parse_status(msg.src, msg.data)
            except ProtocolError as e:
                self.transport.drop(e.code, str(e), str(msg.topic))
                return
            self.feed(E.StatusSeen(presence, msg.retained))
        elif msg.env is not None:
            env = msg.env
            try:
                typed = parse(env.kind, env.run, env.round, env.body, env.tensors)
            except ProtocolError as e:
                self.transport.drop(e.code, str(e), str(msg.topic))
                return
            self.feed(E.Received(msg.src, typed, env.id, sent_at=env.ts, received_at=time.time(),
                                 reliable=bool(env.body.get("reliable"))))

    def feed(self, event: E.Event) -> None:
        """Hand one event to the machine and carry out its effects; job results are fed back first."""
        queue: collections.deque[E.Event] = collections.deque([event])
        while queue:
            ev = queue.popleft()
            try:
                effects = self.machine.handle(ev, time.monotonic())
            except Exception as e:
                # A message that trips a bug must not take the node down with it: report it and go on.
                self.log.exception("machine failed", event=type(ev).__name__)
                self.transport.drop("handler_error", f"{type(ev).__name__}: {type(e).__name__}: {e}", "")
                continue
            for fx in effects:
                try:
                    self.execute(fx, queue)
                except Shutdown:
                    raise
                except Exception as e:
                    self.log.exception("effect failed", effect=type(fx).__name__)
                    self.transport.drop("effect_error", f"{type(fx).__name__}: {type(e).__name__}: {e}", "")

    # ------------------------------------------------------------------ effects out
    def execute(self, fx: E.Effect, queue: collections.deque[E.Event]) -> None:
        t = self.transport
        if isinstance(fx, E.Send):
            body, tensors = fx.msg.to_wire()
            t.send(fx.msg.kind, fx.dst, body=body, tensors=tensors, run=fx.msg.run, round=fx.msg.round,
                   reliable=fx.reliable)
        elif isinstance(fx, E.Run):
            queue.append(self.run_job(fx.job))
        elif isinstance(fx, E.SetTimer):
            self.timers[fx.key] = fx.at
        elif isinstance(fx, E.CancelTimer):
            self.timers.pop(fx.key, None)
        elif isinstance(fx, E.Ack):
            r = fx.received
            t.ack_id(r.src, r.id, r.msg.kind, r.msg.run, r.msg.round)
        elif isinstance(fx, E.SetStatus):
            t.set_status(str(fx.state), **fx.fields)
        elif isinstance(fx, E.Emit):
            t.event(fx.event, level=fx.level, **fx.fields)
        elif isinstance(fx, E.Metrics):
            t.metrics(**fx.fields)
        elif isinstance(fx, E.Drop):
            t.drop(fx.reason, fx.detail, fx.src)
        elif isinstance(fx, E.Count):
            t.count(fx.name, fx.n)
        elif isinstance(fx, E.Reply):
            self.reply(fx.to.src, fx.to.id, fx.to.cmd, fx.ok, fx.result, fx.error, fx.code)
        elif isinstance(fx, E.Persist):
            if self.state_path is not None:
                save_state(self.state_path, fx.state)
        elif isinstance(fx, E.RunLog):
            if self.runlog is not None:
                with open(self.runlog, "a") as f:
                    f.write(json.dumps(fx.entry) + "\n")
        elif isinstance(fx, E.Log):
            getattr(self.log, fx.level if fx.level in ("debug", "info", "warning", "error") else "info")(
                fx.message, **fx.fields)
        elif isinstance(fx, E.SendCommand):
            t.send_json("ctl", fx.dst, {"id": f"{fx.cmd}-{uuid.uuid4().hex[:8]}", "cmd": fx.cmd, "args": fx.args})
        else:
            raise TypeError(f"unknown effect {fx!r}")

    def run_job(self, job: stage.Job) -> E.JobDone:
        if isinstance(job, stage.Measure):
            s = self.transport.stats_snapshot()
            return E.JobDone(job, stage.Meters(s.get("tx_bytes", 0), s.get("rx_bytes", 0), peak_rss_mb()))
        if self.backend is None:
            return E.JobDone(job, error=f"{self.cfg.role} runs no training")
        try:
            return E.JobDone(job, self.backend.run(job))
        except Exception as e:  # a failed job is the machine's business, not the loop's
            self.log.exception("job failed", job=type(job).__name__)
            return E.JobDone(job, error=f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------ control
    def reply(self, dst: str, cmd_id: str, cmd: str, ok: bool, result: Any = None, error: str = "",
              code: str = "") -> None:
        body: dict[str, Any] = {"id": cmd_id, "cmd": cmd, "node": self.node, "ok": ok}
        if ok:
            body["result"] = result
        else:
            body.update(error=error, code=code)
        if dst != self.node:
            self.transport.send_json("reply", dst, body)
        self.log.info("ctl", cmd=cmd, src=dst, ok=ok)

    def on_ctl(self, msg: Inbound) -> None:
        data = msg.data or {}
        cmd_id, cmd, args = str(data.get("id", ""))[:64], data.get("cmd"), data.get("args", {})
        commanders = set(self.cfg.operators) | {self.cloud}
        if not may_command(msg.src, self.node, commanders):
            self.transport.drop("unauthorised", f"{msg.src} may not command {self.node}", str(msg.topic))
            self.reply(msg.src, cmd_id, str(cmd), False, error=f"unauthorised: {msg.src} may not command {self.node}",
                       code="unauthorised")
            return
        if not isinstance(cmd, str):
            self.reply(msg.src, cmd_id, str(cmd), False, error="'cmd' must be a string", code="bad_request")
            return
        if not isinstance(args, dict):
            self.reply(msg.src, cmd_id, cmd, False, error="'args' must be an object", code="bad_request")
            return
        if cmd == "ping":
            self.reply(msg.src, cmd_id, cmd, True, {"pong": True, "ts": time.time()})
        elif cmd == "shutdown":
            self.running = False
            self.reply(msg.src, cmd_id, cmd, True, {"stopping": True})
        elif cmd == "status":
            extra = getattr(self.machine, "status_fields", dict)()
            self.reply(msg.src, cmd_id, cmd, True, {
                **self.transport.status, "uptime_s": round(time.time() - self.started, 1),
                "transport": self.transport.stats_snapshot(), **self.machine.metrics(), **extra})
        else:
            self.feed(E.Command(msg.src, cmd_id, cmd, args))
