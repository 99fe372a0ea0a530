"""Running one protocol machine: the core that the real node and the in-memory fleet share.

A :class:`MachineRunner` hands one event at a time to its machine and carries out the effects it returns, in
order. A job's result (``JobDone``) is fed back before anything else, so a machine sees its jobs complete in
the order it asked; an effect that names another node's input goes out through the subclass. Control
commands are authorised here: operators, the cloud and the node itself may command a node; ``ping``,
``status``, ``shutdown`` and ``emulate`` (a board's emulated speed, docs/operations.md "Emulated devices") are
answered by the runner, every other known command goes to the machine.

Subclasses say where the effects go: :class:`mqttfl.runtime.node.Node` to the MQTT transport, the disk and
the clock; :class:`mqttfl.runtime.memory.MemoryFleet` to other machines in the same process, on virtual time.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Any, Protocol

from mqttfl.protocol import events as E
from mqttfl.protocol import stage
from mqttfl.protocol.control import arg, may_command
from mqttfl.protocol.events import CommandError
from mqttfl.runtime.preload import DeferredBackend
from mqttfl.wire.encoding import encode_tensors, tensor_bytes

RUNTIME_COMMANDS = ("ping", "status", "shutdown", "emulate")


class Machine(Protocol):
    def handle(self, ev: E.Event, now: float) -> list[E.Effect]: ...

    def presence(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...

    @property
    def commands(self) -> tuple[str, ...]: ...


class Backend(Protocol):
    def run(self, job: stage.Job) -> Any: ...


class MachineRunner:
    """Feeds one machine; see the module docstring. Subclasses implement the I/O methods below."""

    name: str
    machine: Machine
    commanders: set[str]
    strict = False  # a machine that raises: False counts a drop and goes on, True lets it propagate (tests)

    # ------------------------------------------------------------------ the loop core
    def now(self) -> float:
        raise NotImplementedError

    def wall_clock(self) -> float:
        """The time a reply reports (wall clock where there is one)."""
        return self.now()

    def feed(self, event: E.Event) -> None:
        """Hand one event to the machine and carry out its effects; job results are fed back first."""
        queue: collections.deque[E.Event] = collections.deque([event])
        while queue:
            ev = queue.popleft()
            try:
                effects = self.machine.handle(ev, self.now())
            except Exception as e:
                if self.strict:
                    raise
                # A message that trips a bug must not take the node down with it: report it and go on.
                self.machine_failed(ev, e)
                continue
            for fx in effects:
                try:
                    self.execute(fx, queue)
                except Exception as e:
                    if self.strict:
                        raise
                    self.drop("effect_error", f"{type(fx).__name__}: {type(e).__name__}: {e}", "")

    def execute(self, fx: E.Effect, queue: collections.deque[E.Event]) -> None:
        if isinstance(fx, E.Send):
            self.send(fx.dst, fx)
        elif isinstance(fx, E.Run):
            queue.append(self.run_job(fx.job))
        elif isinstance(fx, E.SetTimer):
            self.set_timer(fx.key, fx.at)
        elif isinstance(fx, E.CancelTimer):
            self.cancel_timer(fx.key)
        elif isinstance(fx, E.Ack):
            self.ack(fx.received)
        elif isinstance(fx, E.SetStatus):
            self.set_status(str(fx.state), fx.fields)
        elif isinstance(fx, E.Emit):
            self.emit(fx.event, fx.level, fx.fields)
        elif isinstance(fx, E.Metrics):
            self.publish_metrics(fx.fields)
        elif isinstance(fx, E.Drop):
            self.drop(fx.reason, fx.detail, fx.src)
        elif isinstance(fx, E.Count):
            self.count(fx.name, fx.n)
        elif isinstance(fx, E.Reply):
            self.reply(fx.to.src, fx.to.id, fx.to.cmd, fx.ok, fx.result, fx.error, fx.code)
        elif isinstance(fx, E.Persist):
            self.persist(fx.state, fx.key)
        elif isinstance(fx, E.RunLog):
            self.run_log(fx.entry)
        elif isinstance(fx, E.SaveModel):
            self.save_model(fx)
        elif isinstance(fx, E.Log):
            self.log(fx.level, fx.message, fx.fields)
        elif isinstance(fx, E.SendCommand):
            self.send_command(fx.dst, fx.cmd, fx.args)
        elif isinstance(fx, E.ReconnectWithin):
            self.reconnect_within(fx.seconds)
        elif isinstance(fx, E.Follow):
            self.follow(fx.edges)
        else:
            raise TypeError(f"unknown effect {fx!r}")

    def wire_form(self, fx: E.Send) -> tuple[dict[str, Any], dict[str, Any]]:
        """The body and encoded tensors of a message to send; counts the tensor bytes before and after the
        encoding per kind (``raw_bytes_<kind>``, ``enc_bytes_<kind>``, published with the node's metrics)."""
        body, tensors = fx.msg.to_wire()
        wire = encode_tensors(fx.encoding, body, tensors)
        if tensors:
            self.count(f"raw_bytes_{fx.msg.kind}", tensor_bytes(tensors))
            self.count(f"enc_bytes_{fx.msg.kind}", tensor_bytes(wire))
        return body, wire

    def run_job(self, job: stage.Job) -> E.JobDone:
        if isinstance(job, stage.Measure):
            return E.JobDone(job, self.meters())
        backend = self.backend()
        if backend is None:
            return E.JobDone(job, error=f"{self.name} runs no training")
        try:
            return E.JobDone(job, backend.run(job))
        except Exception as e:  # a failed job is the machine's business, not the loop's
            self.job_failed(job, e)
            return E.JobDone(job, error=f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------ control
    def on_ctl(self, src: str, data: dict[str, Any]) -> None:
        cmd_id, cmd, args = str(data.get("id", ""))[:64], data.get("cmd"), data.get("args", {})
        if not may_command(src, self.name, self.commanders):
            self.drop("unauthorised", f"{src} may not command {self.name}", src)
            self.reply(src, cmd_id, str(cmd), False, error=f"unauthorised: {src} may not command {self.name}",
                       code="unauthorised")
        elif not isinstance(cmd, str) or not isinstance(args, dict):
            self.reply(src, cmd_id, str(cmd), False, error="'cmd' must be a string and 'args' an object",
                       code="bad_request")
        elif cmd not in (known := sorted({*RUNTIME_COMMANDS, *self.machine.commands})):
            self.reply(src, cmd_id, cmd, False, error=f"unknown command {cmd!r}; known: {known}",
                       code="unknown_command")
        elif cmd == "ping":
            self.reply(src, cmd_id, cmd, True, {"pong": True, "ts": self.wall_clock()})
        elif cmd == "status":
            extra: dict[str, Any] = getattr(self.machine, "status_fields", dict)()
            self.reply(src, cmd_id, cmd, True, {**self.status_report(), **self.machine.metrics(), **extra})
        elif cmd == "shutdown":
            self.reply(src, cmd_id, cmd, True, {"stopping": True})
            self.shutdown()
        elif cmd == "emulate":
            try:
                slowdown = arg(args, "slowdown", (int, float), default=None, check=lambda v: v >= 1)
                block_ms = arg(args, "block_ms", (int, float), default=None, check=lambda v: v >= 0)
            except CommandError as e:
                self.reply(src, cmd_id, cmd, False, error=str(e), code=e.code)
                return
            self.reply(src, cmd_id, cmd, True, self.emulate(slowdown, block_ms))
        else:
            self.feed(E.Command(src, cmd_id, cmd, args))

    def emulate(self, slowdown: float | None, block_ms: float | None) -> dict[str, Any]:
        """Change this board's emulated speed (benchmarks, tests): the backend's ``slowdown`` and ``block_ms``."""
        found = self.backend()
        if found is None:
            return {}
        backend: Any = found.built() if isinstance(found, DeferredBackend) else found
        if slowdown is not None:
            backend.slowdown = float(slowdown)
        if block_ms is not None:
            backend.block_ms = float(block_ms)
        return {"slowdown": getattr(backend, "slowdown", None), "block_ms": getattr(backend, "block_ms", None)}

    # ------------------------------------------------------------------ I/O, per subclass
    def send(self, dst: str, fx: E.Send) -> None:
        raise NotImplementedError

    def ack(self, received: E.Received) -> None:
        raise NotImplementedError

    def set_timer(self, key: Hashable, at: float) -> None:
        raise NotImplementedError

    def cancel_timer(self, key: Hashable) -> None:
        raise NotImplementedError

    def set_status(self, state: str, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def emit(self, event: str, level: str, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def publish_metrics(self, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def drop(self, reason: str, detail: str, src: str) -> None:
        raise NotImplementedError

    def count(self, name: str, n: int) -> None:
        raise NotImplementedError

    def reply(self, dst: str, cmd_id: str, cmd: str, ok: bool, result: Any = None, error: str = "",
              code: str = "") -> None:
        raise NotImplementedError

    def persist(self, state: dict[str, Any] | None, key: str = "") -> None:
        raise NotImplementedError

    def reconnect_within(self, seconds: float | None) -> None:
        raise NotImplementedError

    def follow(self, edges: tuple[str, ...]) -> None:
        raise NotImplementedError

    def run_log(self, entry: dict[str, Any]) -> None:
        raise NotImplementedError

    def save_model(self, fx: E.SaveModel) -> None:
        raise NotImplementedError

    def log(self, level: str, message: str, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def send_command(self, dst: str, cmd: str, args: dict[str, Any]) -> None:
        raise NotImplementedError

    def meters(self) -> stage.Meters:
        raise NotImplementedError

    def backend(self) -> Backend | None:
        raise NotImplementedError

    def status_report(self) -> dict[str, Any]:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def machine_failed(self, ev: E.Event, e: Exception) -> None:
        self.drop("handler_error", f"{type(ev).__name__}: {type(e).__name__}: {e}", "")

    def job_failed(self, job: stage.Job, e: Exception) -> None:
        pass
