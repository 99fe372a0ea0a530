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

import contextlib
import fcntl
import json
import os
import resource
import signal
import time
import uuid
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from mqttfl.protocol import events as E
from mqttfl.protocol import stage
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.messages import parse
from mqttfl.protocol.status import parse_status
from mqttfl.runtime import sdnotify
from mqttfl.runtime.config import AgentConfig
from mqttfl.runtime.journal import Journal
from mqttfl.runtime.log import get_logger
from mqttfl.runtime.loop import Backend, Machine, MachineRunner
from mqttfl.runtime.netloop import SocketLoop
from mqttfl.runtime.outbox import JOURNAL_FILE, Outbox
from mqttfl.runtime.outbox import PREFIX as OUTBOX_PREFIX
from mqttfl.runtime.persist import dumps, loads, save_state
from mqttfl.runtime.preload import Preload
from mqttfl.runtime.runs import RunStore
from mqttfl.runtime.transport import Inbound, Transport
from mqttfl.wire.codec import CodecError
from mqttfl.wire.encoding import decode_tensors
from mqttfl.wire.topics import BROADCAST, filter_for


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


GROUP_COMMIT_S = 0.02  # how long a node's effects may wait for the sync that makes the state they follow durable
KEYED_DIR = "keyed"  # the keyed states' earlier home, one file each (folded into the journal at start)
KEYED_PREFIX = "keyed."  # their keys in the node's journal, which they share with the outbox


def open_journal(state_dir: Path) -> Journal:
    """The node's journal (keyed state and outbox), with any keyed-state files an earlier version left folded
    in and removed, so an upgraded edge resumes its sessions."""
    journal = Journal(state_dir / JOURNAL_FILE)
    folded = []
    for path in sorted((state_dir / KEYED_DIR).glob("*.state")):
        try:
            journal.put(KEYED_PREFIX + path.stem, path.read_bytes())
        except (OSError, ValueError, OverflowError):
            continue  # left where it is (a full journal: nothing is lost)
        folded.append(path)
    if folded:
        journal.sync()  # in the journal for good before the files go
        for path in folded:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (state_dir / KEYED_DIR).rmdir()
    return journal


def load_keyed_states(state_dir: str | Path | None) -> dict[str, Any]:
    """Every keyed state a previous life of this node left (``Persist(state, key)``); one that cannot be read
    is skipped (the machine validates what it gets)."""
    out: dict[str, Any] = {}
    if not state_dir:
        return out
    path = Path(state_dir)
    lock = lock_state_dir(path, path.name)  # released before the node takes it for its life
    try:
        journal = open_journal(path)
        try:
            for name, data in journal.items(KEYED_PREFIX):
                try:
                    out[name[len(KEYED_PREFIX):]] = loads(data)
                except Exception:  # noqa: BLE001  a foreign value: the machine starts without it
                    continue
        finally:
            journal.close()
    finally:
        lock.close()
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """This process's CPU time (user + system) so far: the energy estimate's CPU time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


POWER_SENSORS = (Path("/sys/class/powercap/intel-rapl:0/energy_uj"), Path("/sys/class/powercap/intel-rapl/energy_uj"))


def board_energy_j() -> float:
    """The board's energy counter in joules where it exposes one (RAPL through powercap), else 0. The counter
    covers the whole package, not this process; it is what the hardware measures."""
    for path in POWER_SENSORS:
        try:
            return int(path.read_text().strip()) / 1e6
        except (OSError, ValueError):
            continue
    return 0.0
def process_age_s() -> float | None:
    """Seconds since this process started (the kernel's start time, so interpreter start-up and imports count);
    None where /proc does not say."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), counted after the name
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Node(MachineRunner):
    metrics_interval_s = 10.0
    resend_after_s = 5.0

    def __init__(self, cfg: AgentConfig, machine: Machine, backend: Backend | None = None, *,
                 cloud: str = "cloud", state_file: str = "", broadcasts: tuple[str, ...] = (),
                 keep_models: int = 0, edge_brokers: Mapping[str, tuple[str, int]] | None = None,
                 preload: Preload | None = None, driver: SocketLoop | None = None,
                 journal: Journal | None = None, edge_broadcasts: tuple[str, ...] = ()) -> None:
        """``preload``: the torch modules this node loads once it is online (a device). ``driver``: the network
        loop that serves this node's client, instead of a thread of its own (virtual devices). ``journal``: one
        shared with other nodes of this process, this node's keys under ``<node>/`` (virtual devices: one
        ``fdatasync`` per turn of their loop covers them all, instead of one per device and message).
        ``edge_broadcasts``: the kinds of broadcast this node hears from its current edge only (the edge its
        status names)."""
        self.cfg = cfg
        self.preload = preload
        self.name = cfg.node
        self.machine = machine
        self._backend = backend
        self.commanders = set(cfg.operators) | {cloud}
        self.logger = get_logger(node=cfg.node, role=cfg.role, fleet=cfg.fleet)
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else None
        self._lock = lock_state_dir(self.state_dir, cfg.node) if self.state_dir else None
        self.state_path = self.state_dir / state_file if self.state_dir and state_file else None
        self.runlog = self.state_dir / "runlog.jsonl" if self.state_dir else None
        self.runs = RunStore(self.state_dir, keep_models) if self.state_dir and state_file else None
        # A device roaming between sites: the broker of each edge's site; it follows its edge there.
        self.edge_brokers = dict(edge_brokers or {})
        self._move_to: tuple[str, int] | None = None
        # Keyed state and outbox share one journal, so one sync before a publish covers both.
        self._own_journal = journal is None
        self.journal = journal if journal is not None else open_journal(self.state_dir) if self.state_dir else None
        prefix = "" if journal is None else f"{cfg.node}/"
        self._keyed_prefix = prefix + KEYED_PREFIX
        self.outbox = (Outbox(self.state_dir / "outbox", journal=self.journal, prefix=prefix + OUTBOX_PREFIX)
                       if self.state_dir else None)
        # Every node hears what is addressed to it; broadcasts only of the kinds its role needs (the cloud:
        # status), so fleet-wide status traffic does not reach every board.
        subs = [filter_for(cfg.fleet, dst=cfg.node), *(filter_for(cfg.fleet, kind=k, dst="all") for k in broadcasts)]
        self.transport = Transport(cfg, log=self.logger, outbox=self.outbox, subscriptions=subs, inbox=False,
                                   status_fields=machine.presence(), driver=driver, group_commit=True)
        self.edge_broadcasts = edge_broadcasts
        edge = machine.presence().get("edge")
        # Subscribed from the first connection on: the configured edge's announcements wait in the session.
        self.follow((edge,) if isinstance(edge, str) else ())
        self.running = True
        self.timers: dict[Hashable, float] = {}
        self.watchdog = sdnotify.Watchdog(interval) if (interval := sdnotify.watchdog_interval()) else None
        self._last_metrics = 0.0
        self.started = time.time()
        self.cold_start_s: float | None = None  # process start to ready (connected, subscribed, Started handled)

    # ------------------------------------------------------------------ loop
    def run(self, *, connect_timeout: float | None = 60.0) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.go_online(connect_timeout)
        try:
            while self.running:
                self.step(timeout=0.05)
        except Shutdown:
            pass
        finally:
            self.stop()
        return 0

    def go_online(self, connect_timeout: float | None = 60.0) -> None:
        """Connect, subscribe, start the machine and say so: what :meth:`run` does before its loop (a process of
        virtual devices, ``mqttfl.tools.virtual``, does it for each of its nodes and steps them in turn)."""
        self.logger.info("starting", broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}", boot=self.transport.boot,
                       mqtt=self.cfg.mqtt.redacted())
        self.transport.start(timeout=connect_timeout)
        if self.journal is not None and self.journal.torn_bytes:
            # A crash mid-append: the unsynced tail was cut off when the journal was opened (nothing after a
            # barrier is lost).
            self.transport.event("journal_torn_tail", level="warning", bytes=self.journal.torn_bytes)
        here = (self.cfg.mqtt.host, self.cfg.mqtt.port)
        for broker in sorted(set(self.edge_brokers.values()) - {here}):
            # Open our session at the other sites now: what is sent to us there before we arrive is kept, the
            # broadcasts of that site's edges included (a round announced as we move there).
            site_edges = sorted(e for e, b in self.edge_brokers.items() if b == broker)
            extra = [filter_for(self.cfg.fleet, kind=k, src=e, dst=BROADCAST)
                     for e in site_edges for k in self.edge_broadcasts]
            if not self.transport.visit(*broker, extra=extra):
                self.logger.warning("site broker unreachable", broker=f"{broker[0]}:{broker[1]}")
        self.feed(E.Started(wall=time.time()))
        sdnotify.ready()
        age = process_age_s()
        self.cold_start_s = None if age is None else round(age, 3)
        self.logger.info("ready", cold_start_s=self.cold_start_s)
        if self.preload is not None:
            self.preload.load()  # online first, then the training stack (docs/design.md, "Runtime")
            self.logger.info("training stack loaded", seconds=round(self.preload.ready_s or 0.0, 3))

    def now(self) -> float:
        return time.monotonic()

    def wall_clock(self) -> float:
        return time.time()

    def step(self, timeout: float, *, chores: bool = True) -> bool:
        """Take at most one inbound message (waiting up to ``timeout`` or the next timer), then housekeeping;
        whether a message was taken. ``chores=False``: housekeeping only after a message (a process of many
        nodes does the idle ones' housekeeping at a slower pace)."""
        now = time.monotonic()
        due = min(self.timers.values(), default=now + timeout)
        msg = self.transport.get(timeout=0.0) if self.transport.deferred else None
        if msg is None:
            # Group commit: the inbox is drained, so one sync covers the writes of the messages just handled,
            # and then their acks and sends go out (docs/design.md, "The journal").
            self.transport.flush()
            msg = self.transport.get(timeout=max(0.0, min(timeout, due - now)))
        if msg is not None:
            self.dispatch(msg)
            if self.transport.deferred and time.monotonic() - self.transport.deferred_since > GROUP_COMMIT_S:
                self.transport.flush()  # a steady stream: its effects still go out within GROUP_COMMIT_S
        elif not chores:
            return False
        self.housekeeping()
        if self._move_to is not None:
            self.transport.flush()  # what the event said goes out on the old broker
            # After the event's effects went out on the old broker: the move, and whatever it said there.
            host, port = self._move_to
            self._move_to = None
            self.logger.info("moving to the site broker of the new edge", broker=f"{host}:{port}")
            if not self.transport.move_to(host, port):
                self.logger.warning("site broker not reached yet; retrying in the background", broker=f"{host}:{port}")
        return msg is not None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.running = False

    def housekeeping(self) -> None:
        now = time.monotonic()
        if not self.running:
            raise Shutdown()
        self.transport.housekeeping(now, resend_after=self.resend_after_s)
        for change in self.transport.link_changes():
            self.logger.info("link", up=change.up)
            self.feed(E.LinkChanged(change.up))
        for key, at in sorted(self.timers.items(), key=lambda kv: kv[1]):
            if at <= now and self.timers.get(key) == at:
                del self.timers[key]
                self.feed(E.TimerFired(key))
        if now - self._last_metrics >= self.metrics_interval_s:
            self._last_metrics = now
            self.transport.metrics(kind="agent", transport=self.transport.stats_snapshot(),
                                   peak_rss_mb=round(peak_rss_mb(), 1), cold_start_s=self.cold_start_s,
                                   **({"journal": self.journal.stats()} if self.journal is not None else {}),
                                   **self._load_time(), **self.machine.metrics())
        if self.watchdog is not None:
            self.watchdog.progress(now)
            self.watchdog.tick(now)

    def _load_time(self) -> dict[str, Any]:
        """A node that loads torch after going online: how long that took."""
        if self.preload is None:
            return {}
        ready = self.preload.ready_s
        return {"torch_load_s": None if ready is None else round(ready, 3)}

    def stop(self) -> None:
        sdnotify.stopping()
        self.logger.info("stopping")
        self.transport.flush()
        if self.journal is not None:
            self.journal.sync()  # the offline status below is published without the transport's barrier
        self.transport.stop()
        if self.journal is not None and self._own_journal:
            self.journal.close()

    # ------------------------------------------------------------------ events in
    def dispatch(self, msg: Inbound) -> None:
        if msg.kind == "ctl":
            self.on_ctl(msg.src, msg.data or {})
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
                tensors = decode_tensors(env.body, env.tensors)
                typed = parse(env.kind, env.run, env.round, env.body, tensors)
            except (ProtocolError, CodecError) as e:
                self.transport.drop(e.code, str(e), str(msg.topic))
                return
            self.feed(E.Received(msg.src, typed, env.id, sent_at=env.ts, received_at=time.time(),
                                 reliable=bool(env.body.get("reliable"))))

    # ------------------------------------------------------------------ effects out
    def send(self, dst: str, fx: E.Send) -> None:
        body, tensors = self.wire_form(fx)
        self.transport.send(fx.msg.kind, dst, body=body, tensors=tensors, run=fx.msg.run, round=fx.msg.round,
                            reliable=fx.reliable)

    def ack(self, received: E.Received) -> None:
        self.transport.ack_id(received.src, received.id, received.msg.kind, received.msg.run, received.msg.round)

    def set_timer(self, key: Hashable, at: float) -> None:
        self.timers[key] = at

    def cancel_timer(self, key: Hashable) -> None:
        self.timers.pop(key, None)

    def run_job(self, job: stage.Job) -> E.JobDone:
        self.transport.flush()  # what the message said so far goes out before a job holds the loop
        return super().run_job(job)

    def follow(self, edges: tuple[str, ...]) -> None:
        if self.edge_broadcasts:
            self.transport.follow(filter_for(self.cfg.fleet, kind=k, src=e, dst=BROADCAST)
                                  for e in edges for k in self.edge_broadcasts)

    def set_status(self, state: str, fields: dict[str, Any]) -> None:
        self.transport.set_status(state, **fields)
        broker = self.edge_brokers.get(str(fields.get("edge")))
        if broker is not None and broker != (self.transport.cfg.mqtt.host, self.transport.cfg.mqtt.port):
            self._move_to = broker

    def emit(self, event: str, level: str, fields: dict[str, Any]) -> None:
        self.transport.event(event, level=level, **fields)

    def publish_metrics(self, fields: dict[str, Any]) -> None:
        self.transport.metrics(**fields)

    def drop(self, reason: str, detail: str, src: str) -> None:
        self.transport.drop(reason, detail, src)

    def count(self, name: str, n: int) -> None:
        self.transport.count(name, n)

    def reply(self, dst: str, cmd_id: str, cmd: str, ok: bool, result: Any = None, error: str = "",
              code: str = "") -> None:
        body: dict[str, Any] = {"id": cmd_id, "cmd": cmd, "node": self.name, "ok": ok}
        body.update({"result": result} if ok else {"error": error, "code": code})
        if dst != self.name:
            self.transport.send_json("reply", dst, body)
        self.logger.info("ctl", cmd=cmd, src=dst, ok=ok)

    def persist(self, state: dict[str, Any] | None, key: str = "") -> None:
        if not key:
            if self.state_path is not None and state is not None:
                save_state(self.state_path, state)
            return
        if self.journal is None:
            return
        if state is None:
            self.journal.delete(self._keyed_prefix + key)
        else:
            self.journal.put(self._keyed_prefix + key, dumps(state))  # durable at the next publish (the barrier)

    def reconnect_within(self, seconds: float | None) -> None:
        self.transport.set_reconnect_cap(seconds)

    def run_log(self, entry: dict[str, Any]) -> None:
        # A round of a large fleet lists every device: encoded once for both logs.
        line = json.dumps(entry) + "\n"
        if self.runlog is not None:
            with open(self.runlog, "a") as f:
                f.write(line)
        if self.runs is not None:
            self.runs.history(entry, line)

    def save_model(self, fx: E.SaveModel) -> None:
        if self.runs is not None:
            self.runs.save(fx)

    def log(self, level: str, message: str, fields: dict[str, Any]) -> None:
        getattr(self.logger, level if level in ("debug", "info", "warning", "error") else "info")(message, **fields)

    def send_command(self, dst: str, cmd: str, args: dict[str, Any]) -> None:
        self.transport.send_json("ctl", dst, {"id": f"{cmd}-{uuid.uuid4().hex[:8]}", "cmd": cmd, "args": args})

    def meters(self) -> stage.Meters:
        s = self.transport.stats_snapshot()
        return stage.Meters(s.get("tx_bytes", 0), s.get("rx_bytes", 0), peak_rss_mb(), cpu_seconds(), board_energy_j())

    def backend(self) -> Backend | None:
        return self._backend

    def status_report(self) -> dict[str, Any]:
        return {**self.transport.status, "uptime_s": round(time.time() - self.started, 1),
                "cold_start_s": self.cold_start_s, "peak_rss_mb": round(peak_rss_mb(), 1),
                "transport": self.transport.stats_snapshot()}

    def shutdown(self) -> None:
        self.running = False

    def machine_failed(self, ev: E.Event, e: Exception) -> None:
        self.logger.exception("machine failed", event=type(ev).__name__)
        super().machine_failed(ev, e)

    def job_failed(self, job: stage.Job, e: Exception) -> None:
        self.logger.exception("job failed", job=type(job).__name__)
