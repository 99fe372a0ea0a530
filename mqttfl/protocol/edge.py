"""The edge's protocol machine: the last stage for each attached device (SplitFed V1), pre-aggregation,
and both ends of a migration.

Theory of operation (docs/design.md, "Round"). A cloud ``OpenRound`` opens one *session* per device: that
device's copy of the edge-side blocks and optimizer (a stage job session) and its upstream link
(``mqttfl.protocol.links.Upstream``): the data position ``expected`` (the next (step, micro)) and a small
cache of the gradients it returned. Activations must arrive in (step, micro) order; a re-sent micro-batch that
was already processed is answered from the cache and trains nothing (exactly-once effect). The optimizer steps
once per device mini-batch. When every device of the round has sent its delta (or the deadline,
``deadline_fraction`` of the cloud's, passes) the edge sends one delta to the cloud: the sample-weighted mean
of its devices' full-model deltas, so the cloud's weighted mean over edges is flat FedAvg over devices.
Several rounds may be open at once (asynchronous groups); a device is in at most one. When the round's
strategy may not pre-aggregate (``plan.preaggregate`` false: robust rules, FedNova), the edge forwards each
device's delta instead of their mean.

Tensors go out in the encodings of each device (``TrainRound`` in its ``model`` encoding, gradients in the one
each act asks for) and the edge's delta in ``[edge] delta_encoding`` (the plan's by default).

FedLAMA (``plan.fedlama``): layers are aggregated at their own intervals, and only the layers due travel. The
edge keeps a copy of the global model (the cloud sends only the layers it just aggregated, ``partial``), each
device's edge-side layers at the end of its recent rounds, and which devices trained here last round: those
get only the changed layers and open from their own; anyone else gets the whole part.

The edge builds every plan's model itself and refuses a round (or an evaluation) whose model differs from the
cloud's fingerprint, naming the first differing tensor on ``event`` and in its status; the cloud then leaves the
edge's devices out of the run. Federated evaluation: an ``OpenEval`` is passed on to each named device with
the whole global model; the devices report to the cloud themselves.

A device may pipeline its blocks across helpers (Eco-FL; docs/design.md, "Pipeline"): the round's announcement
names its helpers, the device gets the whole model and plans the stages, and this edge is the last stage. The
device's ``ChainSet`` says which node sends its activations (its last helper, or itself) under which layout
epoch, and at boundary 0 where the edge's blocks start; activations from anyone else, or of another epoch, are
dropped. When the device redoes a mini-batch on a new layout (a helper vanished), the micro-batches this edge
already answered are answered again from its cache, trained once. Gradients sent up carry what the edge
measured (its compute per micro-batch, its inbound link) for the device's planner. Pipelined sessions are not
saved for edge resume: after a restart the device rejoins the round.

Migration, at this edge as source: ``freeze`` snapshots the session at a mini-batch boundary and sends the
checkpoint to the destination (``direct``) or the device (``relay``); ``release`` forgets it, ``abort``
unfreezes it. As destination: ``expect`` names the only source whose checkpoint is accepted for that move
(the device's word: the broker authenticates it); ``transfer`` is validated against the model, installed as
a new session and answered with ``ready``; ``abort`` forgets a session installed for that move.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mqttfl.fl.aggregate import delta, masked_average, weighted_average
from mqttfl.fl.streaming import RunningMean
from mqttfl.protocol import stage
from mqttfl.protocol.checkpoint import CheckpointError, EdgeCheckpoint, from_message
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import (
    Ack,
    Command,
    Count,
    Drop,
    Effect,
    Emit,
    Event,
    JobDone,
    Log,
    Persist,
    Received,
    ReconnectWithin,
    Reply,
    Run,
    Send,
    SetStatus,
    SetTimer,
    Started,
    TimerFired,
)
from mqttfl.protocol.hetero import LocalModel, compact, expand
from mqttfl.protocol.links import Upstream
from mqttfl.protocol.messages import (
    MAX_GROUP,
    Abort,
    Activations,
    ChainSet,
    DeviceUpdate,
    Echo,
    EdgeProfile,
    EdgeSession,
    EdgeUpdate,
    EvaluateModel,
    Expect,
    Freeze,
    Frozen,
    Gradients,
    Leave,
    MovePath,
    Nothing,
    OpenEval,
    OpenRound,
    Probe,
    ProfileAsk,
    Ready,
    Refused,
    Release,
    Report,
    Resume,
    RoundTag,
    StageProfile,
    StageReady,
    TrainRound,
    Transfer,
)
from mqttfl.protocol.plan import Plan, reconnect_within
from mqttfl.protocol.resume import SavedSession, record_key
from mqttfl.protocol.schema import ModelRef, ModelSchema, check_state, mismatch, state_norm
from mqttfl.protocol.status import NodeState
from mqttfl.wire.topics import BROADCAST

SchemaSource = Callable[[ModelRef], ModelSchema]
Key = tuple[int, int]
RoundKey = tuple[str, int, int]
EXPECTED_TRANSFERS = 256
TOLD = 256  # (device, round) pairs already told that this edge holds no session for them
CLOSED = 64  # rounds this edge finished, remembered to tell a late device so
PROFILE_ROUNDS = 3  # rounds of a model and batch size in which an edge measures its blocks for the planner


State = dict[str, np.ndarray]


@dataclass
class LamaCopy:
    """FedLAMA at an edge: the global model as the cloud has it, and what its devices keep between rounds."""

    run: str
    round: int  # the round whose announcement brought ``state`` up to date
    state: State
    # device -> round -> (cut, its edge-side weights at the end of that round; {} for a local device). Two
    # rounds: a retried round opens from the end of the one before.
    local: dict[str, dict[int, tuple[int, State]]] = field(default_factory=dict)


@dataclass
class Session:
    device: str
    plan: Plan
    cut: int
    sid: str | None  # the stage job session; None: the device trains the whole model locally
    base: dict[str, np.ndarray]  # global state of the edge-side keys, for the delta
    activation: tuple[int, ...] = ()
    up: Upstream = field(default_factory=Upstream)  # activations in order, gradients answered once
    steps: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    delta: dict[str, np.ndarray] | None = None
    report: Report | None = None
    frozen: str | None = None  # migration id while the device's state is on its way to another edge
    installed_by: str | None = None  # migration id that brought this session here (an abort undoes it)
    closing: tuple[Received, DeviceUpdate] | None = None  # a device delta waiting for the stage's weights
    refused: str | None = None  # why the device's delta was refused (it counts as missing)
    mask: State = field(default_factory=dict)  # 0/1 masks of the entries a pruned or width model trained
    saved: int = 0  # the mini-batch boundary this session is saved at (edge resume)
    restored: bool = False  # read back after a restart: the device has yet to come back to ``up.expected``
    # A pipelined device (docs/design.md, "Pipeline"): its helpers in the round's announcement, the node its
    # ChainSet names as the one sending activations here, the layout epoch, and what this stage measured.
    helpers: tuple[str, ...] = ()
    upstream: str = ""
    epoch: int = 0
    ema_s: float = 0.0
    link_bps: float = 0.0
    folded: bool = False  # its delta is in the round's running mean and no longer held here (``delta`` is {})

    @property
    def pipelined(self) -> bool:
        return bool(self.helpers or self.upstream)

    @property
    def over(self) -> bool:
        return self.delta is not None or self.refused is not None


@dataclass
class EdgeRound:
    plan: Plan
    devices: dict[str, int]  # device -> cut
    global_state: dict[str, np.ndarray]
    deadline: float
    started: float
    sessions: dict[str, Session] = field(default_factory=dict)
    sent: bool = False
    tag: RoundTag | None = None  # echoed to the cloud (asynchronous groups: group, version)
    samples: dict[str, int] = field(default_factory=dict)  # what each device declared when it joined
    wall: float | None = None  # wall clock minus this machine's clock, to save the deadline across a restart
    locals: dict[str, LocalModel] = field(default_factory=dict)  # devices that train a class's model
    # A linear rule (plan.preaggregate): the sample-weighted mean of the devices done so far, folded in as they
    # finish, so the edge holds one model's worth of deltas, not one per device (mqttfl.fl.streaming).
    mean: RunningMean | None = None

    def fold(self, s: Session) -> None:
        # A device of a class model (partial keys, masks) stays out: the round's masked mean takes it at the end.
        if s.folded or s.delta is None or s.report is None or s.report.samples <= 0 or s.device in self.locals \
                or s.mask:
            return
        if self.mean is None:
            self.mean = RunningMean(sqnorms=self.plan.fedlama)
        self.mean.add(s.delta, float(s.report.samples))
        s.delta, s.folded = {}, True


class EdgeMachine:
    def __init__(self, node: str, *, schemas: SchemaSource, cloud: str = "cloud", deadline_fraction: float = 0.85,
                 id_prefix: str = "0", restored: dict[str, Any] | None = None, delta_encoding: str = "",
                 group_downloads: bool = True) -> None:
        self.node, self.cloud = node, cloud
        # One announcement to the broadcast topic for the devices whose announcement is identical, instead of
        # one publish (and one encoding of the model) per device.
        self.group_downloads = group_downloads
        self.restored = dict(restored or {})  # saved sessions (key -> record), taken up at Started
        self.delta_encoding = delta_encoding  # "": the plan's
        self.lama: LamaCopy | None = None
        self.schemas = schemas
        self.deadline_fraction = deadline_fraction
        self.rounds: dict[RoundKey, EdgeRound] = {}
        self.device_round: dict[str, RoundKey] = {}
        self.rounds_done = 0
        # (device, migration id) -> source edge: announced by the device itself (the broker authenticates
        # it), so a checkpoint from any other sender is refused. Bounded: oldest forgotten first.
        self.expected_transfers: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._jobs: dict[stage.Job, tuple[str, Any]] = {}  # job -> (what, context) for results we act on
        self.refused: tuple[str, str] | None = None  # (run, reason) of the last plan refused
        self.told: OrderedDict[tuple[str, RoundKey], None] = OrderedDict()
        self.closed: OrderedDict[RoundKey, None] = OrderedDict()
        self._ids = 0
        self._id_prefix = id_prefix
        self._fx: list[Effect] = []
        self.profiled: tuple[str, int] | None = None  # (fingerprint, batch size) this edge reported its blocks for
        self.profiles = 0  # times it measured them
        self.fastest: stage.BlockProfile | None = None  # the fastest of each block over those measurements

    # ------------------------------------------------------------------ interface
    def presence(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done, "open_rounds": [k[1] for k in self.rounds],
                "devices": sorted(self.device_round)}

    @property
    def commands(self) -> tuple[str, ...]:
        return ()

    def handle(self, ev: Event, now: float) -> list[Effect]:
        self._fx = []
        if isinstance(ev, Received):
            self._on_message(ev, now)
        elif isinstance(ev, JobDone):
            self._on_job(ev, now)
        elif isinstance(ev, TimerFired):
            r = self.rounds.get(ev.key[1]) if isinstance(ev.key, tuple) and ev.key[0] == "round" else None
            if r is not None and not r.sent and now >= r.deadline:
                self._finish_round(r, now, timed_out=True)
        elif isinstance(ev, Started):
            self._do(SetStatus(NodeState.IDLE))
            if self.restored:
                self._restore(ev, now)
        elif isinstance(ev, Command):
            self._do(Reply(ev, False, error=f"unknown command {ev.cmd!r}", code="unknown_command"))
        fx, self._fx = self._fx, []
        return fx

    def session_of(self, device: str) -> tuple[EdgeRound | None, Session | None]:
        key = self.device_round.get(device)
        r = self.rounds.get(key) if key is not None else None
        return (r, r.sessions.get(device)) if r is not None else (None, None)

    # ------------------------------------------------------------------ helpers
    def _do(self, *effects: Effect) -> None:
        self._fx.extend(effects)

    def _run(self, job: stage.Job, what: str = "", context: Any = None) -> None:
        if what:
            self._jobs[job] = (what, context)
        self._do(Run(job))

    def _drop(self, reason: str, detail: str, src: str) -> None:
        self._do(Drop(reason, detail, src))

    def _set_status(self) -> None:
        busy = [r for r in self.rounds.values() if not r.sent]
        if busy:
            last = busy[-1].plan
            self._do(SetStatus(NodeState.TRAINING, {"round": last.round, "run": last.run,
                                                    "devices": sorted(self.device_round)}),
                     ReconnectWithin(reconnect_within(min(r.plan.deadline_s for r in busy))))
        else:
            self._do(SetStatus(NodeState.IDLE, {"devices": []}), ReconnectWithin(None))

    def _on_message(self, ev: Received, now: float) -> None:
        msg = ev.msg
        handlers: dict[type, Callable[[Received, Any, float], None]] = {
            OpenRound: self._on_open_round, OpenEval: self._on_open_eval, Activations: self._on_act,
            DeviceUpdate: self._on_device_update, ChainSet: self._on_chain, ProfileAsk: self._on_profile_ask,
            Probe: self._on_probe,
            Freeze: self._on_freeze, Transfer: self._on_transfer, Expect: self._on_expect,
            Release: self._on_release, Leave: self._on_leave, Abort: self._on_abort,
        }
        handler = handlers.get(type(msg))
        if handler is None:
            self._drop("unexpected", f"{msg.kind}/{msg.op} is not for an edge", ev.src)
            return
        handler(ev, msg, now)

    # ------------------------------------------------------------------ profiles (split-point planning)
    def _on_probe(self, ev: Received, msg: Probe, now: float) -> None:
        """A device measures its link: answer at once with as many bytes as it asks for."""
        self._do(Send(ev.src, Echo(seq=msg.seq, pad=np.zeros(msg.reply_bytes, np.uint8))))

    def _profile(self, plan: Plan) -> None:
        """Measure this edge's blocks of the plan's model, for the cloud's planner: in the first
        ``PROFILE_ROUNDS`` rounds of a model and batch size. [choice] It reports the fastest time of each block
        so far: an edge shares its CPU with its devices' sessions, and load only ever makes a block slower, so
        the minimum is the least disturbed measurement (the first one runs while the round is starting)."""
        if not plan.profile:
            return
        key = (plan.fingerprint, plan.batch_size)
        if self.profiled != key:
            self.profiled, self.profiles, self.fastest = key, 0, None
        if self.profiles < PROFILE_ROUNDS:
            self.profiles += 1
            self._run(stage.Profile("profile", plan), "profile", key)

    # ------------------------------------------------------------------ round start
    def _schema(self, plan: Plan, cloud_schema: Any) -> ModelSchema | None:
        """The plan's model as this edge builds it, or None after refusing a plan whose model is not the cloud's
        (reported on ``event`` and in the status, where the cloud reads it)."""
        fingerprint = ""
        try:
            schema = self.schemas(plan.model_ref)
        except Exception as e:  # a user's model that does not build here: another version, or not installed
            reason = f"cannot build model {plan.model!r}: {type(e).__name__}: {e}"
        else:
            fingerprint = schema.fingerprint
            differs = mismatch(schema, plan.fingerprint, plan.model, cloud_schema)
            if differs is None:
                if self.refused is not None:
                    self.refused = None
                    self._do(SetStatus(NodeState.IDLE if not self.rounds else NodeState.TRAINING,
                                       {"refused": None, "fingerprint": fingerprint}))
                return schema
            reason = differs
        if self.refused != (plan.run, reason):
            self.refused = (plan.run, reason)
            info = {"run": plan.run, "round": plan.round, "reason": reason, "fingerprint": fingerprint,
                    "expected": plan.fingerprint}
            self._do(Emit("model_mismatch", "error", info), Log("error", "plan refused", info),
                     SetStatus(NodeState.IDLE if not self.rounds else NodeState.TRAINING,
                               {"fingerprint": fingerprint, "refused": {"run": plan.run, "reason": reason[:500]}}))
        return None

    def _on_open_eval(self, ev: Received, msg: OpenEval, now: float) -> None:
        if ev.src != self.cloud:
            self._drop("unknown_sender", f"model from {ev.src}", ev.src)
            return
        schema = self._schema(msg.plan, msg.schema)
        if schema is None:
            return
        try:
            state = check_state(msg.state, schema.specs(), "evaluated model")
        except ProtocolError as e:
            self._drop(e.code, str(e), ev.src)
            return
        for device in msg.devices:
            self._do(Send(device, EvaluateModel(run=msg.plan.run, round=msg.plan.round, plan=msg.plan, edge=self.node,
                                                state=state, schema=msg.schema)))

    def _on_open_round(self, ev: Received, msg: OpenRound, now: float) -> None:
        if ev.src != self.cloud:
            self._drop("unknown_sender", f"model from {ev.src}", ev.src)
            return
        plan = msg.plan
        schema = self._schema(plan, msg.schema)
        if schema is None:
            return
        try:
            for d, c in msg.cuts.items():
                if not 1 <= c <= schema.n_blocks:
                    raise ProtocolError("bad_plan", f"cut {c} for {d} outside 1..{schema.n_blocks}")
            specs = schema.specs()
            if msg.partial:
                if not plan.fedlama:
                    raise ProtocolError("bad_plan", "a partial model outside FedLAMA")
                specs = {k: v for k, v in specs.items() if k in msg.state}
            given = check_state(msg.state, specs, "global model")
        except (ProtocolError, ValueError, KeyError) as e:
            self._drop(getattr(e, "code", "bad_model"), str(e), ev.src)
            return
        state = given
        if plan.fedlama:
            full = self._lama_global(plan, given, msg.partial)
            if full is None:
                # Only the changed layers came, and this edge lost its copy (it restarted): report every device
                # missing at once, so the cloud sends the whole model next round instead of waiting a deadline.
                self._do(Emit("fedlama_state_missing", "warning", {"round": plan.round}))
                self._do(Send(self.cloud, EdgeUpdate(run=plan.run, round=plan.round, attempt=plan.attempt,
                                                     reports={}, missing=tuple(sorted(msg.cuts)), delta={},
                                                     tag=msg.tag), reliable=True))
                return
            state = full
        r = self.rounds.get(plan.key)
        if r is not None:
            # Same round announced again: re-delivery, or the cloud adding a device (migration fallback).
            devices = {d: c for d, c in msg.cuts.items() if d not in r.sessions}
            if not devices:
                return
            r.devices.update(devices)
            r.samples.update(msg.samples)
            # A round opened by a migration holds only edge-side base weights: take the full state now.
            r.global_state.update(state)
        else:
            devices = dict(msg.cuts)
            r = EdgeRound(plan, devices, state, deadline=now + plan.deadline_s * self.deadline_fraction,
                          started=now, tag=msg.tag, samples=dict(msg.samples),
                          wall=ev.received_at - now if ev.received_at else None)
            self._do(SetTimer(("round", plan.key), r.deadline))
        r.locals.update(msg.locals)
        for device in devices:
            self._leave(device, now)  # a newer round supersedes whatever the device was doing
            self.device_round[device] = plan.key
        self.rounds[plan.key] = r
        self._do(Log("info", "round start", {"round": plan.round, "devices": sorted(devices)}))
        grouped, announced = self._groups(plan, msg, devices, schema), set()
        for device, cut in devices.items():
            local = self._lama_local(plan, device, cut)
            r.sessions[device] = s = self._open_session(plan, device, cut, r.global_state, schema,
                                                        None if local is None else {**local, **given})
            # A pipeline needs the whole model at the device (it plans every stage's blocks) and plain rounds.
            chain = msg.chains.get(device, ()) if s.sid is not None and not plan.fedlama and not plan.prox_mu else ()
            s.helpers = tuple(chain)
            self._save(r, s)  # boundary 0: a restart right away resumes from the round's start
            keys = schema.keys(0, schema.n_blocks if chain else cut)
            if local is not None:
                keys = [k for k in keys if k in given]  # the device keeps the rest from last round
            enc = plan.encodings(msg.encodings.get(device))
            group = grouped.get(device)
            if group is not None:
                # Out with its first device's session, as that device's own announcement would have gone.
                if group not in announced:
                    announced.add(group)
                    self._do(Send(BROADCAST, TrainRound(run=plan.run, round=plan.round, plan=plan, cut=cut,
                                                        edge=self.node, state={k: r.global_state[k] for k in keys},
                                                        schema=msg.schema, encodings=enc, devices=group),
                                  encoding=enc["model"]),
                             Count("group_downloads"), Count("group_download_devices", len(group)))
                continue
            self._do(Send(device, TrainRound(run=plan.run, round=plan.round, plan=plan, cut=cut, edge=self.node,
                                             state={k: r.global_state[k] for k in keys}, schema=msg.schema,
                                             encodings=enc, partial=local is not None, helpers=s.helpers,
                                             local=msg.locals.get(device)), encoding=enc["model"]))
        self._set_status()
        self._profile(plan)
        if not devices:
            self._finish_round(r, now)

    def _groups(self, plan: Plan, msg: OpenRound, devices: dict[str, int], schema: ModelSchema
                ) -> dict[str, tuple[str, ...]]:
        """Group downloads: each device whose announcement is the same as at least one other's (same cut and
        encodings; no FedLAMA layers, pipeline or class model of its own) -> the devices of that announcement."""
        if not self.group_downloads:
            return {}
        alike: dict[tuple[int, tuple[tuple[str, str], ...]], list[str]] = {}
        for device, cut in devices.items():
            chained = cut < schema.n_blocks and bool(msg.chains.get(device)) and not plan.fedlama and not plan.prox_mu
            if chained or msg.locals.get(device) is not None or self._lama_local(plan, device, cut) is not None:
                continue
            alike.setdefault((cut, tuple(sorted(plan.encodings(msg.encodings.get(device)).items()))), []).append(device)
        out: dict[str, tuple[str, ...]] = {}
        for named in alike.values():
            for i in range(0, len(named), MAX_GROUP):
                part = tuple(sorted(named[i:i + MAX_GROUP]))
                if len(part) > 1:
                    out.update(dict.fromkeys(part, part))
        return out

    def _lama_global(self, plan: Plan, given: State, partial: bool) -> State | None:
        """FedLAMA: the global model after this announcement, or None if a partial one cannot be completed."""
        c = self.lama
        if not partial:
            local = c.local if c is not None and c.run == plan.run else {}
            self.lama = LamaCopy(plan.run, plan.round, dict(given), local)
            return dict(given)
        if c is None or c.run != plan.run or c.round not in (plan.round - 1, plan.round):
            return None
        c.state.update(given)
        c.round = plan.round
        return dict(c.state)

    def _lama_local(self, plan: Plan, device: str, cut: int) -> State | None:
        """FedLAMA: the device's edge-side layers at the end of the previous round here (empty for a local
        device), or None when it did not train that round here with this cut: then it gets everything."""
        if not plan.fedlama or self.lama is None or self.lama.run != plan.run:
            return None
        prev = self.lama.local.get(device, {}).get(plan.round - 1)
        return prev[1] if prev is not None and prev[0] == cut else None

    def _new_sid(self, device: str) -> str:
        self._ids += 1
        return f"{device}/{self._id_prefix}.{self._ids}"

    def _open_session(self, plan: Plan, device: str, cut: int, global_state: dict[str, np.ndarray],
                      schema: ModelSchema, local: State | None = None) -> Session:
        if cut == schema.n_blocks:
            return Session(device, plan, cut, None, base={})
        sid = self._new_sid(device)
        base = {k: global_state[k] for k in schema.keys(cut)}
        start = base if local is None else {k: local[k] for k in base}
        self._run(stage.Open(sid, plan, cut, schema.n_blocks, start))
        return Session(device, plan, cut, sid, base=base, activation=schema.activation(cut))

    def _leave(self, device: str, now: float) -> None:
        old_r, old_s = self.session_of(device)
        self.device_round.pop(device, None)
        if old_r is not None and not old_r.sent:
            if old_s is not None and old_s.folded:
                return  # done, and in the round's mean: it is reported with the round it finished
            old_r.sessions.pop(device, None)
            self._close(old_s)
            self._unsave(device)
            if not old_r.sessions or all(x.over for x in old_r.sessions.values()):
                self._finish_round(old_r, now)

    def _close(self, s: Session | None) -> None:
        if s is not None and s.sid is not None:
            self._do(Run(stage.Close(s.sid)))
            s.sid = None

    # ------------------------------------------------------------------ split training
    def _on_act(self, ev: Received, msg: Activations, now: float) -> None:
        client = msg.client or ev.src
        r, s = self.session_of(client)
        if r is None or s is None:
            self._no_session(client, (msg.run, msg.round, msg.attempt))
            self._drop("unknown_sender", f"act from {ev.src}, not in a round here", ev.src)
            return
        if ev.src != (s.upstream or client):
            self._drop("unknown_sender", f"act for {client} from {ev.src}; its activations come from "
                                         f"{s.upstream or client}", ev.src)
            return
        if s.pipelined and msg.epoch != s.epoch:
            self._do(Count("stage_stale_epoch"))  # sent under a pipeline layout that is gone
            return
        if msg.run != r.plan.run or msg.round != r.plan.round or msg.attempt != r.plan.attempt:
            self._drop("wrong_round", f"act for {msg.run}/{msg.round}, round is {r.plan.round}", ev.src)
            return
        if s.sid is None or s.delta is not None:
            self._drop("unexpected", f"{ev.src} trains locally or has finished", ev.src)
            return
        if s.frozen is not None:
            self._drop("frozen", f"{ev.src} is migrating ({s.frozen})", ev.src)
            return
        cached = s.up.answered(msg)
        if cached is not None:
            # Exactly-once: the device re-sent an act we processed (its link dropped, or it redoes the mini-batch
            # on a new pipeline layout); answer from cache.
            if s.pipelined:
                cached = replace(cached, epoch=s.epoch)
            self._do(Send(ev.src, cached, encoding=msg.grad_encoding), Count("grad_resent"))
            return
        if s.restored:
            if msg.key != s.up.expected:
                # Sent before the device heard that we restarted: tell it again where we stand.
                self._do(Send(ev.src, self._resume(s, EdgeSession.RESTORED)), Count("resume_sent"))
                return
            s.restored = False
        try:
            if msg.key == s.up.expected:
                check_activation(msg, s.activation, r.plan)
            flush = s.up.take(msg)
        except ProtocolError as e:
            self._drop(e.code, f"{e} (from {ev.src})", ev.src)
            return
        if s.pipelined and ev.transit_s > 0:
            s.link_bps = max(s.link_bps * 0.95, msg.x.nbytes / ev.transit_s)  # the fastest lately (helper.link_speed)
        job = stage.Loss(s.sid, msg.step, msg.micro, msg.x, msg.y, msg.batch_size)
        self._run(job, "grad", (s, ev.src, msg.grad_encoding, now))
        if flush:
            # One optimizer step per device mini-batch, like the device; then, every resume_every, save it.
            self._run(stage.Step(s.sid), "step", s)
            s.steps += 1

    def _grad_ready(self, s: Session, device: str, job: stage.Loss, res: stage.LossResult, encoding: str,
                    took: float) -> None:
        g = Gradients(run=s.plan.run, round=s.plan.round, step=job.step, micro=job.micro, loss_sum=res.loss_sum,
                      correct=res.correct, g=res.grad, saved=s.saved)
        if s.pipelined:
            s.ema_s = took if not s.ema_s else (s.ema_s + took) / 2
            g = replace(g, client=s.device, epoch=s.epoch, stage_s=(s.ema_s,), stash=(1,), link_bps=(s.link_bps,))
        self._do(Send(device, g, encoding=encoding))
        s.up.remember(g)
        s.loss_sum += res.loss_sum
        s.seen += res.n

    # ------------------------------------------------------------------ pipelines (docs/design.md, "Pipeline")
    def _on_chain(self, ev: Received, msg: ChainSet, now: float) -> None:
        """The device says who sends its activations from now on (layout ``epoch``); at boundary 0 the edge's
        blocks may start at another cut (re-opened from the round's global model: nothing trained yet)."""
        r, s = self.session_of(ev.src)
        if r is None or s is None or s.sid is None or msg.run != r.plan.run or msg.round != r.plan.round \
                or msg.attempt != r.plan.attempt:
            self._drop("wrong_round", f"chain from {ev.src} for round {msg.round}", ev.src)
            return
        if msg.epoch <= s.epoch:
            if msg.epoch == s.epoch:
                self._reply(ev.src, StageReady(run=msg.run, round=msg.round, epoch=msg.epoch))  # a repeat
            return
        if msg.cut != s.cut:
            schema = self.schemas(r.plan.model_ref)
            if s.steps or s.up.expected != (0, 0) or msg.step != 0 or not 1 <= msg.cut < schema.n_blocks:
                self._reply(ev.src, StageReady(run=msg.run, round=msg.round, epoch=msg.epoch, ok=False,
                                               reason=f"the edge's blocks start at {s.cut} once training began"))
                return
            self._close(s)
            s.sid, s.cut = self._new_sid(ev.src), msg.cut
            s.base = {k: r.global_state[k] for k in schema.keys(msg.cut)}
            s.activation = schema.activation(msg.cut)
            r.devices[ev.src] = msg.cut
            self._run(stage.Open(s.sid, r.plan, msg.cut, schema.n_blocks, s.base))
        s.upstream, s.epoch = msg.upstream, msg.epoch
        self._reply(ev.src, StageReady(run=msg.run, round=msg.round, epoch=msg.epoch))
        self._do(Log("info", "pipeline layout", {"device": ev.src, "epoch": msg.epoch, "upstream": msg.upstream,
                                                 "cut": s.cut, "step": msg.step}))

    def _on_profile_ask(self, ev: Received, msg: ProfileAsk, now: float) -> None:
        r, s = self.session_of(ev.src)
        if r is None or s is None or msg.plan.model_ref != r.plan.model_ref or msg.rows > r.plan.batch_size:
            self._drop("unexpected", f"profile asked by {ev.src}, not in a round here", ev.src)
            return
        self._ids += 1
        self._run(stage.Profile(f"profile/{self._id_prefix}.{self._ids}", msg.plan, msg.rows), "stage_profile",
                  (ev.src, msg))

    # ------------------------------------------------------------------ round end
    def _on_device_update(self, ev: Received, msg: DeviceUpdate, now: float) -> None:
        r, s = self.session_of(ev.src)
        attempt = msg.report.attempt
        if r is None or s is None or msg.run != r.plan.run or msg.round != r.plan.round or attempt != r.plan.attempt:
            if r is None or msg.round < r.plan.round or msg.run != r.plan.run or attempt != r.plan.attempt:
                self._do(Ack(ev))  # a late re-send of a finished round: stop the device re-sending
            self._drop("wrong_round", f"delta from {ev.src} for round {msg.round}", ev.src)
            return
        if s.over:
            self._do(Ack(ev))
            return
        if s.closing is not None:
            return  # the same delta again while we fetch the stage's weights; the first one is acked
        if msg.report.samples == 0 and not msg.delta:
            # The device declined the round (it refused the plan): it is missing, and nobody waits for it.
            self._close(s)
            self._device_done(r, s, ev, msg, {}, now)
            return
        try:
            schema = self.schemas(r.plan.model_ref)
            local = r.locals.get(ev.src)
            # A partial model sends only its trained blocks; a pruned or width model its kept entries.
            frozen = local.frozen(schema.n_blocks) if local is not None else 0
            specs = schema.specs(min(frozen, s.cut), s.cut)
            due = set(r.plan.due(specs))  # FedLAMA: only the layers due this round; else every one
            dense, masks = expand(msg.delta, msg.masks, specs, f"delta of {ev.src}")
            if masks and (local is None or local.train not in ("pruned", "width")):
                raise ProtocolError("bad_field", f"{ev.src} sent masks, but its model masks nothing")
            dense = check_state(dense, {k: v for k, v in specs.items() if k in due}, f"delta of {ev.src}")
            declared = r.samples.get(ev.src)
            if declared is not None and msg.report.samples > declared:
                raise ProtocolError("implausible_samples", f"{ev.src} reports {msg.report.samples} samples, "
                                                           f"declared {declared} when it joined")
            if s.sid is not None and msg.report.samples * r.plan.epochs > s.seen:
                # A split device's samples all passed through here: no more can have been trained on.
                raise ProtocolError("implausible_samples", f"{ev.src} reports {msg.report.samples} samples; "
                                                           f"{s.seen} rows in {r.plan.epochs} epoch(s) came here")
        except (ProtocolError, ValueError) as e:
            self._drop(getattr(e, "code", "bad_field"), str(e), ev.src)
            if getattr(e, "code", "") == "implausible_samples":
                self._refuse(r, s, ev, "implausible_samples", now)
            return
        if s.sid is None:
            self._device_done(r, s, ev, msg, {}, now, dense, masks)
        else:
            s.closing = (ev, msg)
            self._run(stage.Weights(s.sid), "weights", s)

    def _device_done(self, r: EdgeRound, s: Session, ev: Received, msg: DeviceUpdate,
                     edge_weights: dict[str, np.ndarray], now: float, dense: State | None = None,
                     masks: State | None = None) -> None:
        full = {k: np.array(v, dtype=np.float32) for k, v in (msg.delta if dense is None else dense).items()}
        if edge_weights:
            due = r.plan.due(s.base)
            full.update(delta({k: edge_weights[k] for k in due}, {k: s.base[k] for k in due}))
        s.closing = None
        bound = r.plan.max_update_norm
        if bound > 0 and set(full) <= set(r.global_state):
            norm, ref = state_norm(full), state_norm({k: r.global_state[k] for k in full})
            if not norm <= bound * max(ref, 1e-12):
                # Implausible: refused, not clipped; robust aggregation rules would weigh such an update instead.
                self._drop("implausible_update", f"delta of {ev.src} has norm {norm:.4g}, more than {bound:g} x "
                                                 f"the global model's {ref:.4g}", ev.src)
                self._refuse(r, s, ev, "implausible_update", now)
                return
        s.delta = full
        s.mask = dict(masks or {})
        if r.plan.fedlama and self.lama is not None and self.lama.run == r.plan.run:
            rounds = self.lama.local.setdefault(s.device, {})
            rounds[r.plan.round] = (s.cut, {k: np.array(edge_weights[k]) for k in s.base})
            for old in sorted(rounds)[:-2]:
                del rounds[old]
        s.report = replace(msg.report, t_upload=ev.transit_s, edge_steps=s.steps)
        self._save(r, s)  # acknowledged below: a restarted edge must still have it
        if r.plan.preaggregate:
            r.fold(s)  # saved above with its delta; here only the running mean keeps it
        self._do(Ack(ev), Log("info", "device done", {"device": ev.src, "round": r.plan.round,
                                                       "samples": msg.report.samples}))
        if all(x.over for x in r.sessions.values()):
            self._finish_round(r, now)

    def _refuse(self, r: EdgeRound, s: Session, ev: Received, reason: str, now: float) -> None:
        """The device's update is refused for good: acknowledged (re-sending changes nothing), and the device
        counts as missing from this round."""
        s.refused = reason
        s.closing = None
        self._do(Ack(ev), Emit("update_refused", "warning", {"device": ev.src, "round": r.plan.round,
                                                             "reason": reason}))
        if all(x.over for x in r.sessions.values()):
            self._finish_round(r, now)

    def _finish_round(self, r: EdgeRound, now: float, timed_out: bool = False) -> None:
        if r.sent:
            return
        r.sent = True
        self.rounds.pop(r.plan.key, None)
        self.closed[r.plan.key] = None
        while len(self.closed) > CLOSED:
            self.closed.popitem(last=False)
        for d in r.sessions:
            if self.device_round.get(d) == r.plan.key:
                self.device_round.pop(d)
        done = {d: s for d, s in r.sessions.items() if s.delta is not None and s.report is not None
                and s.report.samples > 0}
        missing = tuple(sorted(set(r.sessions) - set(done)))
        delta: dict[str, np.ndarray] = {}
        deltas = {d: s.delta for d, s in done.items() if s.delta is not None and not s.folded}
        weights = {d: float(s.report.samples) for d, s in done.items() if s.report is not None}
        masks = {d: s.mask for d, s in done.items() if s.mask}
        coverage: State = {}
        sqnorms: dict[str, float] = {}
        if done and r.plan.preaggregate:
            for d in sorted(deltas):  # restored from disk after a restart, or a class model's: not folded yet
                r.fold(done[d])
            left = {d: dd for d, dd in deltas.items() if not done[d].folded}
            if r.mean is not None and r.mean.weight > 0:
                # The plain devices' running mean stands for them all, with their samples' weight and full
                # coverage: the masked mean over it and the class models' deltas is the masked mean over all.
                left[FOLDED] = r.mean.mean()
                weights[FOLDED] = r.mean.weight
                # FedLAMA's discrepancy needs sum_i n_i |x_i - u|^2 per layer; with these sums the cloud gets it
                # from the global mean u without the devices' own deltas (docs/algorithms.md, "FedLAMA").
                sqnorms = r.mean.sqnorms()
            if set(left) == {FOLDED}:
                delta = left[FOLDED]  # every device folded in: FedAvg's mean
            elif left:
                delta, coverage = _edge_mean(left, weights, masks)
            for d, dd in left.items():
                if r.plan.fedlama and d != FOLDED:
                    for k, v in dd.items():
                        sq = weights[d] * float(np.sum(np.square(v, dtype=np.float64)))
                        sqnorms[k] = sqnorms.get(k, 0.0) + sq
            deltas = {}
        elif done and r.plan.fedlama:
            keys = next(iter(deltas.values())).keys()
            sqnorms = {k: sum(weights[d] * float(np.sum(np.square(deltas[d][k], dtype=np.float64))) for d in deltas)
                       for k in keys}
        if missing:
            self._do(Emit("devices_missing", "warning", {"round": r.plan.round, "devices": list(missing),
                                                         "timed_out": timed_out}))
        forwarded: dict[str, State] = {}
        packed: dict[str, State] = {}
        if not r.plan.preaggregate:
            for d, dd in deltas.items():
                forwarded[d], p = compact(dd, {k: m > 0 for k, m in masks.get(d, {}).items()})
                if p:
                    packed[d] = p
        update = EdgeUpdate(run=r.plan.run, round=r.plan.round, attempt=r.plan.attempt,
                            reports={d: s.report for d, s in done.items() if s.report is not None},
                            missing=missing, delta=delta, edge_time_s=now - r.started, tag=r.tag,
                            deltas=forwarded, sqnorms=sqnorms, masks=packed, coverage=coverage)
        self._do(Send(self.cloud, update, reliable=True,  # in the outbox on disk before the sessions go
                      encoding=self.delta_encoding or r.plan.delta_encoding))
        for d in r.sessions:
            self._unsave(d)
        self.rounds_done += 1
        self._do(Log("info", "round sent", {"round": r.plan.round, "devices": sorted(done), "missing": list(missing)}))
        for s in r.sessions.values():
            self._close(s)  # free the per-device replicas; the delta is sent
        self._set_status()

    # ------------------------------------------------------------------ jobs
    def _on_job(self, ev: JobDone, now: float) -> None:
        what, ctx = self._jobs.pop(ev.job, ("", None))
        if not what:
            return
        if ev.error is not None:
            self._do(Emit("stage_failed", "error", {"job": type(ev.job).__name__, "error": ev.error[:300]}))
            return
        if what == "grad":
            s, device, encoding, asked = ctx
            if s.sid is not None and s.frozen is None and isinstance(ev.job, stage.Loss):
                self._grad_ready(s, device, ev.job, ev.result, encoding, max(0.0, now - asked))
        elif what == "stage_profile":
            device, ask = ctx
            self._do(Send(device, StageProfile(run=ask.run, round=ask.round, rows=ask.rows,
                                               block_s=tuple(ev.result.block_s))))
        elif what == "weights":
            session: Session = ctx
            r, current = self.session_of(session.device)
            if r is not None and current is session and session.closing is not None:
                self._device_done(r, session, session.closing[0], session.closing[1], ev.result, now)
        elif what == "snapshot":
            s, msg, device = ctx
            self._send_checkpoint(s, msg, device, ev.result)
        elif what == "step":
            stepped: Session = ctx
            every = stepped.plan.resume_every
            if every > 0 and stepped.up.expected[0] % every == 0 and stepped.sid is not None \
                    and self._current(stepped):
                self._run(stage.Snapshot(stepped.sid), "save", stepped)
        elif what == "profile":
            fingerprint, batch = ctx
            res: stage.BlockProfile = ev.result
            if self.profiled != (fingerprint, batch):
                return  # measured for a model or batch size this edge has since left
            if self.fastest is not None and len(self.fastest.block_s) == len(res.block_s):
                res = stage.BlockProfile(tuple(min(a, b) for a, b in zip(self.fastest.block_s, res.block_s,
                                                                         strict=True)), res.block_bytes)
            self.fastest = res
            self._do(Send(self.cloud, EdgeProfile(fingerprint=fingerprint, batch_size=batch, block_s=res.block_s,
                                                  block_bytes=res.block_bytes)))
        elif what == "save":
            saving: Session = ctx
            r, current = self.session_of(saving.device)
            if r is not None and current is saving and saving.up.at_boundary:
                self._save(r, saving, ev.result)

    # ------------------------------------------------------------------ migration (FedFly)
    def _reply(self, device: str, msg: Any) -> None:
        self._do(Send(device, msg))

    def _on_freeze(self, ev: Received, msg: Freeze, now: float) -> None:
        """Source edge: the device asks to move. Checkpoint its session and send it on."""
        device = ev.src
        r, s = self.session_of(device)
        if r is None or s is None or s.sid is None or s.delta is not None:
            self._reply(device, Nothing(migration=msg.migration))  # no edge-side state here: it just switches
            return
        if not s.up.at_boundary:
            self._reply(device, Refused(migration=msg.migration,
                                        reason=f"not at a mini-batch boundary (next {s.up.expected})"))
            return
        s.frozen = msg.migration
        self._run(stage.Snapshot(s.sid), "snapshot", (s, msg, device))

    def _send_checkpoint(self, s: Session, msg: Freeze, device: str, snap: stage.StageSnapshot) -> None:
        if s.frozen != msg.migration:
            return  # aborted while the snapshot was taken
        ck = EdgeCheckpoint(
            device=device, migration=msg.migration, plan=s.plan, cut=s.cut, weights=snap.weights,
            optimizer=snap.optimizer, base=dict(s.base), expected=s.up.expected, steps=s.steps,
            loss_sum=s.loss_sum, seen=s.seen, n_micro=s.up.n_micro, rng=snap.rng)
        body, tensors = ck.to_message()
        nbytes = ck.nbytes()
        if msg.path == MovePath.DIRECT:
            # Before the multi-MB transfer, so the device learns at once that the source is alive.
            self._reply(device, Frozen(migration=msg.migration, checkpoint_bytes=nbytes))
        transfer = Transfer(run=s.plan.run, round=s.plan.round, migration=msg.migration, device=device,
                            path=msg.path, source=self.node, checkpoint_bytes=nbytes, checkpoint=body,
                            checkpoint_tensors=tensors)
        # direct: edge to edge through the broker; relay: through the device (edges that may not talk).
        self._do(Send(msg.to if msg.path == MovePath.DIRECT else device, transfer),
                 Emit("migration_started", fields={"device": device, "source": self.node, "destination": msg.to,
                                                   "path": str(msg.path), "migration": msg.migration,
                                                   "step": s.up.expected[0], "checkpoint_bytes": nbytes}))

    def _on_transfer(self, ev: Received, msg: Transfer, now: float) -> None:
        """Destination edge: install a checkpoint, then tell the device it may resume here."""
        device, mid = msg.device, msg.migration
        if ev.src != device and self.expected_transfers.get((device, mid)) != ev.src:
            # Only the device itself (relay) or the source it named (direct) may hand us its state.
            self._drop("unauthorised", f"checkpoint for {device} from {ev.src}", ev.src)
            return
        try:
            plan = Plan.from_body(msg.checkpoint.get("plan"))
            schema = self.schemas(plan.model_ref)
            if plan.fingerprint and schema.fingerprint != plan.fingerprint:
                raise CheckpointError("model_mismatch", f"model {plan.model!r} differs here (fingerprint "
                                                        f"{schema.fingerprint}, checkpoint's {plan.fingerprint})")
            cut = msg.checkpoint.get("cut")
            if not isinstance(cut, int) or not 0 < cut < schema.n_blocks:
                raise CheckpointError("bad_field", f"cut {cut!r} has no edge-side state")
            ck = from_message(msg.checkpoint, msg.checkpoint_tensors, mid, schema.specs(cut))
            if ck.device != device:
                raise CheckpointError("bad_field", "checkpoint names another device")
        except (ProtocolError, ValueError) as e:
            code = getattr(e, "code", "bad_field")
            self._drop(code, f"checkpoint refused: {e}", ev.src)
            self._do(Emit("checkpoint_refused", "warning", {"device": device, "migration": mid, "reason": code,
                                                            "detail": str(e)[:300]}))
            self._reply(device, Refused(migration=mid, reason=str(e)[:300]))
            return
        _, current = self.session_of(device)
        if current is not None and current.plan.key == plan.key and current.installed_by != mid:
            # The device already restarted its round here (a late checkpoint of a move it gave up on).
            self._reply(device, Refused(migration=mid, reason="the device already has a session for this round here"))
            return
        self._leave(device, now)
        sid = self._new_sid(device)
        self._run(stage.Open(sid, plan, cut, schema.n_blocks, ck.weights, optimizer=ck.optimizer, rng=ck.rng,
                             anchor=ck.base))
        session = Session(device, plan, cut, sid, base=dict(ck.base), activation=schema.activation(cut),
                          up=Upstream(expected=ck.expected, n_micro=ck.n_micro), steps=ck.steps,
                          loss_sum=ck.loss_sum, seen=ck.seen, installed_by=mid)
        r = self.rounds.get(plan.key)
        if r is None:
            # This edge was not in the round: the checkpoint carries all it needs (plan and base).
            r = EdgeRound(plan, {}, dict(ck.base), deadline=now + plan.deadline_s * self.deadline_fraction,
                          started=now)
            self.rounds[plan.key] = r
            self._do(SetTimer(("round", plan.key), r.deadline))
        r.sessions[device] = session
        r.devices[device] = cut
        self.device_round[device] = plan.key
        self._save(r, session, stage.StageSnapshot(ck.weights, ck.optimizer, ck.rng))
        self._reply(device, Ready(migration=mid, checkpoint_bytes=msg.checkpoint_bytes, step=ck.expected[0]))
        self._set_status()
        self._do(Log("info", "migration installed", {"device": device, "migration": mid, "step": ck.expected[0]}))

    def _on_expect(self, ev: Received, msg: Expect, now: float) -> None:
        """Destination edge: the device announces its move and the source that will send its state."""
        self.expected_transfers[(ev.src, msg.migration)] = msg.source
        while len(self.expected_transfers) > EXPECTED_TRANSFERS:
            self.expected_transfers.popitem(last=False)

    def _on_release(self, ev: Received, msg: Release, now: float) -> None:
        """Source edge: the destination has the device; forget the frozen session."""
        r, s = self.session_of(ev.src)
        if r is not None and s is not None and s.frozen == msg.migration:
            self._drop_session(r, ev.src, msg.migration, now)

    def _on_leave(self, ev: Received, msg: Leave, now: float) -> None:
        """The device restarts its round elsewhere without its state (FedFly's restart baseline)."""
        r, s = self.session_of(ev.src)
        if r is not None and s is not None:
            self._drop_session(r, ev.src, msg.migration, now)

    def _on_abort(self, ev: Received, msg: Abort, now: float) -> None:
        """The device gave up on a move. Source: resume the frozen session. Destination: forget a session
        installed for that move, so it neither blocks the round nor clashes with a restart."""
        r, s = self.session_of(ev.src)
        if s is not None and s.frozen == msg.migration:
            s.frozen = None
            self._do(Log("info", "migration aborted, device resumes here", {"device": ev.src,
                                                                            "migration": msg.migration}))
        elif r is not None and s is not None and s.installed_by == msg.migration:
            self._drop_session(r, ev.src, msg.migration, now)

    def _drop_session(self, r: EdgeRound, device: str, mid: str, now: float) -> None:
        if (s := r.sessions.get(device)) is not None and s.folded:
            return  # finished here, and in the round's mean
        self._close(r.sessions.pop(device, None))
        r.devices.pop(device, None)
        self.device_round.pop(device, None)
        self._unsave(device)
        self._do(Log("info", "device left", {"device": device, "migration": mid}))
        if not r.sessions:
            self.rounds.pop(r.plan.key, None)  # nothing left to report for this round here
            self._set_status()
        elif all(x.over for x in r.sessions.values()):
            self._finish_round(r, now)

    # ------------------------------------------------------------------ edge resume (protocol/resume.py)
    def _current(self, s: Session) -> bool:
        return self.session_of(s.device)[1] is s

    def _save(self, r: EdgeRound, s: Session, snap: stage.StageSnapshot | None = None) -> None:
        """Write the session at its current boundary (``snap``: the stage's state there; None: the session has
        not stepped since it opened, or holds no stage)."""
        if r.plan.resume_every <= 0 or r.sent or s.pipelined or s.folded:
            return  # a folded session was saved, delta and all, when it finished
        if snap is None and s.sid is not None and s.steps > 0 and s.delta is None:
            return  # its weights moved on since the last save; the next boundary saves them
        saved = SavedSession(
            device=s.device, plan=s.plan, cut=s.cut, base=s.base, weights=snap.weights if snap else None,
            optimizer=snap.optimizer if snap else {}, rng=snap.rng if snap else None, expected=s.up.expected,
            steps=s.steps, loss_sum=s.loss_sum, seen=s.seen, n_micro=s.up.n_micro, tag=r.tag,
            deadline_wall=None if r.wall is None else r.deadline + r.wall, declared=r.samples.get(s.device),
            report=s.report, delta=s.delta, mask=s.mask,
            grads=[g for k, g in s.up.cache.items() if k[0] == s.up.expected[0] - 1] if snap else [])
        self._do(Persist(saved.to_state(), key=record_key(s.device)))
        s.saved = s.up.expected[0]

    def _unsave(self, device: str) -> None:
        self._do(Persist(None, key=record_key(device)))

    def _resume(self, s: Session, session: EdgeSession) -> Resume:
        return Resume(run=s.plan.run, round=s.plan.round, attempt=s.plan.attempt, step=s.up.expected[0],
                      session=session, token=self._id_prefix)

    def _no_session(self, device: str, key: RoundKey) -> None:
        """A device trains a round this edge holds nothing of: it closed here (the device comes back too late),
        or this edge lost it in a restart. Say so once, so the device stops waiting."""
        if (device, key) in self.told or not key[0]:
            return
        self.told[(device, key)] = None
        while len(self.told) > TOLD:
            self.told.popitem(last=False)
        session = EdgeSession.CLOSED if key in self.closed else EdgeSession.LOST
        self._do(Send(device, Resume(run=key[0], round=key[1], attempt=key[2], step=0, session=session,
                                     token=self._id_prefix)), Count(f"resume_{session}"))

    def _restore(self, ev: Started, now: float) -> None:
        """After a restart: take up the sessions saved before, and tell each device where its session stands."""
        records, self.restored = self.restored, {}
        resumed: dict[str, int] = {}
        for key, record in sorted(records.items()):
            try:
                saved, schema = SavedSession.from_state(record, self.schemas)
            except ProtocolError as e:
                self._do(Drop(e.code, f"saved session {key} not restored: {e}", self.node),
                         Persist(None, key=key))
                continue
            deadline = now + saved.plan.deadline_s * self.deadline_fraction
            if saved.deadline_wall is not None and ev.wall:
                deadline = now + (saved.deadline_wall - ev.wall)
            if deadline <= now or saved.device in self.device_round:
                self._do(Persist(None, key=key))  # its round is over by now
                continue
            r = self.rounds.get(saved.plan.key)
            if r is None:
                r = self.rounds[saved.plan.key] = EdgeRound(
                    saved.plan, {}, {}, deadline=deadline, started=now, tag=saved.tag,
                    wall=None if not ev.wall else ev.wall - now)
                self._do(SetTimer(("round", saved.plan.key), r.deadline))
            s = self._restore_session(saved, schema)
            r.sessions[saved.device] = s
            r.devices[saved.device] = saved.cut
            r.global_state.update(saved.base)
            if saved.declared is not None:
                r.samples[saved.device] = saved.declared
            self.device_round[saved.device] = saved.plan.key
            resumed[saved.device] = saved.expected[0]
            if not s.over and s.sid is not None:
                self._do(Send(saved.device, self._resume(s, EdgeSession.RESTORED)))
        if resumed:
            self._do(Emit("edge_resumed", fields={"devices": resumed}),
                     Log("info", "sessions restored", {"devices": resumed}))
            self._set_status()
        for r in list(self.rounds.values()):
            if r.sessions and all(x.over for x in r.sessions.values()):
                self._finish_round(r, now)

    def _restore_session(self, saved: SavedSession, schema: ModelSchema) -> Session:
        sid = None
        if saved.cut < schema.n_blocks and saved.delta is None:
            sid = self._new_sid(saved.device)
            self._run(stage.Open(sid, saved.plan, saved.cut, schema.n_blocks, saved.weights or saved.base,
                                 optimizer=saved.optimizer or None, rng=saved.rng))
        return Session(saved.device, saved.plan, saved.cut, sid, base=saved.base,
                       activation=schema.activation(saved.cut) if sid else (),
                       up=Upstream(expected=saved.expected, n_micro=saved.n_micro,
                                   cache=OrderedDict((g.key, g) for g in saved.grads)), steps=saved.steps,
                       loss_sum=saved.loss_sum, seen=saved.seen, delta=saved.delta, report=saved.report,
                       saved=saved.expected[0], restored=sid is not None, mask=saved.mask)



FOLDED = "|folded"  # not a node id: the running mean of the devices folded in, among the class models' deltas


def _edge_mean(deltas: dict[str, State], weights: dict[str, float], masks: dict[str, State]) -> tuple[State, State]:
    """The edge's mean of its devices' deltas, and the coverage of keys not every sample trained.

    When every device trained every entry of the same keys this is FedAvg's sample-weighted mean, with no
    coverage. Otherwise each entry is averaged over the devices that trained it (``masked_average``) and the
    coverage says how many samples stand behind it, so the cloud's mean over edges equals the masked mean over
    all devices: a scalar for a key some devices left out, one number per entry for a masked key."""
    order = sorted(deltas)
    keys = list(dict.fromkeys(k for d in order for k in deltas[d]))
    if not masks and all(set(deltas[d]) == set(keys) for d in order):
        return weighted_average([(deltas[d], weights[d]) for d in order]), {}
    shapes = {k: next(deltas[d][k] for d in order if k in deltas[d]).shape for k in keys}
    zeros = {k: np.zeros(shape, np.float32) for k, shape in shapes.items()}
    mean = masked_average([(deltas[d], masks.get(d), weights[d]) for d in order], zeros)
    coverage: State = {}
    for k in keys:
        have = [d for d in order if k in deltas[d]]
        if len(have) == len(order) and not any(k in masks.get(d, {}) for d in have):
            continue
        if not any(k in masks.get(d, {}) for d in have):
            coverage[k] = np.asarray(sum(weights[d] for d in have), np.float32)
            continue
        cov = np.zeros(shapes[k], np.float64)
        for d in have:
            cov += weights[d] * np.broadcast_to(masks.get(d, {}).get(k, np.float32(1.0)), shapes[k])
        coverage[k] = cov.astype(np.float32)
    return mean, coverage


def check_activation(msg: Activations, shape: tuple[int, ...], plan: Plan) -> None:
    """Smashed activations and labels fit the plan: classes in 0..num_classes-1 (cross_entropy), or num_classes
    finite targets per sample (mse; in [0, 1] for bce_with_logits)."""
    x, y = msg.x, msg.y
    if x.dtype != np.float32:
        raise ProtocolError("bad_dtype", f"activations must be float32, got {x.dtype}")
    if tuple(x.shape[1:]) != tuple(shape):
        raise ProtocolError("bad_shape", f"activations {tuple(x.shape)}, expected (n, *{shape})")
    if not np.isfinite(x).all():
        raise ProtocolError("non_finite", "activations have NaN/Inf")
    if not 0 < x.shape[0] <= msg.batch_size <= plan.batch_size:
        raise ProtocolError("bad_shape", f"{x.shape[0]} rows outside 1..{msg.batch_size} (plan {plan.batch_size})")
    if plan.task == "classification":
        if y.dtype != np.int64 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ProtocolError("bad_shape", f"labels {y.dtype}{y.shape} do not match {x.shape[0]} rows")
        if y.size and (y.min() < 0 or y.max() >= plan.num_classes):
            raise ProtocolError("bad_labels", f"labels outside 0..{plan.num_classes - 1}")
        return
    if y.dtype != np.float32 or tuple(y.shape) != (x.shape[0], plan.num_classes):
        raise ProtocolError("bad_shape", f"targets {y.dtype}{y.shape}, expected float32({x.shape[0]}, "
                                         f"{plan.num_classes})")
    if not np.isfinite(y).all() or (plan.task == "multilabel" and y.size and (y.min() < 0 or y.max() > 1)):
        raise ProtocolError("bad_labels", "targets must be finite (and in [0, 1] for bce_with_logits)")
