"""An in-memory fleet: the real protocol machines wired together in one process, on virtual time.

The machines (``mqttfl.protocol``) are pure: events in, effects out. This module plays everything around
them that a deployment provides — the runtime loop (``mqttfl.runtime.node.Node``), the transport
(``mqttfl.runtime.transport.Transport``) and the broker between nodes — so that a whole fleet of real
``DeviceMachine``, ``EdgeMachine`` and ``CloudMachine`` instances, each with its own ``TorchBackend``, trains
in milliseconds and takes faults that are hard to force on real processes.

Model of the world (what it keeps from the real runtime, and why):

* Time is virtual. ``fleet.now`` moves only when the next scheduled thing (a message arrival, a timer, an
  outbox re-send) is taken from the fleet's queue; nothing sleeps, so a 120 s deadline costs nothing.
* A node is one thread, like ``Node``: it handles one event at a time, runs the jobs its machine asks for
  inline (``compute_s`` virtual seconds each, on the node's own clock, or what the node's emulated speed says:
  ``block_ms`` per block and ``slowdown``, :class:`EmulatedCompute`) and feeds their results back before
  anything else. A message arriving while a node computes waits for it, so a node's clock may run ahead of
  ``fleet.now``; whatever it sends leaves at its own clock.
* Messages take ``latency_s`` per link (``set_latency`` per link), plus their size over the link's bandwidth
  where one is set (``set_bandwidth``; wire mode only). By default they go through the tensor
  encoding, the real codec and the typed parser, so a field that does not survive serialisation breaks here
  as it would on the wire (``wire=False`` hands the typed message over instead). Receivers drop ids they
  have seen (``Transport``'s dedupe); reliable messages stay in the sender's outbox and are re-sent every
  ``resend_after_s`` until their receiver (no other node) acknowledges them. The outbox survives a kill (it is
  on disk in the real runtime), and so do an edge's saved sessions (``Persist`` with a key), which a
  restarted edge reads back.
* Presence is the nodes' retained status: ``SetStatus`` merges into the node's status like
  ``Transport.set_status`` and reaches the cloud as ``StatusSeen``; a killed node's last will says offline;
  a (re)started cloud receives every retained status. The broker keeps a killed node's session: messages for
  it wait and are delivered when it restarts.
* ``Emit``/``Metrics``/``Drop``/``Count``/``Log``/``RunLog``/``SaveModel``/``Reply`` are recorded, with the
  node's name, for tests to assert on (``events``, ``metrics``, ``drops``, ``counts``, ``models``, ...);
  ``Persist`` keeps the last state (through the state-file serialiser) to rebuild a restarted cloud;
  ``ReconnectWithin`` is recorded (``reconnect_cap``). Control commands are authorised and answered like
  ``Node.on_ctl``; ``SendCommand`` travels as a ``ctl`` message.

Faults are rules on packets (:class:`Fault`): drop, duplicate, delay or reorder the packets a predicate
(:func:`match`) selects, a given number of times; ``kill``/``restart`` take nodes down and up. Chunking, the
periodic agent metrics and link-state changes (see ``inject``) are not modelled.

    fleet = MemoryFleet(seed=0)
    fleet.add_cloud(model="mlp", input_shape=[64], rounds=2, min_devices=2, test=test)
    fleet.add_edge("edge1")
    fleet.add_device("dev1", edge="edge1", data=shard1)
    fleet.add_device("dev2", edge="edge1", data=shard2, cut=5)
    fleet.add_helper("help1", serve=("dev1",))     # a middle stage of dev1's pipeline ([cloud] chains)
    fleet.drop(match("grad", dst="dev1"))
    fleet.start()
    fleet.run_to_end()
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import random
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.data import Dataset
from mqttfl.ml.models import initial_state, schema_of
from mqttfl.ml.shard import label_counts, label_format
from mqttfl.protocol import events as E
from mqttfl.protocol import stage
from mqttfl.protocol.cloud.machine import CloudMachine
from mqttfl.protocol.cloud.roles import ROLE_KEYS, Roles
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.protocol.device import DeviceMachine
from mqttfl.protocol.edge import EdgeMachine
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.helper import HelperDevice, StageServer
from mqttfl.protocol.messages import Message, parse
from mqttfl.protocol.status import parse_status
from mqttfl.runtime.config import CloudRuntime
from mqttfl.runtime.loop import Machine, MachineRunner
from mqttfl.runtime.persist import dumps, loads
from mqttfl.wire import encoding
from mqttfl.wire.codec import CodecError, Envelope, decode, decode_json, encode, encode_json
from mqttfl.wire.dedupe import RecentIds
from mqttfl.wire.encoding import decode_tensors
from mqttfl.wire.topics import BROADCAST

Compute = float | Callable[[stage.Job], float]
LIVELOCK_STEPS = 100_000  # things done at one virtual instant before the fleet calls it a livelock


class FleetLayout(Protocol):
    """What :meth:`MemoryFleet.from_spec` reads of a fleet description (``mqttfl.tools.testbed.FleetSpec``)."""

    devices: dict[str, str]
    model: str
    input_shape: tuple[int, ...]
    cloud: dict[str, Any]
    device_extra: dict[str, dict[str, Any]]
    edge_extra: dict[str, Any]
    helpers: dict[str, tuple[str, ...]]
    helper_extra: dict[str, dict[str, Any]]

    @property
    def edges(self) -> list[str]: ...


class Stalled(AssertionError):
    """``run_until`` ran out of virtual time or of things to do before its predicate held."""


@dataclass
class Packet:
    """One message between two nodes, as fault rules see it."""

    src: str
    dst: str
    kind: str  # wire kind: model, act, grad, delta, ckpt, ack, status, ctl
    msg: Any = None  # the typed Message (binary kinds except ack); Any, so predicates read its fields
    data: dict[str, Any] | None = None  # the JSON body (status, ctl)
    env: Envelope | None = None
    payload: bytes = b""  # the encoded envelope (wire mode)
    reliable: bool = False
    resend: int = 0  # 0: first transmission; n: the n-th re-send from the outbox
    retained: bool = False

    @property
    def op(self) -> str:
        return str(self.msg.op) if self.msg is not None else ""


def match(kind: str | None = None, *, msg_type: type | None = None, src: str | None = None, dst: str | None = None,
          where: Callable[[Packet], bool] | None = None) -> Callable[[Packet], bool]:
    """A packet predicate for fault rules: every given condition must hold."""
    def pred(p: Packet) -> bool:
        return ((kind is None or p.kind == kind) and (msg_type is None or isinstance(p.msg, msg_type))
                and (src is None or p.src == src) and (dst is None or p.dst == dst) and (where is None or where(p)))
    return pred


@dataclass
class Fault:
    """A rule applied to packets as they are sent: the first matching rule with uses left acts on a packet;
    watchers record every packet they match and never act."""

    action: str  # drop | duplicate | delay | reorder | watch
    match: Callable[[Packet], bool]
    times: int | None = 1  # None: every matching packet
    delay_s: float = 0.0  # delay: extra transit; reorder: the longest a packet is held
    fresh_id: bool = False  # duplicate: the copy gets a new id (a sender-side re-send, not a redelivery)
    hits: list[Packet] = field(default_factory=list)

    def takes(self, p: Packet) -> bool:
        return (self.times is None or len(self.hits) < self.times) and self.match(p)


class EmulatedCompute:
    """Virtual compute at an emulated speed, as ``TorchBackend`` sleeps it in a real agent: every block of a
    stage costs ``block_ms`` per full mini-batch forward, twice that backward (pro rata for a micro-batch);
    every job also costs ``base`` seconds. The node's ``slowdown`` multiplies it all."""

    def __init__(self, block_ms: float, base: float = 0.0) -> None:
        self.block_ms = block_ms
        self.base = base
        self.blocks: dict[str, tuple[int, int, int]] = {}  # session -> (blocks, batch size, all blocks)

    def _cost(self, session: str, rows: float, passes: int, whole: bool = False) -> float:
        blocks, batch, total = self.blocks.get(session, (0, 1, 0))
        return self.block_ms / 1000.0 * passes * rows / max(batch, 1) * (total if whole else blocks)

    def __call__(self, job: stage.Job) -> float:
        extra = 0.0
        if isinstance(job, stage.Open):
            self.blocks[job.session] = (job.stop - job.start, job.plan.batch_size, job.stop)
        elif isinstance(job, stage.Close):
            self.blocks.pop(job.session, None)
        elif isinstance(job, stage.Forward):
            rows = len(job.x) if job.x is not None else self.blocks.get(job.session, (0, 1, 0))[1] / job.n_micro
            extra = self._cost(job.session, rows, 1)
        elif isinstance(job, stage.Backward):
            extra = self._cost(job.session, len(job.grad), 2)
        elif isinstance(job, stage.Loss):
            extra = self._cost(job.session, len(job.x), 3)
        elif isinstance(job, stage.LocalBatch):
            extra = self._cost(job.session, self.blocks.get(job.session, (0, 1, 0))[1], 3, whole=True)
        return self.base + extra


@dataclass(eq=False)
class SimNode(MachineRunner):
    """One node of the fleet: its machine and backend, run by the shared runner core (``MachineRunner``)
    with every effect routed through the fleet."""

    fleet: MemoryFleet
    name: str
    role: str
    make_machine: Callable[[SimNode], Machine]
    make_backend: Callable[[], Any]
    compute: Callable[[stage.Job], float]
    slowdown: float = 1.0  # the node's emulated speed (``emulate`` command; set_speed)
    machine: Any = None
    _backend: Any = None
    alive: bool = False
    boot: int = 0
    clock: float = 0.0
    timers: dict[Hashable, float] = field(default_factory=dict)
    outbox: dict[str, Packet] = field(default_factory=dict)
    seen: RecentIds = field(default_factory=lambda: RecentIds(20_000))
    acked: RecentIds = field(default_factory=lambda: RecentIds(20_000))
    status: dict[str, Any] = field(default_factory=dict)
    will: dict[str, Any] = field(default_factory=dict)
    queued: list[Packet] = field(default_factory=list)  # the broker's session while the node is down
    persisted: bytes | None = None
    keyed: dict[str, bytes] = field(default_factory=dict)  # Persist(state, key): an edge's sessions
    reconnect_cap: float | None = None  # the last ReconnectWithin (link changes are not modelled)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    commanders: set[str] = field(default_factory=set)
    busy_s: float = 0.0  # virtual compute time so far: the CPU time its meters report
    follows_edge: bool = False  # a device: subscribed to its current edge's model broadcasts (Node.edge_broadcasts)
    following: tuple[str, ...] = ()  # those edges (the broker's subscription: it outlives a kill, like the session)

    @property
    def strict(self) -> bool:  # type: ignore[override]
        return self.fleet.strict

    def now(self) -> float:
        return self.clock

    def run_job(self, job: stage.Job) -> E.JobDone:
        cost = self.compute(job) * self.slowdown
        self.clock += cost  # the node computes: its clock runs ahead while it does
        self.busy_s += cost
        done = super().run_job(job)
        block_s = self.fleet.profile_s(self.name, job.plan) if isinstance(job, stage.Profile) and \
            self.fleet.profile_s is not None and done.error is None else None
        if block_s is not None:
            # The node's blocks as the fleet's compute model has them (virtual seconds), with the memory measured.
            return E.JobDone(job, stage.BlockProfile(tuple(block_s), done.result.block_bytes))
        return done

    def emulate(self, slowdown: float | None, block_ms: float | None) -> dict[str, Any]:
        if slowdown is not None:
            self.slowdown = slowdown
        if block_ms is not None and isinstance(self.compute, EmulatedCompute):
            self.compute.block_ms = block_ms
        return super().emulate(slowdown, block_ms)

    def send(self, dst: str, fx: E.Send) -> None:
        self.fleet._send(self, dst, fx)

    def ack(self, received: E.Received) -> None:
        self.acked.seen(received.id)
        self.fleet._send_ack(self, received.src, received.id, received.msg.kind, received.msg.run,
                             received.msg.round)

    def set_timer(self, key: Hashable, at: float) -> None:
        self.timers[key] = at
        self.fleet._at(at, functools.partial(self.fleet._fire, self, key, at, self.boot))

    def cancel_timer(self, key: Hashable) -> None:
        self.timers.pop(key, None)

    def follow(self, edges: tuple[str, ...]) -> None:
        if self.follows_edge:
            self.following = edges

    def set_status(self, state: str, fields: dict[str, Any]) -> None:
        self.status.update(fields)
        self.status["state"] = state
        self.fleet._publish_status(self)

    def emit(self, event: str, level: str, fields: dict[str, Any]) -> None:
        self.fleet._emit(self, event, level, fields)

    def publish_metrics(self, fields: dict[str, Any]) -> None:
        self.fleet.metric_log.append(self.fleet._json({"node": self.name, "role": self.role, "ts": self.clock,
                                                       **fields}))

    def drop(self, reason: str, detail: str, src: str) -> None:
        self.fleet._drop(self, reason, detail, src)

    def count(self, name: str, n: int) -> None:
        self.counts[name] += n

    def reply(self, dst: str, cmd_id: str, cmd: str, ok: bool, result: Any = None, error: str = "",
              code: str = "") -> None:
        body: dict[str, Any] = {"id": cmd_id, "cmd": cmd, "node": self.name, "to": dst, "ok": ok}
        body.update({"result": result} if ok else {"error": error, "code": code})
        self.fleet.replies.append(self.fleet._json(body))

    def persist(self, state: dict[str, Any] | None, key: str = "") -> None:
        # The state-file format: what does not serialise fails here.
        if not key:
            if state is not None:
                self.persisted = dumps(state)
        elif state is None:
            self.keyed.pop(key, None)
        else:
            self.keyed[key] = dumps(state)

    def reconnect_within(self, seconds: float | None) -> None:
        self.reconnect_cap = seconds

    def run_log(self, entry: dict[str, Any]) -> None:
        self.fleet.runlogs[self.name].append(self.fleet._json(entry))

    def save_model(self, fx: E.SaveModel) -> None:
        self.fleet.models[(fx.run, fx.round)] = fx  # every one: tests look back at any round
        if fx.best:
            self.fleet.models[(fx.run, "best")] = fx

    def log(self, level: str, message: str, fields: dict[str, Any]) -> None:
        self.fleet.logs.append({"node": self.name, "ts": self.clock, "level": level, "message": message, **fields})

    def send_command(self, dst: str, cmd: str, args: dict[str, Any]) -> None:
        data = {"id": f"{cmd}-{self.fleet.rng.getrandbits(32):08x}", "cmd": cmd, "args": args}
        self.fleet._transmit(Packet(self.name, dst, "ctl", data=self.fleet._json(data)), self.clock)

    def meters(self) -> stage.Meters:
        return stage.Meters(self.counts["tx_bytes"], self.counts["rx_bytes"], 0.0, self.busy_s)

    def backend(self) -> Any:
        return self._backend

    def status_report(self) -> dict[str, Any]:
        return dict(self.status)

    def shutdown(self) -> None:
        self.fleet.kill(self.name)

    def job_failed(self, job: stage.Job, e: Exception) -> None:
        # The machine decides what a failed job means; tests can see it here too.
        self.fleet.job_errors.append({"node": self.name, "job": type(job).__name__,
                                      "error": f"{type(e).__name__}: {e}"})


class MemoryFleet:
    """See the module docstring. Build with ``add_cloud``/``add_edge``/``add_device`` (or ``from_spec``),
    then ``start()`` and ``run_until(...)``."""

    def __init__(self, *, seed: int = 0, latency_s: float = 0.002, compute_s: Compute = 0.001,
                 resend_after_s: float = 5.0, wire: bool = True, strict: bool = True,
                 operators: tuple[str, ...] = ("operator",),
                 profile_s: Callable[[str, Any], tuple[float, ...] | None] | None = None) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        encoding.seed(seed)  # stochastic rounding (int8) reproducible per seed, like everything else here
        self.latency_s = latency_s
        self.compute_s = compute_s
        self.resend_after_s = resend_after_s
        self.wire = wire
        self.strict = strict  # a machine that raises fails the test instead of becoming a counted drop
        self.operators = operators
        self.nodes: dict[str, SimNode] = {}
        self.cloud = ""
        self.links: dict[tuple[str, str], float] = {}
        self.bandwidth: dict[tuple[str, str], float] = {}  # bytes per second of a link (none: instant)
        # Split-point planning: a node's forward + backward seconds per block (node, plan) -> times, so that its
        # profile speaks the fleet's virtual time (None, or no times for a node: what torch measured here).
        self.profile_s = profile_s
        self.faults: list[Fault] = []
        self.retained: dict[str, dict[str, Any]] = {}
        self.event_log: list[dict[str, Any]] = []
        self.metric_log: list[dict[str, Any]] = []
        self.drop_log: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.runlogs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.job_errors: list[dict[str, Any]] = []
        self.models: dict[tuple[str, int | str], E.SaveModel] = {}  # the cloud's kept models: (run, round | "best")
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._held: dict[tuple[str, str], list[Packet]] = collections.defaultdict(list)
        self._cmd_ids = itertools.count(1)
        self._same_instant = 0

    # ------------------------------------------------------------------ building
    def _add(self, name: str, role: str, make_machine: Callable[[SimNode], Machine], make_backend: Callable[[], Any],
             compute_s: Compute | None, slowdown: float = 1.0, block_ms: float = 0.0) -> SimNode:
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        c = self.compute_s if compute_s is None else compute_s
        cost: Callable[[stage.Job], float]
        if block_ms > 0 and not callable(c):
            cost = EmulatedCompute(block_ms, float(c))
        else:
            def cost(job: stage.Job) -> float:
                return c(job) if callable(c) else float(c)

        node = SimNode(self, name, role, make_machine, make_backend, cost, slowdown=slowdown,
                       commanders={*self.operators, self.cloud or "cloud"})
        self.nodes[name] = node
        return node

    def _prefix(self) -> str:
        # Machines draw session and migration ids from this; unique per boot, reproducible per seed.
        return f"{self.rng.getrandbits(32):08x}"

    def add_cloud(self, name: str = "cloud", *, test: Dataset | None = None, compute_s: Compute | None = None,
                  **section: Any) -> None:
        """``section``: the ``[cloud]`` keys (model, input_shape, rounds, mode, ..., edges, devices). Without
        ``edges`` the cloud trusts the edges added to this fleet, as an operator would configure it."""
        settings = CloudSettings.from_section({k: v for k, v in section.items() if k not in ROLE_KEYS})
        configured = Roles.from_section(section) if "edges" in section else None
        init = initial_state(settings.training.model_ref, settings.training.seed)
        runs = itertools.count(1)

        def make(node: SimNode) -> Machine:
            restored = loads(node.persisted) if node.persisted is not None else None
            roles = configured or Roles(edges=tuple(sorted(n.name for n in self.nodes.values() if n.role == "edge")),
                                        chains=Roles.from_section(section).chains)
            return CloudMachine(name, settings=settings, initial_state=init, schemas=schema_of, roles=roles,
                                run_ids=lambda: f"run-{next(runs)}", restored=restored)

        self._add(name, "cloud", make, lambda: TorchBackend(name, test=test), compute_s)
        self.cloud = name

    def add_edge(self, name: str, *, deadline_fraction: float = 0.85, compute_s: Compute | None = None,
                 schemas: Callable[[Any], Any] = schema_of, delta_encoding: str = "", slowdown: float = 1.0,
                 block_ms: float = 0.0, group_downloads: bool = True) -> None:
        """A restarted edge reads back the sessions it saved (edge resume), as the edge agent does."""
        node = self._add(name, "edge", lambda n: EdgeMachine(name, schemas=schemas, cloud=self.cloud or "cloud",
                                                             deadline_fraction=deadline_fraction,
                                                             id_prefix=self._prefix(),
                                                             restored={k: loads(v) for k, v in n.keyed.items()},
                                                             delta_encoding=delta_encoding,
                                                             group_downloads=group_downloads),
                         lambda: self._backend(node, name, block_ms=block_ms), compute_s, slowdown, block_ms)

    def _backend(self, node: SimNode, name: str, **kw: Any) -> TorchBackend:
        # Profiles report the node's emulated speed; its virtual clock, not a sleep, pays for it.
        return TorchBackend(name, slowdown=node.slowdown, sleep=False, **kw)

    def add_device(self, name: str, *, edge: str, data: Dataset, share_labels: bool = True,
                   eval_data: Dataset | None = None, compute_s: Compute | None = None, slowdown: float = 1.0,
                   block_ms: float = 0.0, **machine_kw: Any) -> None:
        """``machine_kw``: ``DeviceMachine`` options (cut, act_timeout_s, migrate_timeout_s, encodings, ...);
        ``eval_data``: the device's held-out split (federated evaluation)."""
        labels = label_counts(data.labels()) if share_labels else None

        schemas = machine_kw.pop("schemas", schema_of)  # another build of the model (a mismatch to refuse)

        def make(node: SimNode) -> Machine:
            # A restarted device starts from its configured edge and its persisted state, as an agent does.
            restored = loads(node.persisted) if node.persisted is not None else None
            return DeviceMachine(name, edge=edge, cloud=self.cloud or "cloud", n_samples=len(data), labels=labels,
                                 label_format=label_format(data.labels()), schemas=schemas,
                                 eval_samples=len(eval_data) if eval_data is not None else 0,
                                 id_prefix=self._prefix(), restored=restored, **machine_kw)

        node = self._add(name, "device", make, lambda: self._backend(node, name, data=data, test=eval_data,
                                                                    block_ms=block_ms),
                         compute_s, slowdown, block_ms)
        node.follows_edge = True

    def add_helper(self, name: str, *, serve: tuple[str, ...], memory_bytes: int = 0, compute_s: Compute | None = None,
                   slowdown: float = 1.0, block_ms: float = 0.0, act_timeout_s: float = 10.0) -> None:
        """A device agent that serves middle stages of ``serve``'s pipelines and has no data of its own."""
        def make(node: SimNode) -> Machine:
            return HelperDevice(None, StageServer(name, serve=tuple(serve), schemas=schema_of,
                                                  memory_bytes=memory_bytes, act_timeout_s=act_timeout_s,
                                                  id_prefix=self._prefix()))

        node = self._add(name, "device", make, lambda: self._backend(node, name, block_ms=block_ms), compute_s,
                         slowdown, block_ms)

    def set_speed(self, name: str, slowdown: float) -> None:
        """A node's emulated speed changes (a board slows down): what ``mqttfl ctl NODE emulate`` does."""
        self.nodes[name].emulate(slowdown, None)

    @classmethod
    def from_spec(cls, spec: FleetLayout, shards: Mapping[str, Dataset], test: Dataset | None = None,
                  eval_shards: Mapping[str, Dataset] | None = None, **fleet_kw: Any) -> MemoryFleet:
        """The fleet a ``Testbed`` runs for ``spec`` (a ``mqttfl.tools.testbed.FleetSpec``), in memory: the same
        ``[cloud]`` section and device options; ``shards``: ``make_shards(spec, train)`` for the same data,
        ``eval_shards``: ``make_eval_shards(spec, train)``."""
        fleet = cls(**fleet_kw)
        runtime_keys = {f.name for f in fields(CloudRuntime)}
        section = {"model": spec.model, "input_shape": list(spec.input_shape), "min_devices": len(spec.devices),
                   "edges": spec.edges, **{k: v for k, v in spec.cloud.items() if k not in runtime_keys}}
        fleet.add_cloud(test=test, **section)
        for e in spec.edges:
            fleet.add_edge(e, **{k: v for k, v in spec.edge_extra.items() if k in ("deadline_fraction",
                                                                                   "delta_encoding", "slowdown",
                                                                                   "block_ms", "group_downloads")})
        for h, clients in sorted(spec.helpers.items()):
            extra = spec.helper_extra.get(h, {})
            fleet.add_helper(h, serve=tuple(clients), memory_bytes=int(extra.get("memory_mb", 0) * 2**20),
                             **{k: v for k, v in extra.items() if k in ("slowdown", "block_ms", "act_timeout_s")})
        for d, e in sorted(spec.devices.items()):
            extra = dict(spec.device_extra.get(d, {}))
            for runtime_only in ("threads", "step_delay_s", "data", "edge", "cloud", "eval_data"):
                extra.pop(runtime_only, None)
            if "block_ms" in extra:
                extra["block_ms"] = float(extra["block_ms"])
            if extra.get("cut", -1) <= 0:
                extra.pop("cut", None)
            # [device] keys as the agent reads them: one map of the device's own encodings, its class, its memory.
            if "class" in extra:
                extra["klass"] = extra.pop("class")
            if "memory_mb" in extra:
                extra["memory_limit"] = int(float(extra.pop("memory_mb")) * 2**20)
            encodings = {k[: -len("_encoding")]: extra.pop(k) for k in list(extra) if k.endswith("_encoding")}
            if encodings:
                extra["encodings"] = {k: v for k, v in encodings.items() if v}
            fleet.add_device(d, edge=e, data=shards[d], eval_data=(eval_shards or {}).get(d), **extra)
        return fleet

    def set_latency(self, src: str, dst: str, seconds: float, *, both: bool = True) -> None:
        self.links[(src, dst)] = seconds
        if both:
            self.links[(dst, src)] = seconds

    def set_bandwidth(self, src: str, dst: str, bytes_per_s: float | None, *, both: bool = True) -> None:
        """A message on this link takes its size over ``bytes_per_s`` on top of the latency (None: instant)."""
        for key in [(src, dst), *([(dst, src)] if both else [])]:
            if bytes_per_s is None:
                self.bandwidth.pop(key, None)
            else:
                self.bandwidth[key] = bytes_per_s

    # ------------------------------------------------------------------ faults
    def _fault(self, action: str, pred: Callable[[Packet], bool], times: int | None, **kw: Any) -> Fault:
        f = Fault(action, pred, times, **kw)
        self.faults.append(f)
        return f

    def watch(self, pred: Callable[[Packet], bool]) -> Fault:
        """Record every matching packet (``.hits``) without touching it."""
        return self._fault("watch", pred, None)

    def drop(self, pred: Callable[[Packet], bool], times: int | None = 1) -> Fault:
        return self._fault("drop", pred, times)

    def duplicate(self, pred: Callable[[Packet], bool], times: int | None = 1, *, fresh_id: bool = False) -> Fault:
        return self._fault("duplicate", pred, times, fresh_id=fresh_id)

    def delay(self, pred: Callable[[Packet], bool], seconds: float, times: int | None = 1) -> Fault:
        return self._fault("delay", pred, times, delay_s=seconds)

    def reorder(self, pred: Callable[[Packet], bool], times: int | None = 1, *, hold_s: float = 1.0) -> Fault:
        """Hold a matching packet until the next packet on the same link has been delivered (or ``hold_s``)."""
        return self._fault("reorder", pred, times, delay_s=hold_s)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        # The testbed's order: the cloud first, then edges, then devices.
        for role in ("cloud", "edge", "device"):
            for n in self.nodes.values():
                if n.role == role and not n.alive:
                    self._boot(n)

    def _boot(self, n: SimNode) -> None:
        n.boot += 1
        n.alive = True
        n.clock = max(n.clock, self.now)
        n.machine = n.make_machine(n)
        n._backend = n.make_backend()
        n.seen, n.acked, n.timers = RecentIds(20_000), RecentIds(20_000), {}
        n.status = {"state": "starting", **n.machine.presence()}
        if n.follows_edge and isinstance(n.status.get("edge"), str):
            n.following = (n.status["edge"],)  # subscribed before it goes online, as Node does
        n.will = self._json({**self._status_body(n), "state": "offline"})
        self._publish_status(n)
        n.feed(E.Started(wall=n.clock))
        if n.name == self.cloud:
            for other, data in self.retained.items():  # what the broker hands a new subscriber
                if other != n.name:
                    self._transmit(Packet(other, n.name, "status", data=data, retained=True), self.now, faults=False)
        queued, n.queued = n.queued, []
        for p in queued:
            self._at(self.now + self._latency(p.src, p.dst), functools.partial(self._arrive, p))
        for key in list(n.outbox):  # after a restart every pending entry is due at once (Outbox)
            self._resend(n, key, n.boot)

    def kill(self, name: str) -> None:
        """The node dies (kill -9): it hears nothing more, its backend's sessions and its timers are gone (the
        dead machine stays readable), and the broker publishes its last will."""
        n = self.nodes[name]
        if not n.alive:
            return
        n.alive, n._backend, n.timers = False, None, {}
        self.retained[name] = n.will
        if self.cloud and name != self.cloud:
            self._transmit(Packet(name, self.cloud, "status", data=n.will), self.now, faults=False)

    def restart(self, name: str, *, clean: bool = False) -> None:
        """A fresh machine (the cloud's from its last ``Persist``); ``clean``: the broker lost its session."""
        n = self.nodes[name]
        self.kill(name)
        if clean:
            n.queued.clear()
        self._boot(n)

    # ------------------------------------------------------------------ running
    def _at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(t, self.now), next(self._seq), fn))

    def step(self) -> bool:
        if not self._queue:
            return False
        t, _, fn = heapq.heappop(self._queue)
        # Virtual time cannot hide a livelock behind the clock the way a real loop does: fail loudly instead.
        self._same_instant = self._same_instant + 1 if t <= self.now else 0
        if self._same_instant > LIVELOCK_STEPS:
            raise Stalled(f"livelock: {LIVELOCK_STEPS} steps at t={self.now:.6f}s without time moving")
        self.now = max(self.now, t)
        fn()
        return True

    def run_until(self, pred: Callable[[], Any], max_time: float = 3600.0) -> Any:
        """Run until ``pred()`` is truthy (returned) or ``max_time`` virtual seconds have passed (Stalled)."""
        deadline = self.now + max_time
        while not (v := pred()):
            if not self._queue or self._queue[0][0] > deadline:
                raise Stalled(f"not reached by t={self.now:.3f}s ({'idle' if not self._queue else 'timeout'}); "
                              f"last events: {[e['event'] for e in self.event_log[-8:]]}")
            self.step()
        return v

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self._queue and self._queue[0][0] <= end:
            self.step()
        self.now = end

    def run_to_end(self, max_time: float = 3600.0) -> dict[str, Any]:
        """Until the cloud reports ``run_complete`` or ``run_failed``; that event."""
        return self.run_until(lambda: next((e for e in reversed(self.event_log)
                                            if e["event"] in ("run_complete", "run_failed")), None), max_time)

    # ------------------------------------------------------------------ observing and steering
    def machine(self, name: str) -> Any:
        return self.nodes[name].machine

    def global_state(self) -> dict[str, Any]:
        return self.nodes[self.cloud].machine.global_state

    def events(self, name: str | None = None, node: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.event_log if (name is None or e["event"] == name)
                and (node is None or e["node"] == node) and all(e.get(k) == v for k, v in fields.items())]

    def metrics(self, kind: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.metric_log if (kind is None or m.get("kind") == kind)
                and (node is None or m["node"] == node)]

    def drops(self, node: str | None = None, reason: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.drop_log if (node is None or d["node"] == node)
                and (reason is None or d["reason"] == reason)]

    def counts(self, name: str) -> collections.Counter[str]:
        return self.nodes[name].counts

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.retained.get(name, {}))

    def persisted(self, name: str) -> dict[str, Any] | None:
        data = self.nodes[name].persisted
        return loads(data) if data is not None else None

    def inject(self, name: str, event: E.Event) -> None:
        """Hand a node an event as its runtime would (a link change, a hand-made message)."""
        n = self.nodes[name]
        n.clock = max(n.clock, self.now)
        n.feed(event)

    def send_raw(self, env: Envelope) -> None:
        """Put a hand-made envelope on the wire, from ``env.src`` to ``env.dst``, as any client could."""
        p = Packet(env.src, env.dst, env.kind, env=env, reliable=bool(env.body.get("reliable")))
        if self.wire:
            p.payload = encode(env)
        self._transmit(p, self.now)

    def command(self, node: str, cmd: str, /, *, src: str = "operator", **args: Any) -> dict[str, Any]:
        """A control command answered at once (the node handles it at its clock); the reply body."""
        n = self.nodes[node]
        if not n.alive:
            raise RuntimeError(f"{node} is not running")
        cid = f"c{next(self._cmd_ids)}"
        n.clock = max(n.clock, self.now)
        n.on_ctl(src, self._json({"id": cid, "cmd": cmd, "args": args}))
        return next(r for r in reversed(self.replies) if r["id"] == cid and r["node"] == node)

    # ------------------------------------------------------------------ timers
    def _fire(self, n: SimNode, key: Hashable, at: float, boot: int) -> None:
        # A timer set again (moved) or by an earlier life of the node is stale, as in Node.housekeeping.
        if n.alive and n.boot == boot and n.timers.get(key) == at:
            del n.timers[key]
            n.clock = max(n.clock, self.now)
            n.feed(E.TimerFired(key))

    # ------------------------------------------------------------------ records
    def _json(self, obj: dict[str, Any]) -> dict[str, Any]:
        # What operators and the cloud would read: JSON kinds travel as JSON (tuples become lists, NaN fails).
        return decode_json(encode_json(obj)) if self.wire else dict(obj)

    def _emit(self, n: SimNode, event: str, level: str, fields: dict[str, Any]) -> None:
        self.event_log.append(self._json({"event": event, "level": level, "node": n.name, "role": n.role,
                                          "ts": n.clock, **fields}))

    def _drop(self, n: SimNode, reason: str, detail: str, src: str) -> None:
        n.counts["dropped"] += 1
        n.counts[f"drop_{reason}"] += 1
        self.drop_log.append({"node": n.name, "ts": n.clock, "reason": reason, "detail": detail, "src": src})
        self._emit(n, "dropped", "warning", {"reason": reason, "detail": detail[:300], "topic": src})

    # ------------------------------------------------------------------ presence
    def _status_body(self, n: SimNode) -> dict[str, Any]:
        return {**n.status, "node": n.name, "role": n.role, "boot": n.boot, "ts": n.clock}

    def _publish_status(self, n: SimNode) -> None:
        data = self._json(self._status_body(n))
        self.retained[n.name] = data
        if self.cloud and n.name != self.cloud:  # only the cloud subscribes to status broadcasts
            self._transmit(Packet(n.name, self.cloud, "status", data=data), n.clock)

    # ------------------------------------------------------------------ the wire (Transport and the broker)
    def _latency(self, src: str, dst: str) -> float:
        return self.links.get((src, dst), self.latency_s)

    def _envelope(self, n: SimNode, kind: str, dst: str, body: dict[str, Any], tensors: dict[str, Any], run: str,
                  round: int) -> Envelope:
        return Envelope(kind=kind, src=n.name, dst=dst, body=body, tensors=tensors, run=run, round=round,
                        seq=next(self._seq), id=self.rng.randbytes(16), ts=n.clock)

    def _packet(self, n: SimNode, env: Envelope, msg: Message | None, reliable: bool) -> Packet:
        p = Packet(n.name, env.dst, env.kind, msg=msg, env=env, reliable=reliable)
        n.counts[f"tx_{env.kind}"] += 1  # the transport's counter names, so fleets compare message counts
        if self.wire:
            p.payload = encode(env)
            n.counts["tx_bytes"] += len(p.payload)
        return p

    def _send(self, n: SimNode, dst: str, fx: E.Send) -> None:
        msg, reliable = fx.msg, fx.reliable
        body, tensors = n.wire_form(fx)
        if reliable:
            body["reliable"] = True
        p = self._packet(n, self._envelope(n, msg.kind, dst, body, tensors, msg.run, msg.round), msg, reliable)
        if dst == BROADCAST:
            # The broker's copy for each subscriber of this sender's broadcasts (devices following it as their
            # edge); a fault rule sees each copy with its receiver as ``dst``.
            for name, other in self.nodes.items():
                if other.follows_edge and n.name in other.following and msg.kind == "model":
                    self._transmit(replace(p, dst=name), n.clock)
            return
        if reliable:
            assert p.env is not None
            key = p.env.id.hex()
            n.outbox[key] = p
            self._at(n.clock + self.resend_after_s, functools.partial(self._resend, n, key, n.boot))
        self._transmit(p, n.clock)

    def _resend(self, n: SimNode, key: str, boot: int) -> None:
        """Transport.housekeeping: an unacknowledged outbox entry goes out again (same id), then waits again."""
        p = n.outbox.get(key)
        if p is None or not n.alive or n.boot != boot:
            return
        n.clock = max(n.clock, self.now)
        p = n.outbox[key] = replace(p, resend=p.resend + 1)
        self._transmit(p, n.clock)
        self._at(n.clock + self.resend_after_s, functools.partial(self._resend, n, key, boot))

    def _send_ack(self, n: SimNode, dst: str, msg_id: bytes, kind: str, run: str, round: int) -> None:
        env = self._envelope(n, "ack", dst, {"ids": [msg_id.hex()], "of": kind}, {}, run, round)
        self._transmit(self._packet(n, env, None, False), n.clock)

    def _transmit(self, p: Packet, at: float, *, faults: bool = True) -> None:
        arrive = at + self._latency(p.src, p.dst)
        bandwidth = self.bandwidth.get((p.src, p.dst))
        if bandwidth:
            arrive += len(p.payload) / bandwidth
        rule = None
        for f in self.faults if faults else ():
            if f.action == "watch" and f.match(p):
                f.hits.append(p)
            elif rule is None and f.action != "watch" and f.takes(p):
                rule = f
        if rule is not None:
            rule.hits.append(p)
            if rule.action == "drop":
                return
            if rule.action == "delay":
                arrive += rule.delay_s
            elif rule.action == "reorder":
                self._held[(p.src, p.dst)].append(p)
                self._at(arrive + rule.delay_s, functools.partial(self._release, p))
                return
            elif rule.action == "duplicate":
                copy = p
                if rule.fresh_id and p.env is not None:
                    env = replace(p.env, id=self.rng.randbytes(16))
                    copy = replace(p, env=env, payload=encode(env) if self.wire else b"")
                self._at(arrive, functools.partial(self._arrive, copy))
        self._at(arrive, functools.partial(self._arrive, p))
        # Packets held back on this link now arrive just after this one: the two have swapped places.
        for held in self._held.pop((p.src, p.dst), []):
            self._at(arrive, functools.partial(self._release, held))

    def _release(self, p: Packet) -> None:
        held = self._held.get((p.src, p.dst), [])
        if p in held:  # not yet overtaken: its hold ran out
            held.remove(p)
        self._arrive(p)

    def _arrive(self, p: Packet) -> None:
        n = self.nodes.get(p.dst)
        if n is None:
            return  # nobody subscribed: the broker discards it
        if not n.alive:
            if p.kind != "status":  # retained statuses reach a restarted cloud anyway
                n.queued.append(p)
            return
        n.clock = max(n.clock, self.now)
        if p.kind == "status":
            try:
                presence = parse_status(p.src, p.data or {})
            except ProtocolError as e:
                self._drop(n, e.code, str(e), p.src)
                return
            n.feed(E.StatusSeen(presence, p.retained))
        elif p.kind == "ctl":
            data = p.data or {}
            if "id" in data and n.seen.seen(("ctl", p.src, str(data["id"]))):
                n.counts["duplicate"] += 1  # Transport drops a re-delivered command by its id
                return
            n.on_ctl(p.src, data)
        else:
            self._receive(n, p)

    def _receive(self, n: SimNode, p: Packet) -> None:
        env = p.env
        if self.wire:
            n.counts["rx_bytes"] += len(p.payload)
            try:
                env = decode(p.payload)
            except CodecError as e:
                self._drop(n, e.code, str(e), p.src)
                return
        assert env is not None
        if n.seen.seen(env.id):
            n.counts["duplicate"] += 1
            if env.body.get("reliable") and env.id in n.acked:
                self._send_ack(n, p.src, env.id, env.kind, env.run, env.round)  # our ack was lost
            return
        if env.kind == "ack":
            for key in env.body.get("ids", []):
                entry = n.outbox.get(str(key))
                if entry is not None and entry.dst == p.src:  # only the receiver may say it applied it
                    del n.outbox[str(key)]
                    n.counts["acked"] += 1
                elif entry is not None:
                    self._drop(n, "ack_not_from_receiver", f"{p.src} acknowledged {key} sent to {entry.dst}", p.src)
            return
        try:
            typed = parse(env.kind, env.run, env.round, env.body, decode_tensors(env.body, env.tensors))
        except (ProtocolError, CodecError) as e:
            self._drop(n, e.code, str(e), p.src)
            return
        n.feed(E.Received(p.src, typed, env.id, sent_at=env.ts, received_at=n.clock,
                          reliable=bool(env.body.get("reliable"))))
