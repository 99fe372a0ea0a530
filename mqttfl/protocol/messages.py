"""Typed message bodies: every field from the wire is checked here, once, before a machine sees it.

A binary message (``mqttfl.wire.codec``) has a header (kind, src, dst, run, round, ts) and a body map plus
tensors. :func:`parse` turns a decoded envelope into one of the dataclasses below, or raises
:class:`ProtocolError` naming the first bad field; :meth:`Message.to_wire` is the inverse. Machines
construct and match these classes and never read a raw body. Tensors arrive already decoded to float32 by
the tensor encoding of their kind (``mqttfl.wire.encoding``).

The round protocol, synchronous (SplitFed V1; docs/design.md, "Round")::

    cloud  --model/round (plan, devices+cuts, global state)--> edge
    edge   --model/train (plan, cut, device-side state)-----> device
    device --act (step, micro, smashed, labels)-------------> edge      1F1B, several micro-batches in flight
    edge   --grad (step, micro, gradient at the cut)--------> device    cached: a re-sent act is answered again
    device --delta/device (report, device part - global)----> edge      reliable (outbox + application ack)
    edge   --delta/edge (reports, sample-weighted mean)-----> cloud     reliable

Migration (FedFly) travels on ``ckpt`` with the operations of :class:`CkptOp` (docs/design.md, "Migration").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.hetero import COVERAGE, MASK, LocalModel, split_masks
from mqttfl.protocol.plan import Plan, check_encodings
from mqttfl.protocol.schema import parse_description
from mqttfl.wire.topics import TopicError, validate_id

State = dict[str, np.ndarray]
Description = tuple[tuple[int, str, tuple[int, ...], str], ...]  # ModelSchema.describe(), checked


def _rows(d: Description) -> list[list[Any]]:
    return [[b, k, list(shape), dtype] for b, k, shape, dtype in d]


class CkptOp(StrEnum):
    EXPECT = "expect"  # device -> destination: accept a checkpoint for me from this source only
    FREEZE = "freeze"  # device -> source: checkpoint my session and send it
    FROZEN = "frozen"  # source -> device: frozen, the checkpoint is on its way (direct path)
    TRANSFER = "transfer"  # source -> destination (direct) or source -> device -> destination (relay)
    READY = "ready"  # destination -> device: installed, resume here
    RELEASE = "release"  # device -> source: the destination has me, forget the frozen session
    ABORT = "abort"  # device -> source (resume here) and destination (forget what you installed)
    LEAVE = "leave"  # device -> source: I restart the round elsewhere without my state
    REFUSED = "refused"  # source or destination -> device
    NOTHING = "nothing"  # source -> device: I hold no state of yours
    RESTART = "restart"  # device -> cloud: my source is gone; restart my round at this edge


class MovePath(StrEnum):
    DIRECT = "direct"  # edge to edge through the broker
    RELAY = "relay"  # through the device, for edges that may not talk to each other
    RESTART = "restart"  # no state moves: the round starts over at the destination (FedFly's baseline)


class EdgeSession(StrEnum):
    """What an edge holds of a device's round after it restarted (``Resume``)."""

    RESTORED = "restored"  # read back from disk at a mini-batch boundary: go back there and train on
    LOST = "lost"  # nothing: the edge lost it (no saved session); the device asks the cloud to restart its part
    CLOSED = "closed"  # the edge already reported the round: the device comes too late and stops


class RoundKind(StrEnum):
    """What an asynchronous group round is for (docs/async.md)."""

    PROFILE = "profile"  # everyone, synchronously: measures latencies before groups exist
    GROUP = "group"  # one group's round, mixed into the global model
    PROBE = "probe"  # a dropped device alone: refreshes its latency, its update is not mixed


# ------------------------------------------------------------------------------------------------ field checks


def _get(body: Mapping[str, Any], name: str, default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise ProtocolError("bad_field", f"missing field {name!r}")
        return default
    return body[name]


def int_field(body: Mapping[str, Any], name: str, default: Any = ..., *, low: int = 0) -> int:
    v = _get(body, name, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ProtocolError("bad_field", f"field {name!r} must be an integer >= {low}, got {v!r}")
    return v


def float_field(body: Mapping[str, Any], name: str, default: Any = ..., *, low: float = 0.0) -> float:
    v = _get(body, name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
        raise ProtocolError("bad_field", f"field {name!r} must be a finite number >= {low}, got {v!r}")
    return float(v)


def str_field(body: Mapping[str, Any], name: str, default: Any = ..., *, max_len: int = 300) -> str:
    v = _get(body, name, default)
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError("bad_field", f"field {name!r} must be a string of at most {max_len} characters")
    return v


def id_field(body: Mapping[str, Any], name: str, default: Any = ...) -> str:
    v = _get(body, name, default)
    try:
        return validate_id(v)
    except TopicError as e:
        raise ProtocolError("bad_field", f"field {name!r}: {e}") from None


def enum_field(body: Mapping[str, Any], name: str, enum: type[StrEnum], default: Any = ...) -> Any:
    v = _get(body, name, default)
    try:
        return enum(v)
    except ValueError:
        raise ProtocolError("bad_field", f"field {name!r} must be one of {[e.value for e in enum]}") from None


def keys_field(body: Mapping[str, Any], tensors: Mapping[str, Any]) -> tuple[str, ...]:
    """The explicit key set of a (possibly partial) state: ``keys`` in the body must name exactly the tensors
    that came with it, so a sender cannot leave a layer out by accident or smuggle one in."""
    keys = body.get("keys")
    if keys is None:
        return tuple(tensors)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or set(keys) != set(tensors) \
            or len(set(keys)) != len(keys):
        raise ProtocolError("bad_field", "'keys' must list exactly the tensors of the message")
    return tuple(keys)


MAX_STAGES = 64


MAX_BLOCKS = 4096


def numbers_field(body: Mapping[str, Any], name: str, max_len: int = MAX_STAGES) -> tuple[float, ...]:
    """A short list of finite numbers >= 0 (per pipeline stage, or per block); empty when absent."""
    v = body.get(name, [])
    if not isinstance(v, list) or len(v) > max_len or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in v):
        raise ProtocolError("bad_field", f"field {name!r} must be a list of at most {max_len} numbers >= 0")
    return tuple(float(x) for x in v)


def ids_field(body: Mapping[str, Any], name: str, max_len: int = MAX_STAGES) -> tuple[str, ...]:
    """A short list of node ids; empty when absent."""
    v = body.get(name, [])
    if not isinstance(v, list) or len(v) > max_len:
        raise ProtocolError("bad_field", f"field {name!r} must be a list of at most {max_len} node ids")
    return tuple(id_field({"n": n}, "n") for n in v)


MAX_GROUP = 10_000  # devices one group announcement may name (an edge's share of a large fleet)


def tensor(tensors: Mapping[str, Any], name: str) -> np.ndarray:
    v = tensors.get(name)
    if not isinstance(v, np.ndarray):
        raise ProtocolError("bad_field", f"missing tensor {name!r}")
    return v


# ------------------------------------------------------------------------------------------------ messages


@dataclass(frozen=True, kw_only=True)
class Message:
    """A protocol message. ``run`` and ``round`` travel in the envelope header, the rest in body/tensors."""

    kind: ClassVar[str]
    op: ClassVar[str]
    run: str = ""
    round: int = 0

    def body(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> dict[str, np.ndarray]:
        return {}

    def to_wire(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"op": self.op, **self.body()}, self.tensors()

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Message:
        raise NotImplementedError


@dataclass(frozen=True)
class RoundTag:
    """Echoed by an edge with its delta, so a late delta of an asynchronous group round can be placed."""

    group: int
    version: int
    base: int
    kind: RoundKind

    def to_body(self) -> dict[str, Any]:
        return {"group": self.group, "version": self.version, "base": self.base, "kind": str(self.kind)}

    @classmethod
    def from_body(cls, body: Any) -> RoundTag | None:
        if body is None or body == {}:
            return None
        if not isinstance(body, Mapping):
            raise ProtocolError("bad_field", "round tag must be a map")
        return cls(int_field(body, "group", low=-1), int_field(body, "version"), int_field(body, "base"),
                   enum_field(body, "kind", RoundKind))


@dataclass(frozen=True, kw_only=True)
class OpenRound(Message):
    """cloud -> edge: a round with these devices (and their cuts) from this global model. ``schema``: the
    cloud's description of the model, so that a node whose own build differs names the difference."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "round"
    plan: Plan
    cuts: dict[str, int]
    state: State
    tag: RoundTag | None = None
    schema: Description = ()
    samples: dict[str, int] = field(default_factory=dict)  # what each device declared when it joined
    encodings: dict[str, dict[str, str]] = field(default_factory=dict)  # a device's own tensor encodings
    partial: bool = False  # FedLAMA: only the layers aggregated last round; the edge keeps the rest
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a pipelined device's helpers online now
    locals: dict[str, LocalModel] = field(default_factory=dict)  # a device's class model, where not the plain one

    def body(self) -> dict[str, Any]:
        devices = {d: {"cut": c, **({"samples": self.samples[d]} if d in self.samples else {}),
                       **({"enc": self.encodings[d]} if self.encodings.get(d) else {}),
                       **({"chain": list(self.chains[d])} if self.chains.get(d) else {}),
                       **({"local": self.locals[d].to_body()} if d in self.locals else {})}
                   for d, c in self.cuts.items()}
        return {"plan": self.plan.to_body(), "devices": devices, "tag": self.tag.to_body() if self.tag else None,
                "schema": _rows(self.schema), **({"partial": True, "keys": list(self.state)} if self.partial else {})}

    def tensors(self) -> State:
        return dict(self.state)

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> OpenRound:
        plan = Plan.from_body(_get(body, "plan"))
        devices = _get(body, "devices")
        if not isinstance(devices, Mapping):
            raise ProtocolError("bad_field", "devices must be a map")
        cuts, samples, encodings, chains, locals_ = {}, {}, {}, {}, {}
        for d, c in devices.items():
            validated = id_field({"d": d}, "d")
            entry = c if isinstance(c, Mapping) else {}
            cuts[validated] = int_field(entry, "cut", low=1)
            if entry.get("chain"):
                chains[validated] = ids_field(entry, "chain")
            if "samples" in entry:
                samples[validated] = int_field(entry, "samples")
            if entry.get("enc"):
                encodings[validated] = check_encodings(entry["enc"], f"encodings of {validated}")
            if "local" in entry:
                locals_[validated] = LocalModel.from_body(entry["local"])
        partial = body.get("partial", False) is True
        keys_field(body, tensors)
        return cls(run=run, round=round, plan=plan, cuts=cuts, state=dict(tensors), samples=samples,
                   tag=RoundTag.from_body(body.get("tag")), schema=parse_description(body.get("schema", [])),
                   encodings=encodings, partial=partial, chains=chains, locals=locals_)


@dataclass(frozen=True, kw_only=True)
class TrainRound(Message):
    """edge -> device: train this round from these device-side weights (all weights when cut = end)."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "train"
    plan: Plan
    cut: int
    edge: str
    state: State
    schema: Description = ()  # the cloud's, passed on by the edge
    encodings: dict[str, str] = field(default_factory=dict)  # this device's tensor encodings, by kind
    partial: bool = False  # FedLAMA: only the layers aggregated last round; the device keeps the rest
    helpers: tuple[str, ...] = ()  # a pipeline: the device's helpers online now, in chain order (then the whole
    # model comes, and ``cut`` is where the edge's blocks start)
    local: LocalModel | None = None  # the device's class model (None: the whole model in fp32, no cutoff)
    # A group announcement (docs/design.md, "Round"): published once to the edge's broadcast topic, for the
    # devices named here; empty: addressed to one device.
    devices: tuple[str, ...] = ()

    def body(self) -> dict[str, Any]:
        return {"plan": self.plan.to_body(), "cut": self.cut, "edge": self.edge, "schema": _rows(self.schema),
                **({"devices": list(self.devices)} if self.devices else {}),
                "encodings": dict(self.encodings), **({"partial": True, "keys": list(self.state)} if self.partial
                                                      else {}), **({"helpers": list(self.helpers)} if self.helpers
                                                                   else {}),
                **({"local": self.local.to_body()} if self.local is not None else {})}

    def tensors(self) -> State:
        return dict(self.state)

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> TrainRound:
        keys_field(body, tensors)
        return cls(run=run, round=round, plan=Plan.from_body(_get(body, "plan")), cut=int_field(body, "cut", low=1),
                   edge=id_field(body, "edge"), state=dict(tensors), schema=parse_description(body.get("schema", [])),
                   encodings=check_encodings(body.get("encodings", {}), "encodings"),
                   partial=body.get("partial", False) is True, helpers=ids_field(body, "helpers"),
                   local=LocalModel.from_body(body["local"]) if "local" in body else None,
                   devices=_group(body))


def _group(body: Mapping[str, Any]) -> tuple[str, ...]:
    devices = ids_field(body, "devices", MAX_GROUP)
    if len(set(devices)) != len(devices) or ("devices" in body and len(devices) < 2):
        raise ProtocolError("bad_field", "field 'devices' must name at least two distinct devices")
    if devices and ("partial" in body or "helpers" in body or "local" in body):
        raise ProtocolError("bad_field", "a group announcement carries no per-device fields (partial, helpers, "
                                         "local)")
    return devices


@dataclass(frozen=True, kw_only=True)
class Activations(Message):
    """device -> edge: the smashed activations and labels of one micro-batch."""

    kind: ClassVar[str] = "act"
    op: ClassVar[str] = "micro"
    step: int
    micro: int
    n_micro: int
    batch_size: int
    attempt: int
    x: np.ndarray
    y: np.ndarray
    grad_encoding: str = "none"  # how the device wants its gradient back (it travels with every act: a moved
    # device's new edge learns it without asking anyone)
    client: str = ""  # a pipeline: the device whose data this is, when a helper sends it on ("": the sender)
    epoch: int = 0  # a pipeline: the stage layout it was computed under (docs/design.md, "Pipeline")

    @property
    def key(self) -> tuple[int, int]:
        return (self.step, self.micro)

    def body(self) -> dict[str, Any]:
        return {"step": self.step, "micro": self.micro, "n_micro": self.n_micro, "batch_size": self.batch_size,
                "attempt": self.attempt, "grad_encoding": self.grad_encoding,
                **({"client": self.client} if self.client else {}), **({"epoch": self.epoch} if self.epoch else {})}

    def tensors(self) -> State:
        return {"x": self.x, "y": self.y}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Activations:
        step, micro = int_field(body, "step"), int_field(body, "micro")
        n_micro, batch_size = int_field(body, "n_micro", low=1), int_field(body, "batch_size", low=1)
        if not micro < n_micro <= batch_size:
            raise ProtocolError("bad_field", f"micro {micro}/{n_micro} of a batch of {batch_size}")
        genc = check_encodings({"grad": body.get("grad_encoding", "none")}, "grad_encoding").get("grad", "none")
        return cls(run=run, round=round, step=step, micro=micro, n_micro=n_micro, batch_size=batch_size,
                   attempt=int_field(body, "attempt"), x=tensor(tensors, "x"), y=tensor(tensors, "y"),
                   grad_encoding=genc, client=id_field(body, "client") if body.get("client") else "",
                   epoch=int_field(body, "epoch", 0))


@dataclass(frozen=True, kw_only=True)
class Gradients(Message):
    """edge -> device: the gradient at the cut for one micro-batch, with its loss and correct count."""

    kind: ClassVar[str] = "grad"
    op: ClassVar[str] = "micro"
    step: int
    micro: int
    loss_sum: float
    correct: int
    g: np.ndarray
    saved: int = 0  # the edge holds this session on disk at this mini-batch boundary (edge resume)
    # A pipeline (docs/design.md, "Pipeline"): the client device whose micro-batch this is ("": the receiver),
    # the stage layout, and what the stages from the sender down measured (each prepends its own): seconds of
    # compute per micro-batch (a moving average), the most micro-batches stashed, inbound bytes per second.
    client: str = ""
    epoch: int = 0
    stage_s: tuple[float, ...] = ()
    stash: tuple[int, ...] = ()
    link_bps: tuple[float, ...] = ()

    @property
    def key(self) -> tuple[int, int]:
        return (self.step, self.micro)

    def body(self) -> dict[str, Any]:
        pipe = {"client": self.client, "epoch": self.epoch, "stage_s": list(self.stage_s), "stash": list(self.stash),
                "link_bps": list(self.link_bps)} if self.epoch or self.client or self.stage_s else {}
        return {"step": self.step, "micro": self.micro, "loss_sum": self.loss_sum, "correct": self.correct,
                "saved": self.saved, **pipe}

    def tensors(self) -> State:
        return {"g": self.g}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Gradients:
        return cls(run=run, round=round, step=int_field(body, "step"), micro=int_field(body, "micro"),
                   loss_sum=float_field(body, "loss_sum"), correct=int_field(body, "correct"),
                   g=tensor(tensors, "g"), saved=int_field(body, "saved", 0),
                   client=id_field(body, "client") if body.get("client") else "", epoch=int_field(body, "epoch", 0),
                   stage_s=numbers_field(body, "stage_s"), stash=tuple(int(v) for v in numbers_field(body, "stash")),
                   link_bps=numbers_field(body, "link_bps"))


@dataclass(frozen=True, kw_only=True)
class Resume(Message):
    """edge -> device: where the edge's copy of the device's round stands, when it is not where the device
    thinks (docs/design.md, "Edge resume"): restored from disk at mini-batch boundary ``step`` after a restart,
    lost, or closed. ``token`` names the edge's life, so a device acts on each restart once."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "resume"
    attempt: int
    step: int
    session: EdgeSession
    token: str

    def body(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "step": self.step, "session": str(self.session), "token": self.token}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Resume:
        return cls(run=run, round=round, attempt=int_field(body, "attempt"), step=int_field(body, "step"),
                   session=enum_field(body, "session", EdgeSession), token=str_field(body, "token", max_len=64))


@dataclass(frozen=True, slots=True)
class Report:
    """What a device reports with its delta (per-device system costs of the heterogeneous-IoT cost model).

    ``samples`` weighs the device in FedAvg; times are seconds, bytes count whole messages."""

    samples: int
    attempt: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    cut: int = 0
    t_local: float = 0.0
    t_download: float = 0.0
    t_total: float = 0.0
    t_upload: float = 0.0  # filled in by the edge, from the delta's sender timestamp
    edge_steps: int = 0  # filled in by the edge
    bytes_up: int = 0
    bytes_down: int = 0
    peak_rss_mb: float = 0.0
    resends: int = 0
    stages: int = 0  # a pipelined device: the stages its blocks were trained on (it, its helpers, its edge)
    cpu_s: float = 0.0  # the device process's CPU time this round
    energy_j: float = 0.0  # from the board's power sensor this round; 0: none (the cloud estimates from cpu_s)
    train_mem_mb: float = 0.0  # training memory: weights, gradients, optimizer state and stored activations
    cutoff: int = 0  # 1: the class's cutoff tau_s ended the round early (steps and seen say how far it got)

    def to_body(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_body(cls, body: Any) -> Report:
        if not isinstance(body, Mapping):
            raise ProtocolError("bad_field", "report must be a map")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in body:
                kw[f.name] = (int_field if f.type == "int" else float_field)(body, f.name)
        if "samples" not in kw:
            raise ProtocolError("bad_field", "report lacks 'samples'")
        return cls(**kw)


# ------------------------------------------------------------------------------------------------ federated evaluation


@dataclass(frozen=True, kw_only=True)
class OpenEval(Message):
    """cloud -> edge: have these devices evaluate the global model of ``plan.round`` on their held-out split."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "eval"
    plan: Plan
    devices: tuple[str, ...]
    state: State
    schema: Description = ()

    def body(self) -> dict[str, Any]:
        return {"plan": self.plan.to_body(), "devices": list(self.devices), "schema": _rows(self.schema)}

    def tensors(self) -> State:
        return dict(self.state)

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> OpenEval:
        devices = _get(body, "devices")
        if not isinstance(devices, list):
            raise ProtocolError("bad_field", "devices must be a list")
        return cls(run=run, round=round, plan=Plan.from_body(_get(body, "plan")),
                   devices=tuple(id_field({"d": d}, "d") for d in devices), state=dict(tensors),
                   schema=parse_description(body.get("schema", [])))


@dataclass(frozen=True, kw_only=True)
class EvaluateModel(Message):
    """edge -> device: evaluate this (whole) global model on your held-out split and tell the cloud."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "evaluate"
    plan: Plan
    edge: str
    state: State
    schema: Description = ()

    def body(self) -> dict[str, Any]:
        return {"plan": self.plan.to_body(), "edge": self.edge, "schema": _rows(self.schema)}

    def tensors(self) -> State:
        return dict(self.state)

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> EvaluateModel:
        return cls(run=run, round=round, plan=Plan.from_body(_get(body, "plan")), edge=id_field(body, "edge"),
                   state=dict(tensors), schema=parse_description(body.get("schema", [])))


MAX_METRICS = 16


@dataclass(frozen=True, kw_only=True)
class EvalReport(Message):
    """device -> cloud: the task's metrics of the global model on ``n`` held-out samples of this device."""

    kind: ClassVar[str] = "delta"
    op: ClassVar[str] = "eval"
    n: int
    metrics: dict[str, float]

    def body(self) -> dict[str, Any]:
        return {"n": self.n, "metrics": dict(self.metrics)}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> EvalReport:
        metrics = _get(body, "metrics")
        if not isinstance(metrics, Mapping) or len(metrics) > MAX_METRICS:
            raise ProtocolError("bad_field", "metrics must be a small map of names to numbers")
        checked = {str_field({"k": k}, "k", max_len=32): float_field(metrics, k) for k in metrics}
        return cls(run=run, round=round, n=int_field(body, "n", low=1), metrics=checked)


@dataclass(frozen=True, kw_only=True)
class DeviceUpdate(Message):
    """device -> edge: the device part's delta against the round's global model, and the device's report."""

    kind: ClassVar[str] = "delta"
    op: ClassVar[str] = "device"
    report: Report
    delta: State
    masks: State = field(default_factory=dict)  # packed masks of the masked keys, whose delta holds kept values

    def body(self) -> dict[str, Any]:
        return {"report": self.report.to_body(), "keys": list(self.delta)}

    def tensors(self) -> State:
        return {**self.delta, **{k + MASK: m for k, m in self.masks.items()}}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> DeviceUpdate:
        plain, masks = split_masks(tensors)
        keys_field(body, plain)
        if set(masks) - set(plain):
            raise ProtocolError("bad_field", "a mask for a key the update does not carry")
        return cls(run=run, round=round, report=Report.from_body(_get(body, "report")), delta=dict(plain),
                   masks=dict(masks))


@dataclass(frozen=True, kw_only=True)
class EdgeUpdate(Message):
    """edge -> cloud: the sample-weighted mean of its devices' full-model deltas (empty when none finished), or,
    when the round's strategy may not pre-aggregate (``plan.preaggregate`` false), each device's own delta in
    ``deltas`` (tensors ``"<device>|<key>"``). Under FedLAMA the deltas hold only the layers due and
    ``sqnorms`` carries, per layer, the sum over the edge's devices of ``samples * |delta|^2``.

    Devices that trained part of the model (docs/algorithms.md, "Heterogeneous devices"): a forwarded device
    delta may hold a subset of the keys and masked keys (``masks[device]``, as the device sent them); a mean
    averages each entry over the devices that trained it, and ``coverage`` (tensors ``"<key>|cov"``) gives, for
    each key not trained by every sample, the samples behind each entry (a scalar per key, or one per entry)."""

    kind: ClassVar[str] = "delta"
    op: ClassVar[str] = "edge"
    attempt: int
    reports: dict[str, Report]
    missing: tuple[str, ...]
    delta: State
    edge_time_s: float = 0.0
    tag: RoundTag | None = None
    deltas: dict[str, State] = field(default_factory=dict)
    sqnorms: dict[str, float] = field(default_factory=dict)
    masks: dict[str, State] = field(default_factory=dict)  # per device: packed masks of its masked keys
    coverage: State = field(default_factory=dict)  # a mean's keys not covered by every sample

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.reports.values())

    @property
    def per_device(self) -> bool:
        return bool(self.deltas)

    def body(self) -> dict[str, Any]:
        keys = sorted({k for d in self.deltas.values() for k in d}) if self.deltas else list(self.delta)
        return {"attempt": self.attempt, "devices": {d: r.to_body() for d, r in self.reports.items()},
                "missing": list(self.missing), "edge_time_s": self.edge_time_s,
                "tag": self.tag.to_body() if self.tag else None, "keys": keys,
                **({"per_device": True} if self.deltas else {}), **({"sqnorms": self.sqnorms} if self.sqnorms else {})}

    def tensors(self) -> State:
        if self.deltas:
            return {**{f"{d}|{k}": v for d, state in self.deltas.items() for k, v in state.items()},
                    **{f"{d}|{k}{MASK}": v for d, state in self.masks.items() for k, v in state.items()}}
        return {**self.delta, **{k + COVERAGE: v for k, v in self.coverage.items()}}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> EdgeUpdate:
        devices = _get(body, "devices")
        missing = _get(body, "missing", [])
        if not isinstance(devices, Mapping) or not isinstance(missing, list):
            raise ProtocolError("bad_field", "devices must be a map and missing a list")
        reports = {id_field({"d": d}, "d"): Report.from_body(r) for d, r in devices.items()}
        sq = body.get("sqnorms", {})
        if not isinstance(sq, Mapping):
            raise ProtocolError("bad_field", "sqnorms must be a map")
        sqnorms = {str(k): float_field(sq, k) for k in sq}
        plain, coverage = split_masks(tensors, COVERAGE)
        delta: State = dict(plain)
        deltas: dict[str, State] = {}
        masks: dict[str, State] = {}
        if body.get("per_device") is True:
            # Every reporting device brings exactly one delta, over the body's keys or (a device that trained part
            # of the model) a subset of them.
            delta, coverage = {}, {}
            plain, packed = split_masks(tensors)
            for name, v in plain.items():
                d, sep, k = str(name).partition("|")
                if not sep or d not in reports:
                    raise ProtocolError("bad_field", f"per-device tensor {name!r} names no reporting device")
                deltas.setdefault(d, {})[k] = v
            for name, v in packed.items():
                d, _, k = str(name).partition("|")
                if k not in deltas.get(d, {}):
                    raise ProtocolError("bad_field", f"mask {name!r} for a key its device does not carry")
                masks.setdefault(d, {})[k] = v
            keys = _get(body, "keys")
            if not isinstance(keys, list) or set(deltas) != {d for d, r in reports.items() if r.samples > 0} or \
                    any(not set(s) <= set(keys) for s in deltas.values()):
                raise ProtocolError("bad_field", "per-device deltas must cover every reporting device, over 'keys'")
        else:
            keys_field(body, plain)
            if set(coverage) - set(plain):
                raise ProtocolError("bad_field", "coverage for a key the delta does not carry")
        return cls(run=run, round=round, attempt=int_field(body, "attempt"), reports=reports,
                   missing=tuple(id_field({"d": d}, "d") for d in missing), delta=delta,
                   edge_time_s=float_field(body, "edge_time_s", 0.0), tag=RoundTag.from_body(body.get("tag")),
                   deltas=deltas, sqnorms=sqnorms, masks=masks, coverage=dict(coverage))


# ------------------------------------------------------------------------------------------------ migration


@dataclass(frozen=True, kw_only=True)
class Ckpt(Message):
    """A migration message; ``migration`` ties the messages of one move together."""

    kind: ClassVar[str] = "ckpt"
    migration: str

    def body(self) -> dict[str, Any]:
        return {"migration": self.migration}

    @classmethod
    def _mid(cls, body: Mapping[str, Any]) -> str:
        return str_field(body, "migration", max_len=64)

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Ckpt:
        return cls(run=run, round=round, migration=cls._mid(body))


@dataclass(frozen=True, kw_only=True)
class Expect(Ckpt):
    op: ClassVar[str] = CkptOp.EXPECT
    source: str

    def body(self) -> dict[str, Any]:
        return {**super().body(), "source": self.source}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Expect:
        return cls(run=run, round=round, migration=cls._mid(body), source=id_field(body, "source"))


@dataclass(frozen=True, kw_only=True)
class Freeze(Ckpt):
    op: ClassVar[str] = CkptOp.FREEZE
    to: str
    path: MovePath
    step: int

    def body(self) -> dict[str, Any]:
        return {**super().body(), "to": self.to, "path": str(self.path), "step": self.step}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Freeze:
        return cls(run=run, round=round, migration=cls._mid(body), to=id_field(body, "to"),
                   path=enum_field(body, "path", MovePath), step=int_field(body, "step", 0))


@dataclass(frozen=True, kw_only=True)
class Frozen(Ckpt):
    op: ClassVar[str] = CkptOp.FROZEN
    checkpoint_bytes: int = 0

    def body(self) -> dict[str, Any]:
        return {**super().body(), "checkpoint_bytes": self.checkpoint_bytes}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Frozen:
        return cls(run=run, round=round, migration=cls._mid(body),
                   checkpoint_bytes=int_field(body, "checkpoint_bytes", 0))


@dataclass(frozen=True, kw_only=True)
class Transfer(Ckpt):
    """The checkpoint itself (``mqttfl.protocol.checkpoint``): validated against the model by the receiver."""

    op: ClassVar[str] = CkptOp.TRANSFER
    device: str
    path: MovePath
    source: str
    checkpoint_bytes: int
    checkpoint: dict[str, Any] = field(default_factory=dict)  # the checkpoint body (format, plan, position)
    checkpoint_tensors: State = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {**self.checkpoint, **super().body(), "device": self.device, "path": str(self.path),
                "source": self.source, "checkpoint_bytes": self.checkpoint_bytes}

    def tensors(self) -> State:
        return dict(self.checkpoint_tensors)

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Transfer:
        own = {"op", "migration", "device", "path", "source", "checkpoint_bytes", "reliable"}
        return cls(run=run, round=round, migration=cls._mid(body), device=id_field(body, "device"),
                   path=enum_field(body, "path", MovePath), source=id_field(body, "source"),
                   checkpoint_bytes=int_field(body, "checkpoint_bytes", 0),
                   checkpoint={k: v for k, v in body.items() if k not in own}, checkpoint_tensors=dict(tensors))


@dataclass(frozen=True, kw_only=True)
class Ready(Ckpt):
    op: ClassVar[str] = CkptOp.READY
    checkpoint_bytes: int = 0
    step: int = 0

    def body(self) -> dict[str, Any]:
        return {**super().body(), "checkpoint_bytes": self.checkpoint_bytes, "step": self.step}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Ready:
        return cls(run=run, round=round, migration=cls._mid(body),
                   checkpoint_bytes=int_field(body, "checkpoint_bytes", 0), step=int_field(body, "step", 0))


@dataclass(frozen=True, kw_only=True)
class Release(Ckpt):
    op: ClassVar[str] = CkptOp.RELEASE


@dataclass(frozen=True, kw_only=True)
class Abort(Ckpt):
    op: ClassVar[str] = CkptOp.ABORT


@dataclass(frozen=True, kw_only=True)
class Leave(Ckpt):
    op: ClassVar[str] = CkptOp.LEAVE


@dataclass(frozen=True, kw_only=True)
class Nothing(Ckpt):
    op: ClassVar[str] = CkptOp.NOTHING


@dataclass(frozen=True, kw_only=True)
class Refused(Ckpt):
    op: ClassVar[str] = CkptOp.REFUSED
    reason: str = ""

    def body(self) -> dict[str, Any]:
        return {**super().body(), "reason": self.reason[:300]}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Refused:
        return cls(run=run, round=round, migration=cls._mid(body), reason=str_field(body, "reason", "", max_len=300))


@dataclass(frozen=True, kw_only=True)
class Restart(Ckpt):
    op: ClassVar[str] = CkptOp.RESTART
    edge: str
    source: str

    def body(self) -> dict[str, Any]:
        return {**super().body(), "edge": self.edge, "source": self.source}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Restart:
        return cls(run=run, round=round, migration=cls._mid(body), edge=id_field(body, "edge"),
                   source=id_field(body, "source"))



# ------------------------------------------------------------------------------------------------ pipelines
# A device's pipeline across its helpers (Eco-FL; docs/design.md, "Pipeline"): the device plans and steers it.

OPT_PREFIX = "opt|"  # optimizer state travels as tensors "opt|<param key>|<state name>"


def _stage_tensors(state: State, optimizer: State) -> State:
    return {**state, **{OPT_PREFIX + k: v for k, v in optimizer.items()}}


def _stage_state(body: Mapping[str, Any], tensors: Mapping[str, Any]) -> tuple[State, State]:
    """(weights, optimizer state) of a stage message: ``keys`` and ``opt`` must name exactly its tensors."""
    keys, opt = body.get("keys", []), body.get("opt", [])
    if not (isinstance(keys, list) and isinstance(opt, list) and all(isinstance(k, str) for k in [*keys, *opt])):
        raise ProtocolError("bad_field", "'keys' and 'opt' must be lists of tensor names")
    names = [*keys, *(OPT_PREFIX + k for k in opt)]
    if set(names) != set(tensors) or len(set(names)) != len(names) or any(OPT_PREFIX in k for k in keys):
        raise ProtocolError("bad_field", "'keys' and 'opt' must list exactly the tensors of the message")
    return {k: tensors[k] for k in keys}, {k: tensors[OPT_PREFIX + k] for k in opt}


@dataclass(frozen=True, kw_only=True)
class StageOpen(Message):
    """device -> helper: train blocks ``[start, stop)`` of the device's round as stage ``index`` of ``stages``
    from mini-batch boundary ``step``, taking activations from ``upstream`` and sending them on to
    ``downstream``; ``state`` and ``optimizer`` are the blocks' weights and optimizer state there (no optimizer
    state at a round's start). ``epoch`` names this layout of the pipeline; a later one replaces it."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "stage"
    plan: Plan
    epoch: int
    step: int
    index: int
    stages: int
    start: int
    stop: int
    upstream: str
    downstream: str
    state: State
    optimizer: State = field(default_factory=dict)
    schema: Description = ()

    def body(self) -> dict[str, Any]:
        return {"plan": self.plan.to_body(), "epoch": self.epoch, "step": self.step, "index": self.index,
                "stages": self.stages, "start": self.start, "stop": self.stop, "upstream": self.upstream,
                "downstream": self.downstream, "schema": _rows(self.schema), "keys": list(self.state),
                "opt": list(self.optimizer)}

    def tensors(self) -> State:
        return _stage_tensors(self.state, self.optimizer)

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> StageOpen:
        state, optimizer = _stage_state(body, tensors)
        index, stages = int_field(body, "index", low=1), int_field(body, "stages", low=3)
        start, stop = int_field(body, "start", low=1), int_field(body, "stop", low=1)
        if not (index < stages - 1 and stages <= MAX_STAGES and start < stop):
            raise ProtocolError("bad_field", f"stage {index} of {stages}, blocks [{start}, {stop})")
        return cls(run=run, round=round, plan=Plan.from_body(_get(body, "plan")), epoch=int_field(body, "epoch", low=1),
                   step=int_field(body, "step"), index=index, stages=stages, start=start, stop=stop,
                   upstream=id_field(body, "upstream"), downstream=id_field(body, "downstream"), state=state,
                   optimizer=optimizer, schema=parse_description(body.get("schema", [])))


@dataclass(frozen=True, kw_only=True)
class ChainSet(Message):
    """device -> its edge: from mini-batch boundary ``step`` the device's activations reach the edge from
    ``upstream`` (its last helper, or the device itself) under layout ``epoch``; at boundary 0 the edge's
    blocks may start at another ``cut``."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "chain"
    attempt: int
    epoch: int
    step: int
    cut: int
    upstream: str

    def body(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "epoch": self.epoch, "step": self.step, "cut": self.cut,
                "upstream": self.upstream}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> ChainSet:
        return cls(run=run, round=round, attempt=int_field(body, "attempt"), epoch=int_field(body, "epoch", low=1),
                   step=int_field(body, "step"), cut=int_field(body, "cut", low=1),
                   upstream=id_field(body, "upstream"))


@dataclass(frozen=True, kw_only=True)
class StageReady(Message):
    """helper or edge -> device: layout ``epoch`` is in place here (or refused, with the reason)."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "staged"
    epoch: int
    ok: bool = True
    reason: str = ""

    def body(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "ok": self.ok, "reason": self.reason[:300]}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> StageReady:
        ok = body.get("ok", True)
        if not isinstance(ok, bool):
            raise ProtocolError("bad_field", "field 'ok' must be a boolean")
        return cls(run=run, round=round, epoch=int_field(body, "epoch"), ok=ok,
                   reason=str_field(body, "reason", "", max_len=300))


@dataclass(frozen=True, kw_only=True)
class StageClose(Message):
    """device -> helper: forget my stage (the round is over, or the helper left the pipeline)."""

    kind: ClassVar[str] = "model"
    op: ClassVar[str] = "unstage"
    epoch: int

    def body(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> StageClose:
        return cls(run=run, round=round, epoch=int_field(body, "epoch"))


@dataclass(frozen=True, kw_only=True)
class StageState(Message):
    """helper -> device: its blocks' weights and optimizer state at mini-batch boundary ``step`` (after the
    flush, before the mini-batch's last gradient goes upstream), so the device always holds every stage's
    state at the boundary it stands at: enough to redo a mini-batch without a helper that vanished."""

    kind: ClassVar[str] = "delta"
    op: ClassVar[str] = "stage"
    epoch: int
    step: int
    state: State
    optimizer: State = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "keys": list(self.state), "opt": list(self.optimizer)}

    def tensors(self) -> State:
        return _stage_tensors(self.state, self.optimizer)

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> StageState:
        state, optimizer = _stage_state(body, tensors)
        return cls(run=run, round=round, epoch=int_field(body, "epoch", low=1), step=int_field(body, "step"),
                   state=state, optimizer=optimizer)


@dataclass(frozen=True, kw_only=True)
class ProfileAsk(Message):
    """device -> helper or edge: time the plan's model here, per block, on micro-batches of ``rows`` samples."""

    kind: ClassVar[str] = "profile"
    op: ClassVar[str] = "ask"
    plan: Plan
    rows: int
    schema: Description = ()

    def body(self) -> dict[str, Any]:
        return {"plan": self.plan.to_body(), "rows": self.rows, "schema": _rows(self.schema)}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> ProfileAsk:
        return cls(run=run, round=round, plan=Plan.from_body(_get(body, "plan")), rows=int_field(body, "rows", low=1),
                   schema=parse_description(body.get("schema", [])))


@dataclass(frozen=True, kw_only=True)
class StageProfile(Message):
    """helper or edge -> device: seconds of forward and backward per block for ``rows`` samples here, and the
    memory this node offers for a stage (0: no limit)."""

    kind: ClassVar[str] = "profile"
    op: ClassVar[str] = "stage"
    rows: int
    block_s: tuple[float, ...]
    memory_bytes: int = 0

    def body(self) -> dict[str, Any]:
        return {"rows": self.rows, "block_s": list(self.block_s), "memory_bytes": self.memory_bytes}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> StageProfile:
        return cls(run=run, round=round, rows=int_field(body, "rows", low=1),
                   block_s=numbers_field(body, "block_s", MAX_BLOCKS), memory_bytes=int_field(body, "memory_bytes", 0))


# ------------------------------------------------------------------------------------------------ profiles

MAX_PROBE_BYTES = 4 * 1024 * 1024


def _numbers(body: Mapping[str, Any], name: str, integer: bool = False) -> tuple[Any, ...]:
    v = _get(body, name)
    if not isinstance(v, list) or len(v) > MAX_BLOCKS:
        raise ProtocolError("bad_field", f"{name!r} must be a list of at most {MAX_BLOCKS} numbers")
    check = int_field if integer else float_field
    return tuple(check({"v": x}, "v") for x in v)


@dataclass(frozen=True, kw_only=True)
class EdgeProfile(Message):
    """edge -> cloud: forward + backward seconds and training memory of each block of the model, measured on this
    node for one mini-batch of ``batch_size`` (split-point planning, docs/algorithms.md)."""

    kind: ClassVar[str] = "profile"
    op: ClassVar[str] = "edge"
    fingerprint: str
    batch_size: int
    block_s: tuple[float, ...]
    block_bytes: tuple[int, ...]

    def body(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "batch_size": self.batch_size, "block_s": list(self.block_s),
                "block_bytes": list(self.block_bytes)}

    @classmethod
    def _fields(cls, body: Mapping[str, Any]) -> dict[str, Any]:
        block_s, block_bytes = _numbers(body, "block_s"), _numbers(body, "block_bytes", integer=True)
        if len(block_s) != len(block_bytes):
            raise ProtocolError("bad_field", "block_s and block_bytes must have one entry per block")
        return {"fingerprint": str_field(body, "fingerprint", max_len=64),
                "batch_size": int_field(body, "batch_size", low=1), "block_s": block_s, "block_bytes": block_bytes}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> EdgeProfile:
        return cls(run=run, round=round, **cls._fields(body))


@dataclass(frozen=True, kw_only=True)
class DeviceProfile(EdgeProfile):
    """device -> cloud: its blocks as :class:`EdgeProfile`, its link to ``edge`` (bytes per second and one-way
    latency, from probes on the real connection; bandwidth 0: not measured) and its memory limit (bytes, 0:
    none)."""

    op: ClassVar[str] = "device"
    edge: str
    bandwidth: float
    latency_s: float
    memory_limit: int = 0

    def body(self) -> dict[str, Any]:
        return {**super().body(), "edge": self.edge, "bandwidth": self.bandwidth, "latency_s": self.latency_s,
                "memory_limit": self.memory_limit}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> DeviceProfile:
        return cls(run=run, round=round, **cls._fields(body), edge=id_field(body, "edge"),
                   bandwidth=float_field(body, "bandwidth"), latency_s=float_field(body, "latency_s"),
                   memory_limit=int_field(body, "memory_limit", 0))


@dataclass(frozen=True, kw_only=True)
class Probe(Message):
    """device -> edge: measure the link: ``pad`` bytes out, ``reply_bytes`` back in the :class:`Echo`."""

    kind: ClassVar[str] = "profile"
    op: ClassVar[str] = "probe"
    seq: int
    reply_bytes: int
    pad: np.ndarray

    def body(self) -> dict[str, Any]:
        return {"seq": self.seq, "reply_bytes": self.reply_bytes}

    def tensors(self) -> State:
        return {"pad": self.pad}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Probe:
        reply = int_field(body, "reply_bytes")
        if reply > MAX_PROBE_BYTES:
            raise ProtocolError("bad_field", f"a probe may ask for at most {MAX_PROBE_BYTES} bytes back")
        return cls(run=run, round=round, seq=int_field(body, "seq"), reply_bytes=reply, pad=tensor(tensors, "pad"))


@dataclass(frozen=True, kw_only=True)
class Echo(Message):
    """edge -> device: the answer to a :class:`Probe`."""

    kind: ClassVar[str] = "profile"
    op: ClassVar[str] = "echo"
    seq: int
    pad: np.ndarray

    def body(self) -> dict[str, Any]:
        return {"seq": self.seq}

    def tensors(self) -> State:
        return {"pad": self.pad}

    @classmethod
    def from_wire(cls, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Echo:
        return cls(run=run, round=round, seq=int_field(body, "seq"), pad=tensor(tensors, "pad"))


# ------------------------------------------------------------------------------------------------ parsing

MESSAGES: dict[tuple[str, str], type[Message]] = {
    (c.kind, str(c.op)): c
    for c in (OpenRound, TrainRound, Resume, Activations, Gradients, DeviceUpdate, EdgeUpdate, Expect, Freeze,
              Frozen, Transfer, Ready, Release, Abort, Leave, Nothing, Refused, Restart, OpenEval, EvaluateModel,
              EvalReport, StageOpen, ChainSet, StageReady, StageClose, StageState, ProfileAsk, StageProfile,
              DeviceProfile, EdgeProfile, Probe, Echo)
}


def parse(kind: str, run: str, round: int, body: Mapping[str, Any], tensors: Mapping[str, Any]) -> Message:
    """The typed message of a decoded envelope; ProtocolError for an unknown operation or a bad field."""
    op = body.get("op")
    cls = MESSAGES.get((kind, op)) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError("bad_field", f"unknown {kind} operation {op!r}")
    try:
        return cls.from_wire(run, round, body, tensors)
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # A gap in the checks above must drop the message, never reach a machine.
        raise ProtocolError("bad_field", f"{kind}/{op}: {type(e).__name__}: {e}") from None
