"""A helper's protocol machine: middle stages of other devices' pipelines (Eco-FL; docs/design.md, "Pipeline").

Theory of operation. A device agent whose ``[device] serve`` names client devices is a *helper*: each client may
make it a middle stage of its pipeline (``StageOpen``: blocks, neighbours, weights and optimizer state at a
mini-batch boundary, a layout ``epoch``). The stage holds one link end on each side (``mqttfl.protocol.links``):

- *upstream* (:class:`Upstream`): activations are taken strictly in (step, micro) order; one that was already
  answered is answered again from the gradient cache and trains nothing; one that is taken and waits for its
  forward, or whose gradient is still downstream, is ignored when re-sent (the answer comes when it can); one
  ahead of the expected key is dropped for the sender to re-send;
- *downstream* (:class:`Downstream`): forwarded activations stay outstanding until their gradient returns and
  are re-sent when a gradient is overdue or the link comes back.

Between the two the stage follows its schedule (``mqttfl.protocol.schedule``: K_s forwards, then one backward
one forward, then the drain; or GPipe's all forwards first). At the last backward of a mini-batch it steps its
optimizer (the flush), sends its blocks' weights and optimizer state at the new boundary to the client
(``StageState``), and only then the mini-batch's last gradient upstream: so the client holds every stage's
state at the boundary it stands at, and a helper that vanishes costs at most the mini-batch in progress. Each
gradient going upstream carries what this stage measured (its compute per micro-batch as a moving average, the
most micro-batches it stashed, the inbound link's bytes per second) in front of what the stages below measured.

A layout with a later epoch replaces the session (its stash and half-accumulated gradients go with it: the
client resends the mini-batch); messages of another epoch are ignored. ``StageClose`` forgets the session. A
``ProfileAsk`` is answered with this node's time per block (a ``Profile`` job).

:class:`HelperDevice` puts a helper and a device's own :class:`~mqttfl.protocol.device.DeviceMachine` in one
node: a board that trains its own data and helps its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mqttfl.protocol import stage
from mqttfl.protocol.device import DeviceMachine
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import (
    Command,
    Count,
    Drop,
    Effect,
    Emit,
    Event,
    JobDone,
    LinkChanged,
    Log,
    Received,
    Reply,
    Run,
    Send,
    SetStatus,
    SetTimer,
    Started,
    StatusSeen,
    TimerFired,
)
from mqttfl.protocol.links import Downstream, Upstream
from mqttfl.protocol.messages import (
    Activations,
    Gradients,
    ProfileAsk,
    StageClose,
    StageOpen,
    StageProfile,
    StageReady,
    StageState,
)
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schedule import Action, actions
from mqttfl.protocol.schema import ModelRef, ModelSchema, check_state, mismatch
from mqttfl.protocol.status import NodeState

SchemaSource = Callable[[ModelRef], ModelSchema]
Key = tuple[int, int]
TIMER = "stage"  # timer keys are (TIMER, client)
EMA = 0.5  # weight of a new micro-batch in a stage's moving average of its compute time


State = dict[str, np.ndarray]


def check_optimizer(optimizer: State, weights: State, what: str) -> State:
    """Optimizer state ``"<param>|<name>"`` only for parameters of ``weights``, finite float arrays."""
    out = {}
    for k, v in optimizer.items():
        param, sep, name = k.partition("|")
        if not sep or param not in weights or not name:
            raise ProtocolError("bad_field", f"{what}: optimizer state {k!r} names no parameter of the stage")
        if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or not np.isfinite(v).all():
            raise ProtocolError("bad_field", f"{what}: optimizer state {k!r} is not a finite float array")
        out[k] = np.array(v, dtype=np.float32)
    return out


@dataclass
class StageSession:
    """One client's middle stage at this helper, under one layout (epoch)."""

    client: str
    plan: Plan
    epoch: int
    index: int
    stages: int
    start: int
    stop: int
    upstream: str
    downstream: str
    sid: str
    step: int
    activation: tuple[int, ...]
    up: Upstream
    down: Downstream
    ready: bool = False  # its stage is open (the Open job done)
    held: dict[Key, Activations] = field(default_factory=dict)  # taken in order, waiting for their forward
    actions: list[Action] = field(default_factory=list)
    pos: int = 0
    waiting: stage.Job | None = None
    asked_at: float = 0.0  # when ``waiting`` was asked (its duration is this stage's compute)
    fwd_s: dict[Key, float] = field(default_factory=dict)
    ema_s: float = 0.0
    in_flight: int = 0
    peak_stash: int = 0
    link_bps: float = 0.0
    last_up: Gradients | None = None  # the mini-batch's last gradient, sent once the state went to the client
    outputs: dict[Key, Activations] = field(default_factory=dict)  # what each forward received (labels, size)


class StageServer:
    """See the module docstring. ``serve``: the client devices this node may be a stage for (its owner's trust);
    ``memory_bytes``: what it offers a stage (reported in its profile; 0: no limit)."""

    def __init__(self, node: str, *, serve: tuple[str, ...], schemas: SchemaSource, memory_bytes: int = 0,
                 act_timeout_s: float = 10.0, id_prefix: str = "0") -> None:
        self.node = node
        self.serve = tuple(serve)
        self.schemas = schemas
        self.memory_bytes = memory_bytes
        self.act_timeout_s = act_timeout_s
        self.sessions: dict[str, StageSession] = {}
        self._jobs: dict[stage.Job, tuple[str, StageSession | None, Any]] = {}
        self._ids = 0
        self._id_prefix = id_prefix
        self._fx: list[Effect] = []

    # ------------------------------------------------------------------ interface
    def presence(self) -> dict[str, Any]:
        return {"serves": list(self.serve)}

    def metrics(self) -> dict[str, Any]:
        return {"stages": {c: {"index": s.index, "stages": s.stages, "blocks": [s.start, s.stop], "epoch": s.epoch,
                               "step": s.step, "ms": round(s.ema_s * 1000, 3), "stash": s.peak_stash}
                           for c, s in sorted(self.sessions.items())}}

    @property
    def commands(self) -> tuple[str, ...]:
        return ()

    def owns(self, job: stage.Job) -> bool:
        return job in self._jobs

    def handle(self, ev: Event, now: float) -> list[Effect]:
        self._fx = []
        if isinstance(ev, Received):
            self._on_message(ev, now)
        elif isinstance(ev, JobDone):
            self._on_job(ev, now)
        elif isinstance(ev, TimerFired) and isinstance(ev.key, tuple) and ev.key[0] == TIMER:
            s = self.sessions.get(ev.key[1])
            if s is not None:
                self._on_timer(s, now)
        elif isinstance(ev, LinkChanged) and ev.up:
            for s in self.sessions.values():
                if s.down.outstanding:
                    self._resend(s, now)
        elif isinstance(ev, Command):
            self._do(Reply(ev, False, error=f"unknown command {ev.cmd!r}", code="unknown_command"))
        fx, self._fx = self._fx, []
        return fx

    # ------------------------------------------------------------------ helpers
    def _do(self, *effects: Effect) -> None:
        self._fx.extend(effects)

    def _run(self, job: stage.Job, what: str, s: StageSession | None, ctx: Any = None, now: float = 0.0) -> None:
        self._jobs[job] = (what, s, ctx)
        if s is not None and what in ("forward", "backward", "step", "snapshot"):
            s.waiting, s.asked_at = job, now
        self._do(Run(job))

    def _new_sid(self, client: str) -> str:
        self._ids += 1
        return f"{client}/h{self._id_prefix}.{self._ids}"

    def _close(self, s: StageSession) -> None:
        self._do(Run(stage.Close(s.sid)))
        s.ready = False

    # ------------------------------------------------------------------ messages
    def _on_message(self, ev: Received, now: float) -> None:
        msg = ev.msg
        if isinstance(msg, StageOpen):
            self._on_open(ev, msg, now)
        elif isinstance(msg, Activations):
            self._on_act(ev, msg, now)
        elif isinstance(msg, Gradients):
            self._on_grad(ev, msg, now)
        elif isinstance(msg, StageClose):
            s = self.sessions.get(ev.src)
            if s is not None and msg.epoch >= s.epoch:
                self._close(self.sessions.pop(ev.src))
                self._do(Log("info", "stage closed", {"client": ev.src, "epoch": msg.epoch}))
        elif isinstance(msg, ProfileAsk):
            self._on_profile_ask(ev, msg)
        else:
            self._do(Drop("unexpected", f"{msg.kind}/{msg.op} is not for a helper", ev.src))

    def _schema(self, plan: Plan, cloud_schema: Any) -> ModelSchema:
        try:
            schema = self.schemas(plan.model_ref)
        except Exception as e:  # a user's model that does not build here
            raise ProtocolError("model_mismatch",
                                f"cannot build model {plan.model!r}: {type(e).__name__}: {e}") from None
        differs = mismatch(schema, plan.fingerprint, plan.model, cloud_schema)
        if differs is not None:
            raise ProtocolError("model_mismatch", differs)
        return schema

    def _on_profile_ask(self, ev: Received, msg: ProfileAsk) -> None:
        if ev.src not in self.serve:
            self._do(Drop("not_served", f"{ev.src} is not a device this node serves ([device] serve)", ev.src))
            return
        try:
            schema = self._schema(msg.plan, msg.schema)
        except ProtocolError as e:
            self._do(Drop(e.code, str(e), ev.src))
            return
        if msg.rows > msg.plan.batch_size or schema.n_blocks < 2:
            self._do(Drop("bad_field", f"profile of {msg.rows} rows, batch {msg.plan.batch_size}", ev.src))
            return
        self._ids += 1
        self._run(stage.Profile(f"profile{self._id_prefix}.{self._ids}", msg.plan, msg.rows), "profile", None,
                  (ev.src, msg))

    def _on_open(self, ev: Received, msg: StageOpen, now: float) -> None:
        client = ev.src
        old = self.sessions.get(client)
        if old is not None and (msg.epoch < old.epoch or (msg.epoch == old.epoch and msg.plan.key == old.plan.key)):
            if msg.epoch == old.epoch and old.ready:
                self._do(Send(client, StageReady(run=msg.run, round=msg.round, epoch=msg.epoch)))  # a repeat
            return
        try:
            if client not in self.serve:
                raise ProtocolError("not_served", f"{client} is not a device this node serves ([device] serve)")
            schema = self._schema(msg.plan, msg.schema)
            if msg.stop >= schema.n_blocks:
                raise ProtocolError("bad_field", f"blocks [{msg.start}, {msg.stop}) of {schema.n_blocks}: the last "
                                                 "stage is the edge's")
            state = check_state(msg.state, schema.specs(msg.start, msg.stop), f"stage of {client}")
            optimizer = check_optimizer(msg.optimizer, state, f"stage of {client}")
        except (ProtocolError, ValueError) as e:
            code = getattr(e, "code", "bad_field")
            self._do(Drop(code, str(e), client),
                     Send(client, StageReady(run=msg.run, round=msg.round, epoch=msg.epoch, ok=False,
                                             reason=str(e)[:300])))
            return
        if old is not None:
            self._close(old)
        s = StageSession(client, msg.plan, msg.epoch, msg.index, msg.stages, msg.start, msg.stop, msg.upstream,
                         msg.downstream, self._new_sid(client), msg.step, schema.activation(msg.start),
                         up=Upstream(expected=(msg.step, 0)), down=Downstream(self.act_timeout_s))
        if old is not None and old.plan.key == msg.plan.key:
            s.peak_stash, s.ema_s, s.link_bps = old.peak_stash, old.ema_s, old.link_bps
        self.sessions[client] = s
        self._run(stage.Open(s.sid, msg.plan, msg.start, msg.stop, state, optimizer=optimizer or None), "open", s)
        self._do(Log("info", "stage open", {"client": client, "epoch": msg.epoch, "stage": msg.index,
                                            "blocks": [msg.start, msg.stop], "step": msg.step}))

    def _on_act(self, ev: Received, msg: Activations, now: float) -> None:
        client = msg.client or ev.src
        s = self.sessions.get(client)
        if s is None or ev.src != s.upstream or msg.run != s.plan.run or msg.round != s.plan.round \
                or msg.attempt != s.plan.attempt:
            self._do(Drop("unknown_sender", f"act for {client} from {ev.src}, not a stage here", ev.src))
            return
        if msg.epoch != s.epoch:
            self._do(Count("stage_stale_epoch"))  # sent under a layout that is gone
            return
        cached = s.up.answered(msg)
        if cached is not None:
            self._do(Send(ev.src, cached), Count("grad_resent"))
            return
        if msg.key in s.held or msg.key in s.down.outstanding:
            return  # re-sent while we work on it: the answer comes when its gradient is back
        try:
            if msg.key == s.up.expected:
                check_input(msg, s.activation, s.plan)
            s.up.take(msg)
        except ProtocolError as e:
            self._do(Drop(e.code, f"{e} (from {ev.src})", ev.src))
            return
        if ev.transit_s > 0:
            s.link_bps = link_speed(s.link_bps, msg.x.nbytes / ev.transit_s)
        s.held[msg.key] = msg
        self._advance(s, now)

    def _on_grad(self, ev: Received, msg: Gradients, now: float) -> None:
        s = self.sessions.get(msg.client or "")
        if s is None or ev.src != s.downstream or msg.run != s.plan.run or msg.round != s.plan.round:
            self._do(Drop("wrong_round", f"grad for {msg.client or '?'} from {ev.src}", ev.src))
            return
        if msg.epoch != s.epoch:
            self._do(Count("stage_stale_epoch"))
            return
        try:
            if not s.down.accept(msg):
                return
        except ProtocolError as e:
            self._do(Drop(e.code, str(e), ev.src))
            return
        self._advance(s, now)

    # ------------------------------------------------------------------ the schedule
    def _advance(self, s: StageSession, now: float) -> None:
        if not s.ready or s.waiting is not None or s.last_up is not None:
            return
        if not s.actions:
            first = s.held.get((s.step, 0))
            if first is None:
                return  # the mini-batch has not begun here
            s.actions, s.pos = actions(s.stages, first.n_micro, s.index, s.plan.pipeline_schedule), 0
        a = s.actions[s.pos]
        if a.op == "F":
            act = s.held.get((s.step, a.micro))
            if act is not None:
                self._run(stage.Forward(s.sid, s.step, a.micro, act.n_micro, x=act.x, y=act.y), "forward", s, act, now)
            return
        g = s.down.grads.get((s.step, a.micro))
        if g is None:
            if s.down.blocked_since is None:
                s.down.blocked_since = now
            return
        s.down.blocked_since = None
        self._run(stage.Backward(s.sid, s.step, a.micro, g.g), "backward", s, g, now)

    def _on_job(self, ev: JobDone, now: float) -> None:
        what, s, ctx = self._jobs.pop(ev.job, ("", None, None))
        if what == "profile":
            client, ask = ctx
            if ev.error is None:
                self._do(Send(client, StageProfile(run=ask.run, round=ask.round, rows=ask.rows,
                                                   block_s=tuple(ev.result.block_s), memory_bytes=self.memory_bytes)))
            return
        if s is None or self.sessions.get(s.client) is not s:
            return  # a session replaced or closed meanwhile
        if ev.error is not None:
            self._do(Emit("stage_failed", "error", {"client": s.client, "job": type(ev.job).__name__,
                                                    "error": ev.error[:300]}))
            self._close(self.sessions.pop(s.client))
            self._do(Send(s.client, StageReady(run=s.plan.run, round=s.plan.round, epoch=s.epoch, ok=False,
                                               reason=f"stage failed: {ev.error[:200]}")))
            return
        if what == "open":
            s.ready = True
            self._do(Send(s.client, StageReady(run=s.plan.run, round=s.plan.round, epoch=s.epoch)))
            self._advance(s, now)
            return
        s.waiting = None
        took = max(0.0, now - s.asked_at)
        if what == "forward":
            self._forwarded(s, ev.job, ctx, ev.result, took, now)
        elif what == "backward":
            self._backwarded(s, ev.job, ctx, ev.result, took, now)
        elif what == "step":
            self._run(stage.Snapshot(s.sid), "snapshot", s, None, now)
            return
        elif what == "snapshot":
            snap: stage.StageSnapshot = ev.result
            self._do(Send(s.client, StageState(run=s.plan.run, round=s.plan.round, epoch=s.epoch, step=s.step + 1,
                                               state=snap.weights, optimizer=snap.optimizer)))
            last, s.last_up = s.last_up, None
            assert last is not None
            self._do(Send(s.upstream, last))
            s.step += 1
            s.actions, s.pos = [], 0
        self._advance(s, now)

    def _forwarded(self, s: StageSession, job: stage.Job, act: Activations, res: stage.Smashed, took: float,
                   now: float) -> None:
        assert isinstance(job, stage.Forward)
        key = (job.step, job.micro)
        out = Activations(run=s.plan.run, round=s.plan.round, step=job.step, micro=job.micro, n_micro=act.n_micro,
                          batch_size=act.batch_size, attempt=act.attempt, x=res.x, y=act.y, client=s.client,
                          epoch=s.epoch)
        s.held.pop(key, None)
        s.fwd_s[key] = took
        s.in_flight += 1
        s.peak_stash = max(s.peak_stash, s.in_flight)
        s.down.sent(out, now)
        s.pos += 1
        self._do(Send(s.downstream, out), SetTimer((TIMER, s.client), s.down.due))

    def _backwarded(self, s: StageSession, job: stage.Job, g: Gradients, grad_in: np.ndarray | None, took: float,
                    now: float) -> None:
        assert isinstance(job, stage.Backward) and grad_in is not None
        key = (job.step, job.micro)
        spent = s.fwd_s.pop(key, 0.0) + took
        s.ema_s = spent if not s.ema_s else (1 - EMA) * s.ema_s + EMA * spent
        s.in_flight -= 1
        s.down.settled(key)
        up = Gradients(run=s.plan.run, round=s.plan.round, step=job.step, micro=job.micro, loss_sum=g.loss_sum,
                       correct=g.correct, g=grad_in, client=s.client, epoch=s.epoch,
                       stage_s=(s.ema_s, *g.stage_s), stash=(s.peak_stash, *g.stash),
                       link_bps=(s.link_bps, *g.link_bps))
        s.up.remember(up)
        s.pos += 1
        if s.pos < len(s.actions):
            self._do(Send(s.upstream, up))
            return
        # The flush: step, hand the client our state at the new boundary, then the mini-batch's last gradient.
        s.last_up = up
        self._run(stage.Step(s.sid), "step", s, None, now)

    # ------------------------------------------------------------------ re-sends
    def _resend(self, s: StageSession, now: float) -> None:
        for act in s.down.resend(now):
            self._do(Send(s.downstream, act))
        self._do(SetTimer((TIMER, s.client), s.down.due))

    def _on_timer(self, s: StageSession, now: float) -> None:
        down = s.down
        if not down.outstanding:
            return
        if now < down.due:
            self._do(SetTimer((TIMER, s.client), down.due))
        elif down.blocked_since is None:
            self._do(SetTimer((TIMER, s.client), now + self.act_timeout_s))
        else:
            self._resend(s, now)


def link_speed(known: float, sample: float) -> float:
    """The inbound link's bytes per second: the fastest transfer seen lately. A message's transit includes the
    time it queued while this stage computed, which says nothing of the link; the fastest ones do."""
    return max(known * 0.95, sample)


def check_input(msg: Activations, shape: tuple[int, ...], plan: Plan) -> None:
    """A middle stage's input: float32 activations of the expected shape, finite, within the batch size; the
    labels only travel on (the last stage checks them)."""
    x = msg.x
    if x.dtype != np.float32 or tuple(x.shape[1:]) != tuple(shape):
        raise ProtocolError("bad_shape", f"activations {x.dtype}{tuple(x.shape)}, expected float32 (n, *{shape})")
    if not np.isfinite(x).all():
        raise ProtocolError("non_finite", "activations have NaN/Inf")
    if not 0 < x.shape[0] <= msg.batch_size <= plan.batch_size or len(msg.y) != x.shape[0]:
        raise ProtocolError("bad_shape", f"{x.shape[0]} rows, {len(msg.y)} labels, batch {msg.batch_size}")


class HelperDevice:
    """One node that is a device with its own data and a helper for others (``[device] serve``): events go to
    the machine they are for, effects come back in order."""

    def __init__(self, device: DeviceMachine | None, server: StageServer) -> None:
        self.device = device
        self.server = server

    def presence(self) -> dict[str, Any]:
        return {**(self.device.presence() if self.device else {}), **self.server.presence()}

    def metrics(self) -> dict[str, Any]:
        return {**(self.device.metrics() if self.device else {}), **self.server.metrics()}

    @property
    def commands(self) -> tuple[str, ...]:
        return (self.device.commands if self.device else ()) + self.server.commands

    def _for_server(self, ev: Event) -> bool:
        if isinstance(ev, Received):
            msg = ev.msg
            if isinstance(msg, Gradients):
                return bool(msg.client) and msg.client != self.server.node
            return isinstance(msg, (StageOpen, StageClose, ProfileAsk, Activations))
        if isinstance(ev, JobDone):
            return self.server.owns(ev.job)
        if isinstance(ev, TimerFired):
            return isinstance(ev.key, tuple) and ev.key[0] == TIMER
        return isinstance(ev, Command) and self.device is None

    def handle(self, ev: Event, now: float) -> list[Effect]:
        if isinstance(ev, (Started, LinkChanged)):
            first = self.device.handle(ev, now) if self.device else \
                [SetStatus(NodeState.IDLE)] if isinstance(ev, Started) else []
            return [*first, *self.server.handle(ev, now)]
        if isinstance(ev, StatusSeen):
            return []
        if self._for_server(ev) or self.device is None:
            return self.server.handle(ev, now)
        return self.device.handle(ev, now)
