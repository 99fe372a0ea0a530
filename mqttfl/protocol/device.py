"""The device's protocol machine: one round at a time, the first stage of a split, the mover in a migration.

Theory of operation (docs/design.md, "Round" and "Migration"). Idle, the device waits for its edge's
``TrainRound``. A round opens the device's stage (blocks ``[0, cut)``, or the whole model when the cut is
the end: classic FL), then walks its mini-batches. Within a mini-batch the device follows the 2-stage 1F1B
schedule (``mqttfl.protocol.schedule``): up to min(M, 3) micro-batches are in flight, so the next forward
runs while the edge and the network handle the previous one. Each forward's activations stay in
``outstanding`` until their gradient arrives; when a gradient is overdue, or the link comes back, the
device re-sends them, and the edge answers a re-sent micro-batch from its cache (exactly-once effect). The
optimizer steps once per mini-batch. At the end the device sends its part's delta (reliable) and is idle.

Joining a run: every round's plan names the cloud's model fingerprint. The device builds the plan's model itself
and refuses a round whose model differs from the cloud's (naming the first differing tensor) or that its labels
cannot train (integer classes beyond ``num_classes``, targets of another width); the refusal goes on ``event``
and into the device's status, where the cloud reads it and leaves the device out of the run.

Federated evaluation: an ``EvaluateModel`` from the edge is evaluated on the device's held-out split (an
``Evaluate`` job, run between training jobs if a round is under way) and reported to the cloud (reliable).

Tensors travel in the encodings the round names for this device (``TrainRound.encodings``: the plan's, with
the device's own choices on top): activations in ``act``, the gradient the edge returns in ``grad`` (asked for
in every act), the delta in ``delta``. ``topk`` deltas keep the ``topk_ratio`` largest entries of
``delta + residual`` and carry the rest to later rounds (error feedback); the residual is persisted, so it
survives a restart, and it stays with the device when it moves. Under FedLAMA (``plan.fedlama``) the device
keeps its layers between rounds: a round opens from its own weights with the layers the edge sent on top, and
the delta holds only the layers due (``plan.due``) against their value at their last aggregation.

A move (FedFly) happens at a mini-batch boundary, when no gradient is in flight:

    MIGRATING: expect -> dest, freeze -> source
      source: nothing ............ restart the round at dest from the global model (via the cloud)
      source: refused ............ abort, continue at the source
      source: frozen / transfer .. (relay: carry the transfer to dest) wait for dest
      dest:   ready .............. release -> source, continue at dest
      dest:   refused ............ abort, continue at the source
      timer:  heard the source ... abort, continue at the source; else restart at dest

A round whose ``TrainRound`` names helpers is pipelined (Eco-FL): the device plans its stages, lays them out
on its helpers and its edge, and steers them (``mqttfl.protocol.chain``; docs/design.md, "Pipeline").

Every effect is returned, never performed: the runtime sends, times and trains (``mqttfl.runtime.node``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mqttfl.fl.aggregate import delta
from mqttfl.protocol import stage
from mqttfl.protocol.chain import PIPE_TIMER, Pipeline, PipelineCoordinator
from mqttfl.protocol.control import arg, check_id
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import (
    CancelTimer,
    Command,
    CommandError,
    Count,
    Drop,
    Effect,
    Emit,
    Event,
    Follow,
    JobDone,
    LinkChanged,
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
from mqttfl.protocol.hetero import DEFAULT_CLASS, LocalModel, compact
from mqttfl.protocol.links import Downstream
from mqttfl.protocol.messages import (
    Abort,
    Activations,
    Ckpt,
    DeviceProfile,
    DeviceUpdate,
    Echo,
    EdgeSession,
    EvalReport,
    EvaluateModel,
    Expect,
    Freeze,
    Frozen,
    Gradients,
    Leave,
    MovePath,
    Nothing,
    Ready,
    Refused,
    Release,
    Report,
    Restart,
    Resume,
    StageProfile,
    StageReady,
    StageState,
    TrainRound,
    Transfer,
)
from mqttfl.protocol.plan import LabelFormat, Plan, batches_per_epoch, check_encodings, reconnect_within, round_steps
from mqttfl.protocol.probe import LinkProbe
from mqttfl.protocol.resume import DeviceSnapshot, Snapshots
from mqttfl.protocol.schedule import Action, actions
from mqttfl.protocol.schema import ModelRef, ModelSchema, check_state, mismatch
from mqttfl.protocol.status import NodeState
from mqttfl.wire.compress import TopK
from mqttfl.wire.encoding import encoded_bytes

SchemaSource = Callable[[ModelRef], ModelSchema]
Key = tuple[int, int]
ACT_TIMER = "act"
MIGRATE_TIMER = "migrate"
PROBE_TIMER = "probe"
# A round whose own compute per mini-batch leaves this band around the profile's prediction has the device
# measure its blocks again before the next round (split-point planning: the profile drifted).
DRIFT = (0.7, 1.4)
# A split mini-batch's round trip to the edge, against the last round's: outside this band the link is probed
# again (wider than DRIFT: the edge's share of the wait moves with its other devices).
LINK_DRIFT = (0.5, 2.0)
TRAINING_JOBS = (stage.Forward, stage.Backward, stage.Step, stage.LocalBatch)
STATE_FORMAT = 1
State = dict[str, np.ndarray]


@dataclass
class LamaMemory:
    """FedLAMA: what the device keeps of its layers between rounds (one run, one cut)."""

    run: str
    cut: int
    base: State  # every layer's value at its last aggregation: the delta is taken against it
    ends: dict[int, State] = field(default_factory=dict)  # weights at the end of recent rounds (a retried
    # round starts again from the end of the one before, so two are kept)


@dataclass
class Migration:
    id: str
    source: str
    dest: str
    path: MovePath
    t0: float  # the pause a move costs is timed on this device's clock only, from here to ready
    started: float  # the current wait began (moves when the source answers)
    heard_source: bool = False
    nbytes: int = 0


@dataclass
class DeviceRound:
    plan: Plan
    cut: int
    local: bool
    base: dict[str, np.ndarray]
    session: str
    started: float
    first_start: float  # the first start of this plan (a restart keeps counting FedFly's total time)
    t_download: float
    total: int  # mini-batches this round
    step: int = 0  # mini-batches completed
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    actions: list[Action] = field(default_factory=list)  # the current mini-batch's 1F1B actions
    pos: int = 0
    n_micro: int = 1
    batch_len: int = 0
    waiting: stage.Job | None = None  # the job whose result we need before going on
    down: Downstream = field(default_factory=lambda: Downstream(10.0))  # activations out, gradients back
    migration: Migration | None = None
    meters0: stage.Meters = field(default_factory=stage.Meters)
    delta: dict[str, np.ndarray] | None = None
    snaps: Snapshots = field(default_factory=lambda: Snapshots(0))  # states at the boundaries the edge saves
    then_boundary: bool = True  # after a snapshot: the boundary's work (a move) comes next, else just go on
    start: State = field(default_factory=dict)  # the weights the stage opens with (base, or FedLAMA's mix)
    encodings: dict[str, str] = field(default_factory=dict)
    weights: State = field(default_factory=dict)  # at the end of the round
    pipe: Pipeline | None = None  # a pipelined round: its stages across the device's helpers
    variant: LocalModel | None = None  # the device class's model (None: the whole model in fp32)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # entries a pruned or width model trains
    prelude: bool = True  # profiling and meters before the first mini-batch
    probed: bool = False
    skip_profile: bool = False
    compute_s: float = 0.0  # this device's own training jobs, on its clock
    wait_s: float = 0.0  # split: activations sent to gradients back, summed over mini-batches
    waits: int = 0
    job_t0: float = 0.0
    cutoff: bool = False  # the class's tau_s ended the round early
    train_mem: int = 0


class DeviceMachine(PipelineCoordinator):
    """See the module docstring. ``n_samples`` is the size of the local shard (the data stays in the runtime)."""

    def __init__(self, node: str, *, edge: str, n_samples: int, schemas: SchemaSource, cloud: str = "cloud",
                 cut: int | None = None, labels: list[int] | None = None, label_format: LabelFormat | None = None,
                 eval_samples: int = 0, act_timeout_s: float = 10.0, migrate_timeout_s: float = 10.0,
                 id_prefix: str = "0", encodings: dict[str, str] | None = None, topk_ratio: float = 0.0,
                 attack_scale: float = 1.0, restored: dict[str, Any] | None = None, klass: str = DEFAULT_CLASS,
                 memory_limit: int = 0) -> None:
        check_id(edge, "edge")
        self.node, self.edge, self.cloud = node, edge, cloud
        self.n_samples = n_samples
        self.schemas = schemas
        self.cut_pref = cut
        self.labels = labels
        self.label_format = label_format  # what the local labels are: checked against every plan
        self.eval_samples = eval_samples  # the held-out split for federated evaluation
        self.refused: tuple[str, str] | None = None  # (run, reason) of the last plan refused
        self.eval_jobs: dict[stage.Job, Plan] = {}
        self.evaluated: list[tuple[str, int]] = []  # (run, round) of models evaluated, against re-deliveries
        self.act_timeout_s = act_timeout_s
        self.migrate_timeout_s = migrate_timeout_s
        self.round: DeviceRound | None = None
        self.pending: Received | None = None  # a newer round announced while one was running
        self.done_keys: list[tuple[str, int, int]] = []
        self.first_starts: dict[tuple[str, int, int], float] = {}
        self.rounds_done = 0
        self.rx_mark = 0  # bytes received at the end of the previous round
        self.pending_move: tuple[str, MovePath] | None = None
        self.move_at_step = 0
        self.previous_edge: str | None = None  # a round announced there before an idle move still counts
        self.following: tuple[str, ...] = (edge,)  # the runtime subscribes to the configured edge's from the start
        self.idle_move: tuple[MovePath, int] = (MovePath.DIRECT, 0)
        self.migrations: list[dict[str, Any]] = []
        self.resume_tokens: list[str] = []  # edge restarts already acted on
        self._ids = 0
        self._id_prefix = id_prefix
        self._fx: list[Effect] = []
        try:
            self.encodings = check_encodings(encodings or {}, "device encodings")  # over the plan's
        except ProtocolError as e:
            raise ValueError(str(e)) from None
        self.topk_ratio = topk_ratio  # 0: the plan's
        # Attack emulation for tests and benchmarks ([device] attack_scale): the delta is multiplied by this
        # before it is sent, as a poisoning participant would.
        self.attack_scale = attack_scale
        self.topk: TopK | None = None
        self.topk_run = ""
        self.lama: LamaMemory | None = None
        self.profiles: dict[tuple[str, str, int], tuple[float, ...]] = {}  # pipelines: (run, stage, rows) -> s/block
        self.stage_memory: dict[str, int] = {}
        self.klass = klass  # the cloud's [cloud.classes] say what a device of this class trains
        self.memory_limit = memory_limit  # bytes for training (0: no limit), for split-point planning
        self.blocks: tuple[tuple[str, int], stage.BlockProfile] | None = None  # (fingerprint, batch) measured
        self.reprofile = False
        self.probe: LinkProbe | None = None
        self._probe_seq = 0
        # The last link measurement: (run, edge, round, bandwidth, latency); a round probes again when it is
        # for another run or edge, plan.probe_every rounds old, unmeasured, or the split round trips drifted.
        self.link: tuple[str, str, int, float, float] | None = None
        self.link_drifted = False
        self.link_wait: tuple[str, int, float] | None = None  # (edge, cut, seconds per mini-batch) last round
        self._clock = 0.0
        if restored:
            self._restore(restored)

    def _restore(self, saved: dict[str, Any]) -> None:
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"device state format {saved.get('format')!r} not supported (this device reads "
                             f"{STATE_FORMAT}); move the state directory away to start afresh")
        if saved.get("residual") is not None:
            self.topk = TopK(float(saved["topk_ratio"]), saved["residual"])
            self.topk_run = str(saved["run"])

    def _persist(self) -> None:
        self._do(Persist({"format": STATE_FORMAT, "run": self.topk_run,
                          "topk_ratio": self.topk.ratio if self.topk else None,
                          "residual": self.topk.residual() if self.topk else None}))

    # ------------------------------------------------------------------ interface
    def presence(self) -> dict[str, Any]:
        status: dict[str, Any] = {"edge": self.edge, "samples": self.n_samples,
                                  "cut": -1 if self.cut_pref is None else self.cut_pref}
        if self.eval_samples:
            status["eval_samples"] = self.eval_samples
        if self.encodings:
            status["encodings"] = dict(self.encodings)
        if self.labels is not None:
            # Eco-FL grouping uses the label mix; a device may keep it to itself (share_labels = false).
            status["labels"] = list(self.labels)
        if self.klass != DEFAULT_CLASS:
            status["class"] = self.klass
        return status

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rounds_done": self.rounds_done}
        p = self.round.pipe if self.round is not None else None
        if p is not None and p.layout is not None:
            out["pipeline"] = {"chain": list(p.layout.nodes), "blocks": list(p.layout.bounds), "epoch": p.epoch,
                               "stage_ms": [round(t * 1000, 3) for t in (p.own_s, *p.measured)],
                               "stash": [p.peak_stash, *p.stash], "rebalances": p.rebalances}
        return out

    @property
    def commands(self) -> tuple[str, ...]:
        return COMMANDS

    def handle(self, ev: Event, now: float) -> list[Effect]:
        self._fx = []
        self._clock = now
        if isinstance(ev, Received):
            self._on_message(ev, now)
        elif isinstance(ev, JobDone):
            self._on_job(ev, now)
        elif isinstance(ev, TimerFired):
            self._on_timer(ev, now)
        elif isinstance(ev, LinkChanged):
            if ev.up and self.round is not None and self.round.down.outstanding:
                self._resend(now)
        elif isinstance(ev, Command):
            self._on_command(ev, now)
        elif isinstance(ev, Started):
            self._status(NodeState.IDLE, round=None)
        following = tuple(dict.fromkeys(e for e in (self.edge, self.previous_edge) if e is not None))
        if following != self.following:
            # The edges whose group announcements we hear: ours, and the one an idle move just left, whose
            # announcement of a round may still be on its way (docs/design.md, "Topics").
            self.following = following
            self._do(Follow(following))
        fx, self._fx = self._fx, []
        return fx

    # ------------------------------------------------------------------ helpers
    def _do(self, *effects: Effect) -> None:
        self._fx.extend(effects)

    def _new_id(self, what: str) -> str:
        self._ids += 1
        return f"{what}{self._id_prefix}.{self._ids}"

    def _status(self, state: NodeState, **fields: Any) -> None:
        self._do(SetStatus(state, {"edge": self.edge, **fields}))

    def _run(self, job: stage.Job) -> None:
        assert self.round is not None
        self.round.waiting = job
        self.round.job_t0 = self._clock
        self._do(Run(job))

    def _send(self, dst: str, msg: Any, reliable: bool = False, encoding: str = "none") -> None:
        self._do(Send(dst, msg, reliable, encoding))

    # ------------------------------------------------------------------ messages
    def _on_message(self, ev: Received, now: float) -> None:
        msg = ev.msg
        if isinstance(msg, TrainRound):
            self._on_train_round(ev, now)
        elif isinstance(msg, Gradients):
            self._on_grad(ev, msg, now)
        elif isinstance(msg, Resume):
            self._on_resume(ev, msg, now)
        elif isinstance(msg, Ckpt):
            self._on_ckpt(ev, msg, now)
        elif isinstance(msg, EvaluateModel):
            self._on_evaluate(ev, msg)
        elif isinstance(msg, (StageReady, StageState, StageProfile)):
            self._pipe_on_message(ev.src, msg, now)
        elif isinstance(msg, Echo):
            self._on_echo(ev, msg, now)
        else:
            self._do(Drop("unexpected", f"{msg.kind}/{msg.op} is not for a device", ev.src))

    def _on_train_round(self, ev: Received, now: float) -> None:
        msg = ev.msg
        assert isinstance(msg, TrainRound)
        plan, r = msg.plan, self.round
        if ev.src != self.edge and not (r is None and ev.src == self.previous_edge):
            self._do(Drop("unknown_sender", f"model from {ev.src}, attached to {self.edge}", ev.src))
            return
        if msg.devices and self.node not in msg.devices:
            # Our edge's group announcement for the others (we were not sampled, or just arrived): counted,
            # not reported, as it is no fault.
            self._do(Count("group_not_named"))
            return
        if plan.key in self.done_keys or (r is not None and plan.key == r.plan.key):
            return  # a re-delivered announcement of a round we run or finished
        schema = self._compatible(plan, msg.schema)
        if schema is None:
            # Nothing to report for this round: the edge closes our session instead of waiting for its deadline.
            self._send(ev.src, DeviceUpdate(run=plan.run, round=plan.round, report=Report(samples=0,
                                                                                        attempt=plan.attempt),
                                            delta={}), reliable=True)
            return
        try:
            if not 1 <= msg.cut <= schema.n_blocks:
                raise ProtocolError("bad_plan", f"cut {msg.cut} outside 1..{schema.n_blocks}")
            if msg.helpers and (msg.partial or msg.cut == schema.n_blocks or self.node in msg.helpers
                                or msg.local is not None):
                raise ProtocolError("bad_plan", "a pipeline needs a split round with the whole model")
            if msg.local is not None and msg.local.local_only and msg.cut != schema.n_blocks:
                raise ProtocolError("bad_plan", f"a {msg.local.train} {msg.local.precision} model trains locally, "
                                                f"not at cut {msg.cut}")
            if msg.local is not None and msg.local.frozen(schema.n_blocks) >= schema.n_blocks:
                raise ProtocolError("bad_plan", "a partial model that trains no block")
            specs = schema.specs(0, schema.n_blocks if msg.helpers else msg.cut)
            if msg.partial:
                if not plan.fedlama:
                    raise ProtocolError("bad_plan", "a partial model outside FedLAMA")
                specs = {k: v for k, v in specs.items() if k in msg.state}
            state = check_state(msg.state, specs, "device model")
        except (ProtocolError, ValueError, KeyError) as e:
            self._do(Drop(getattr(e, "code", "bad_model"), str(e), ev.src))
            return
        if r is not None:
            if not plan.newer_than(r.plan):
                self._do(Drop("stale", f"round {plan.key} is older than the one running {r.plan.key}", ev.src))
                return
            self.pending = ev
            self._abort(now, "a newer round was announced")
            return
        if ev.src != self.edge:
            # The round was announced at the old edge before our idle move reached it: train it there and
            # migrate as the move asked (path, and at_step or the first mini-batch boundary).
            self.pending_move = (self.edge, self.idle_move[0])
            self.move_at_step = self.idle_move[1]
            self.edge = ev.src
        self.previous_edge = None
        self._start_round(msg, state, schema, ev.transit_s, now)

    def _compatible(self, plan: Plan, cloud_schema: Any) -> ModelSchema | None:
        """The plan's model as this device builds it, or None after refusing the plan: another architecture than
        the cloud's (by fingerprint), or labels the plan cannot train."""
        event, fingerprint = "model_mismatch", ""
        try:
            schema = self.schemas(plan.model_ref)
        except Exception as e:  # a user's model that does not build here: another version, or not installed
            reason = f"cannot build model {plan.model!r}: {type(e).__name__}: {e}"
        else:
            fingerprint = schema.fingerprint
            problem = self.label_format.problem(plan) if self.label_format is not None else None
            differs = mismatch(schema, plan.fingerprint, plan.model, cloud_schema)
            if differs is not None:
                reason = differs
            elif problem is not None:
                event, reason = "data_mismatch", f"local data cannot train this run: {problem}"
            else:
                return schema
        if self.refused != (plan.run, reason):
            self.refused = (plan.run, reason)
            info = {"run": plan.run, "round": plan.round, "reason": reason, "fingerprint": fingerprint,
                    "expected": plan.fingerprint}
            self._do(Emit(event, "error", info), Log("error", "plan refused", info),
                     SetStatus(NodeState.IDLE if self.round is None else NodeState.TRAINING,
                               {"edge": self.edge, "fingerprint": fingerprint,
                                "refused": {"run": plan.run, "reason": reason[:500]}}))
        return None

    def _lama_start(self, msg: TrainRound, state: State) -> tuple[State, State] | None:
        """FedLAMA: (start weights, base) of this round, or None when a partial model finds no local layers
        to complete it (the device restarted, or missed the previous round): the edge sends the whole
        device part next time."""
        plan = msg.plan
        if not msg.partial:
            self.lama = LamaMemory(plan.run, msg.cut, dict(state))
            return dict(state), dict(state)
        mem = self.lama
        prev = mem.ends.get(plan.round - 1) if mem is not None and mem.run == plan.run and mem.cut == msg.cut \
            else None
        if mem is None or prev is None:
            return None
        mem.base.update(state)
        return {**prev, **state}, dict(mem.base)

    def _start_round(self, msg: TrainRound, state: dict[str, np.ndarray], schema: ModelSchema, t_download: float,
                     now: float) -> None:
        plan = msg.plan
        start, base = dict(state), state
        if plan.fedlama:
            got = self._lama_start(msg, state)
            if got is None:
                self._do(Emit("fedlama_state_missing", "warning", {"round": plan.round, "edge": self.edge}),
                         Drop("fedlama_state_missing", f"partial model for round {plan.round}, no local layers",
                              self.edge))
                return
            start, base = got
        first = self.first_starts.setdefault(plan.key, now)
        while len(self.first_starts) > 8:
            self.first_starts.pop(next(iter(self.first_starts)))
        self.round = r = DeviceRound(
            plan=plan, cut=msg.cut, local=msg.cut == schema.n_blocks, base=base, session=self._new_id("r"),
            started=now, first_start=first, t_download=t_download, total=round_steps(self.n_samples, plan),
            down=Downstream(self.act_timeout_s), start=start, encodings=plan.encodings(msg.encodings),
            variant=msg.local)
        self.refused = None
        if msg.helpers:
            r.pipe = Pipeline(tuple(msg.helpers), schema, plan, msg.cut)
        elif not r.local:  # a device training locally keeps no state at its edge
            r.snaps = Snapshots(plan.resume_every)
            r.snaps.keep(0, DeviceSnapshot(None, 0.0, 0, 0))
        self._status(NodeState.TRAINING, round=plan.round, run=plan.run, fingerprint=schema.fingerprint, refused=None)
        self._do(ReconnectWithin(reconnect_within(plan.deadline_s)))
        self._do(Log("info", "round start", {"round": plan.round, "cut": msg.cut, "steps": r.total}))
        self._begin(now)

    # ------------------------------------------------------------------ profiles (split-point planning)
    def _begin(self, now: float) -> None:
        """Before the first mini-batch: when the plan asks for profiles, measure the blocks (once per model and
        batch size, again after the measured compute drifted from them) and the link to the edge, and tell the
        cloud; then the meters, and training starts."""
        r = self.round
        assert r is not None
        plan = r.plan
        if plan.profile and not r.skip_profile and r.pipe is None and (r.variant is None or not r.variant.local_only):
            key = (plan.fingerprint, plan.batch_size)
            if self.blocks is None or self.blocks[0] != key or self.reprofile:
                self._run(stage.Profile(r.session, plan))
                return
            if not r.probed:
                r.probed = True
                if self._link_due(plan):
                    self.probe = LinkProbe(self._probe_seq)
                    self._send(self.edge, self.probe.next(now))
                    self._do(SetTimer(PROBE_TIMER, now + self.act_timeout_s))
                    return
                self._send_profile(r)  # the blocks and the last link measurement: the cloud keeps the latest
        r.prelude = False
        r.started = now  # the round's own clock (its cutoff) starts with training
        self._run(stage.Measure(r.session))

    def _on_echo(self, ev: Received, msg: Echo, now: float) -> None:
        r, p = self.round, self.probe
        if r is None or p is None or ev.src != self.edge or not p.answered(msg, now):
            return  # a late echo of a probe that timed out, or of an earlier round
        if not p.done:
            self._send(self.edge, p.next(now))
            self._do(SetTimer(PROBE_TIMER, now + self.act_timeout_s))
            return
        self._profiled(now)

    def _link_due(self, plan: Plan) -> bool:
        """Probe the link this round? [choice] Not every round: on a long link the probe's four round trips hold
        up training (a second per round at 100 ms one way), so a measurement serves ``plan.probe_every`` rounds
        unless the link is new, unmeasured, or this device's split round trips changed (``_check_link``)."""
        if self.link is None or self.link_drifted:
            return True
        run, edge, measured_at, bandwidth, _ = self.link
        return (run != plan.run or edge != self.edge or bandwidth <= 0
                or not 0 <= plan.round - measured_at < max(plan.probe_every, 1))

    def _profiled(self, now: float) -> None:
        r, p = self.round, self.probe
        assert r is not None and p is not None and self.blocks is not None
        self.probe, self._probe_seq = None, p.seq + 1
        self._do(CancelTimer(PROBE_TIMER))
        bandwidth, latency = p.result()
        self.link = (r.plan.run, self.edge, r.plan.round, round(bandwidth, 1), round(latency, 6))
        self.link_drifted = False
        self._send_profile(r)
        self._begin(now)

    def _send_profile(self, r: DeviceRound) -> None:
        assert self.blocks is not None and self.link is not None
        (fingerprint, batch), blocks = self.blocks
        _, _, _, bandwidth, latency = self.link
        self._send(self.cloud, DeviceProfile(
            run=r.plan.run, round=r.plan.round, fingerprint=fingerprint, batch_size=batch, block_s=blocks.block_s,
            block_bytes=blocks.block_bytes, edge=self.edge, bandwidth=bandwidth, latency_s=latency,
            memory_limit=self.memory_limit))

    def _check_link(self, r: DeviceRound) -> None:
        """After a split round: did a mini-batch's round trip to the edge (activations out, gradients back) leave
        the band around the last round's at the same edge and cut? Then probe again next round."""
        if not r.waits or r.down.resends:  # waits count only plain split mini-batches
            return
        wait = r.wait_s / r.waits
        last, self.link_wait = self.link_wait, (self.edge, r.cut, wait)
        if last is None or last[:2] != (self.edge, r.cut) or last[2] <= 0:
            return
        ratio = wait / last[2]
        if not LINK_DRIFT[0] <= ratio <= LINK_DRIFT[1]:
            self.link_drifted = True
            self._do(Emit("link_drift", fields={"device": self.node, "round": r.plan.round, "edge": self.edge,
                                                "wait_over_last": round(ratio, 3)}))

    def _check_drift(self, r: DeviceRound) -> None:
        """After a round: has this device's compute per mini-batch left the band around its profile?"""
        if not (r.plan.profile and self.blocks is not None and r.step and r.compute_s > 0) or r.skip_profile \
                or r.pipe is not None:
            return
        predicted = sum(self.blocks[1].block_s[:r.cut])
        ratio = (r.compute_s / r.step) / predicted if predicted > 0 else 1.0
        if not DRIFT[0] <= ratio <= DRIFT[1]:
            self.reprofile = True
            self._do(Emit("profile_drift", fields={"device": self.node, "round": r.plan.round,
                                                   "measured_over_profile": round(ratio, 3)}))

    # ------------------------------------------------------------------ jobs
    def _on_job(self, ev: JobDone, now: float) -> None:
        if ev.job in self.eval_jobs:
            self._evaluated(ev)
            return
        r = self.round
        if r is None or ev.job is not r.waiting:
            return  # the result of a job of an aborted round
        r.waiting = None
        job = ev.job
        if isinstance(job, TRAINING_JOBS):
            r.compute_s += max(0.0, now - r.job_t0)
        if isinstance(job, stage.Profile) and r.pipe is None:
            if ev.error is not None:
                r.skip_profile = True  # train without: the cloud keeps the cut it has
                self._do(Emit("profile_failed", "warning", {"device": self.node, "error": ev.error[:300]}))
            else:
                self.blocks, self.reprofile = ((r.plan.fingerprint, r.plan.batch_size), ev.result), False
            self._begin(now)
            return
        if ev.error is not None:
            self._abort(now, f"training failed: {ev.error}")
            return
        if self._pipe_job(ev, now):
            return
        if isinstance(job, stage.Open) and isinstance(ev.result, stage.Opened):
            r.masks = ev.result.masks
        if isinstance(job, stage.Memory):
            r.train_mem = int(ev.result)
            self._run(stage.Measure(r.session))
            return
        if isinstance(job, stage.Measure):
            if r.delta is None:
                r.meters0 = ev.result
                if r.pipe is not None:
                    self._pipe_begin(now)
                else:
                    self._run(stage.Open(r.session, r.plan, 0, r.cut, r.start, data=True, local=r.variant))
            else:
                self._deliver(ev.result, now)
            return
        if isinstance(job, stage.Forward):
            self._forwarded(job, ev.result, now)
        elif isinstance(job, stage.Backward):
            r.down.settled((job.step, job.micro))
            r.pos += 1
            if r.pipe is not None:
                self._pipe_backwarded((job.step, job.micro), now)
        elif isinstance(job, stage.Step):
            self._mini_batch_done(now)
            return
        elif isinstance(job, stage.LocalBatch):
            res: stage.BatchStats = ev.result
            r.loss_sum += res.loss_sum
            r.correct += res.correct
            r.seen += res.n
            self._mini_batch_done(now)
            return
        elif isinstance(job, stage.Weights):
            r.weights = ev.result
            due = [k for k in r.plan.due(r.base) if k in ev.result]  # a partial model: its trained blocks
            r.delta = delta({k: ev.result[k] for k in due}, {k: r.base[k] for k in due})
            for k, m in r.masks.items():
                if k in r.delta:  # pruned entries trained nothing (their weight is 0, not the global's)
                    r.delta[k] = np.where(m, r.delta[k], np.float32(0.0)).astype(np.float32)
            self._run(stage.Memory(r.session))
            return
        elif isinstance(job, stage.Snapshot) and r.pipe is not None:
            self._pipe_at_boundary(ev.result, now)
            return
        elif isinstance(job, stage.Snapshot):
            r.snaps.keep(r.step, DeviceSnapshot(ev.result, r.loss_sum, r.correct, r.seen))
            if r.then_boundary:
                self._at_boundary(now)
                return
        self._advance(now)

    def _batch_len(self, r: DeviceRound, step: int) -> int:
        per_epoch = batches_per_epoch(self.n_samples, r.plan.batch_size)
        i = step % per_epoch
        return min(r.plan.batch_size, self.n_samples - i * r.plan.batch_size)

    def _advance(self, now: float) -> None:
        """Run the next action of the round, unless something must come first (a job, a gradient, a move)."""
        r = self.round
        if r is None or r.waiting is not None or r.migration is not None or r.prelude:
            return
        pipe = r.pipe
        if pipe is not None and (not pipe.running or pipe.layout is None):
            return  # the pipeline is being laid out
        if r.step >= r.total:
            if pipe is None:  # a pipeline ends at its last boundary (chain.py)
                self._run(stage.Weights(r.session))
            return
        if not r.actions:
            r.batch_len = self._batch_len(r, r.step)
            r.n_micro = min(r.plan.micro_batches, r.batch_len)
            if r.local:
                self._run(stage.LocalBatch(r.session, r.step, r.n_micro))
                return
            if pipe is not None and pipe.layout is not None:
                r.actions = actions(pipe.layout.stages, r.n_micro, 0, r.plan.pipeline_schedule)
            else:
                r.actions = actions(2, r.n_micro, 0)
            r.pos = 0
        if r.pos >= len(r.actions):
            self._run(stage.Step(r.session))
            return
        action = r.actions[r.pos]
        if pipe is not None:
            pipe.asked_at = now  # our compute per micro-batch is what the jobs below take
        if action.op == "F":
            self._run(stage.Forward(r.session, r.step, action.micro, r.n_micro))
            return
        grad = r.down.grads.get((r.step, action.micro))
        if grad is None:
            if r.down.blocked_since is None:
                r.down.blocked_since = now
            return  # the gradient arrives as a message
        r.down.blocked_since = None
        self._run(stage.Backward(r.session, r.step, action.micro, grad.g))

    def _forwarded(self, job: stage.Forward, res: stage.Smashed, now: float) -> None:
        r = self.round
        assert r is not None
        act = Activations(run=r.plan.run, round=r.plan.round, step=job.step, micro=job.micro, n_micro=job.n_micro,
                          batch_size=r.batch_len, attempt=r.plan.attempt, x=res.x, y=res.y,
                          grad_encoding=r.encodings["grad"], epoch=r.pipe.epoch if r.pipe else 0)
        r.down.sent(act, now)
        if r.pipe is not None:
            self._pipe_forwarded((job.step, job.micro), now)
        self._send(self._downstream(r), act, encoding=r.encodings["act"])
        self._do(SetTimer(ACT_TIMER, r.down.due))
        r.pos += 1

    def _downstream(self, r: DeviceRound) -> str:
        """Where our activations go: the edge, or a pipeline's first helper."""
        return r.pipe.layout.first if r.pipe is not None and r.pipe.layout is not None else self.edge

    def _mini_batch_done(self, now: float) -> None:
        r = self.round
        assert r is not None
        r.step += 1
        r.actions = []
        tau = r.variant.tau_s if r.variant is not None else 0.0
        if tau > 0 and r.step < r.total and now - r.started >= tau:
            # The class's cutoff (Flower's tau): checked after every mini-batch, so it fires at most one late;
            # the round reports what it has, weighted by the examples it processed.
            r.cutoff, r.total = True, r.step
        if r.pipe is not None:
            # Our state at every boundary: with the helpers' (they send theirs at each flush) it is the whole
            # pipeline's, from which the device lays it out again (docs/design.md, "Pipeline").
            r.then_boundary = True
            self._run(stage.Snapshot(r.session))
            return
        if r.snaps.wanted(r.step) and r.step < r.total:
            # The edge saves its side of this boundary: keep ours until it holds a later one (edge resume).
            r.then_boundary = True
            self._run(stage.Snapshot(r.session))
            return
        self._at_boundary(now)

    def _at_boundary(self, now: float) -> None:
        r = self.round
        assert r is not None
        # A move waits for a mini-batch boundary (no gradient in flight); one asked at the last boundary
        # happens between rounds. Local training keeps no state at the edge: it moves between rounds too.
        if self.pending_move is not None and not r.local and self.move_at_step <= r.step < r.total:
            self._start_migration(now)
            return
        self._advance(now)

    # ------------------------------------------------------------------ gradients and re-sends
    def _on_grad(self, ev: Received, msg: Gradients, now: float) -> None:
        r = self.round
        if r is None or ev.src != self._downstream(r) or msg.run != r.plan.run or msg.round != r.plan.round:
            if r is not None and r.pipe is not None and msg.run == r.plan.run and msg.round == r.plan.round:
                self._do(Count("stage_stale_epoch"))  # from a stage of a layout that is gone
                return
            self._do(Drop("wrong_round", f"grad from {ev.src} for {msg.run}/{msg.round}", ev.src))
            return
        if r.pipe is not None and not self._pipe_grad(ev.src, msg):
            self._do(Count("stage_stale_epoch"))
            return
        try:
            if not r.down.accept(msg):
                return  # the answer to a re-sent act we already have
        except ProtocolError as e:
            self._do(Drop(e.code, str(e), ev.src))
            return
        r.loss_sum += msg.loss_sum
        r.correct += msg.correct
        r.seen += int(r.down.outstanding[msg.key].y.shape[0])
        if r.pipe is None and r.migration is None:
            r.wait_s += max(0.0, now - r.down.last_send)
            r.waits += 1
        r.snaps.edge_saved(msg.saved)
        self._advance(now)

    def _resend(self, now: float) -> None:
        r = self.round
        assert r is not None
        acts = r.down.resend(now)
        to = self._downstream(r)
        self._do(Log("info", "re-sending outstanding activations", {"n": len(acts), "to": to}))
        for act in acts:
            self._send(to, act, encoding=r.encodings["act"])
        self._do(SetTimer(ACT_TIMER, r.down.due))

    def _on_timer(self, ev: TimerFired, now: float) -> None:
        r = self.round
        if r is None:
            return
        if ev.key == PIPE_TIMER and r.pipe is not None:
            self._pipe_timer(now)
            return
        if ev.key == PROBE_TIMER:
            if self.probe is not None and r.prelude:
                self.probe.timed_out(now)
                self._profiled(now)  # an edge that does not answer: report what was measured
            return
        if ev.key == MIGRATE_TIMER and r.migration is not None:
            if now >= r.migration.started + self.migrate_timeout_s:  # a moved deadline re-arms the timer
                m = r.migration
                if m.heard_source:
                    self._migration_failed(now, "destination did not answer")
                else:
                    self._restart_at(now, m.dest, m.id, m.source, "source edge did not answer")
            return
        down = r.down
        if ev.key != ACT_TIMER or not down.outstanding or r.migration is not None:
            return
        if now < down.due:  # the timer's own sum: never early by a rounding error
            self._do(SetTimer(ACT_TIMER, down.due))
            return
        if down.blocked_since is None:
            self._do(SetTimer(ACT_TIMER, now + self.act_timeout_s))
            return
        if self.pending_move is not None:
            # Stuck mid-batch at a silent source while asked to move: the source is gone.
            dest, _ = self.pending_move
            self.pending_move = None
            self._restart_at(now, dest, self._new_id("m"), self.edge, "source edge did not answer")
            return
        if now - down.blocked_since > max(r.plan.deadline_s, self.act_timeout_s * 3):
            self._abort(now, f"no gradient from {self.edge} for {r.plan.deadline_s:.0f}s")
            return
        self._resend(now)

    # ------------------------------------------------------------------ round end
    def _deliver(self, meters: stage.Meters, now: float) -> None:
        r = self.round
        assert r is not None and r.delta is not None
        # A round cut short weighs by the examples it processed (per epoch, so a full round weighs its shard).
        samples = min(self.n_samples, r.seen // r.plan.epochs) if r.cutoff else self.n_samples
        tensors, masks = compact(self._outgoing(r), r.masks)
        report = Report(
            samples=samples, attempt=r.plan.attempt, steps=r.step, loss_sum=r.loss_sum, correct=r.correct,
            seen=r.seen, cut=r.cut, t_local=now - r.started, t_download=r.t_download,
            t_total=now - r.first_start,
            # What it sent during the round, and the delta about to go (its tensors as they will travel).
            bytes_up=meters.tx_bytes - r.meters0.tx_bytes + encoded_bytes(r.encodings["delta"],
                                                                          [*tensors.values(), *masks.values()]),
            # Since the end of the previous round, so the model message that opened this one counts.
            bytes_down=meters.rx_bytes - self.rx_mark, peak_rss_mb=round(meters.peak_rss_mb, 1),
            resends=r.down.resends, stages=r.pipe.layout.stages if r.pipe and r.pipe.layout else 0,
            cpu_s=round(max(0.0, meters.cpu_s - r.meters0.cpu_s), 4),
            energy_j=round(max(0.0, meters.energy_j - r.meters0.energy_j), 3),
            train_mem_mb=round(r.train_mem / 2**20, 3), cutoff=int(r.cutoff))
        self._check_drift(r)
        if r.plan.profile:
            self._check_link(r)
        if r.plan.fedlama and self.lama is not None:
            ends = self.lama.ends
            ends[r.plan.round] = r.weights
            for old in sorted(ends)[:-2]:
                del ends[old]
        self._send(self.edge, DeviceUpdate(run=r.plan.run, round=r.plan.round, report=report, delta=tensors,
                                           masks=masks), reliable=True, encoding=r.encodings["delta"])
        if r.encodings["delta"] == "topk":
            # After the delta went to the outbox: a crash in between sends this round's share twice rather than
            # losing it.
            self._persist()
        self.rx_mark = meters.rx_bytes
        self.done_keys = (self.done_keys + [r.plan.key])[-8:]
        self.rounds_done += 1
        self._do(Log("info", "round done", {"round": r.plan.round, "steps": r.step,
                                            "t_local": round(now - r.started, 2),
                                            "loss": round(r.loss_sum / max(r.seen, 1), 4)}))
        self._end_round(now)

    # ------------------------------------------------------------------ edge resume (protocol/resume.py)
    def _on_resume(self, ev: Received, msg: Resume, now: float) -> None:
        """Our edge restarted (or says our round is over there). Restored: go back to our own state at the
        boundary it holds and train on from there; lost: ask the cloud to restart our part of the round there;
        closed: we come too late, stop."""
        r = self.round
        if ev.src != self.edge:
            self._do(Drop("unknown_sender", f"resume from {ev.src}, attached to {self.edge}", ev.src))
            return
        if r is None or (msg.run, msg.round, msg.attempt) != r.plan.key or msg.token in self.resume_tokens \
                or r.local or r.migration is not None:
            return  # not our round, already acted on, no edge-side state, or a move decides
        self.resume_tokens = (self.resume_tokens + [msg.token])[-16:]
        if msg.session == EdgeSession.CLOSED:
            self._abort(now, f"{self.edge} already closed round {r.plan.round}")
            return
        if msg.session == EdgeSession.RESTORED and msg.step == r.step + 1 and r.down.outstanding \
                and r.pipe is None:
            # The edge saved the end of the mini-batch we are finishing, with the gradients it sent for it:
            # our re-sent activations are answered from them, and we reach its boundary without going back.
            self._do(Emit("round_resumed", fields={"device": self.node, "edge": self.edge, "round": r.plan.round,
                                                   "step": msg.step, "replayed": 0}))
            self._resend(now)
            return
        snap = r.snaps.rewind(msg.step) if msg.session == EdgeSession.RESTORED else None
        if snap is None:
            self._send(self.cloud, Restart(run=r.plan.run, round=r.plan.round, migration=self._new_id("m"),
                                           edge=self.edge, source=self.edge))
            # Everything trained so far this round is trained again from the global model.
            self._do(Emit("round_rejoin", "warning", {"device": self.node, "edge": self.edge, "round": r.plan.round,
                                                      "replayed": r.step, "reason": f"edge session {msg.session}"}))
            self._abort(now, f"{self.edge} lost our session; asked the cloud to restart our part there")
            return
        replayed = r.step - msg.step
        self._do(Run(stage.Close(r.session)))
        r.session = self._new_id("r")
        r.step, r.loss_sum, r.correct, r.seen = msg.step, snap.loss_sum, snap.correct, snap.seen
        r.actions, r.pos = [], 0
        resends, r.down = r.down.resends, Downstream(self.act_timeout_s)
        r.down.resends = resends
        st = snap.stage
        self._do(Emit("round_resumed", fields={"device": self.node, "edge": self.edge, "round": r.plan.round,
                                               "step": msg.step, "replayed": replayed}))
        self._run(stage.Open(r.session, r.plan, 0, r.cut, st.weights if st else r.start,
                             optimizer=(st.optimizer or None) if st else None, rng=st.rng if st else None,
                             data=True))

    def _outgoing(self, r: DeviceRound) -> State:
        """The delta as it leaves: scaled by the attack emulation, then top-k with error feedback if asked."""
        assert r.delta is not None
        d = r.delta
        if self.attack_scale != 1.0:
            d = {k: (v * np.float32(self.attack_scale)).astype(np.float32) for k, v in d.items()}
        if r.encodings["delta"] != "topk":
            return d
        ratio = self.topk_ratio or r.plan.topk_ratio
        if self.topk is None or self.topk_run != r.plan.run or self.topk.ratio != ratio:
            self.topk, self.topk_run = TopK(ratio), r.plan.run  # a new run's deltas owe nothing to the old one
        return self.topk.select(d)

    def _abort(self, now: float, reason: str) -> None:
        self._do(Emit("round_aborted", "warning", {"reason": reason}),
                 Log("warning", "round aborted", {"reason": reason}))
        self._end_round(now)

    def _end_round(self, now: float) -> None:
        r = self.round
        assert r is not None
        if r.pipe is not None:
            self._pipe_close()
        self._do(Run(stage.Close(r.session)), ReconnectWithin(None))
        self.round = None
        if self.probe is not None:
            self._probe_seq = self.probe.seq + 1
            self.probe = None
        if self.pending_move is not None:
            self.edge, _ = self.pending_move
            self.pending_move = None
            self._do(Emit("moved", fields={"device": self.node, "destination": self.edge, "during_round": False}))
        self._status(NodeState.IDLE, round=None)
        if self.pending is not None:
            ev, self.pending = self.pending, None
            self._on_train_round(ev, now)

    # ------------------------------------------------------------------ migration (FedFly)
    def _start_migration(self, now: float) -> None:
        r = self.round
        assert r is not None and self.pending_move is not None
        dest, path = self.pending_move
        self.pending_move = None
        source, mid = self.edge, self._new_id("m")
        if path == MovePath.RESTART:
            self._restart_at(now, dest, mid, source, "restart requested")
            return
        r.migration = Migration(mid, source, dest, path, now, now)
        self._do(SetStatus(NodeState.MIGRATING, {"edge": source, "destination": dest}))
        # First tell the destination whose checkpoint to accept (it trusts no self-declared edge).
        self._send(dest, Expect(migration=mid, source=source))
        self._send(source, Freeze(run=r.plan.run, round=r.plan.round, migration=mid, to=dest, path=path,
                                  step=r.step))
        self._do(SetTimer(MIGRATE_TIMER, now + self.migrate_timeout_s))

    def _on_ckpt(self, ev: Received, msg: Ckpt, now: float) -> None:
        r = self.round
        m = r.migration if r is not None else None
        if r is None or m is None or msg.migration != m.id:
            return  # late answers of a move that is over
        if ev.src == m.source and isinstance(msg, Nothing):
            # Mid-round the source should hold our edge-side state; if it has none (it restarted, or its
            # round timed out), the round can only start over at the destination.
            self._restart_at(now, m.dest, m.id, m.source, "source edge held no state for us")
        elif ev.src == m.source and isinstance(msg, Refused):
            self._migration_failed(now, f"source refused: {msg.reason}")
        elif ev.src == m.source and isinstance(msg, (Frozen, Transfer)):
            m.heard_source = True
            m.nbytes = msg.checkpoint_bytes
            m.started = now  # now waiting for the destination
            self._do(SetTimer(MIGRATE_TIMER, now + self.migrate_timeout_s))
            if isinstance(msg, Transfer):  # relay: the edges may not talk to each other; we carry it
                self._send(m.dest, msg)
        elif ev.src == m.dest and isinstance(msg, Ready):
            self._migrated(now, m)
        elif ev.src == m.dest and isinstance(msg, Refused):
            self._migration_failed(now, f"destination refused: {msg.reason}")

    def _migrated(self, now: float, m: Migration) -> None:
        r = self.round
        assert r is not None
        self._send(m.source, Release(migration=m.id))
        self.edge = m.dest
        r.migration = None
        record = {"device": self.node, "source": m.source, "destination": m.dest, "path": str(m.path),
                  "migration": m.id, "pause_ms": round((now - m.t0) * 1000.0, 2), "checkpoint_bytes": m.nbytes,
                  "step": r.step, "round": r.plan.round}
        self.migrations = (self.migrations + [record])[-50:]
        self._status(NodeState.TRAINING)
        self._do(Emit("migration_done", fields=record), Log("info", "migrated", record))
        if r.pipe is not None:
            self._pipe_moved(now)  # the last helper now sends to the new edge
            return
        if r.snaps.every > 0 and r.step not in r.snaps.kept:
            # The destination saved the session as it installed it: keep our side of this boundary too.
            r.then_boundary = False
            self._run(stage.Snapshot(r.session))
            return
        self._advance(now)

    def _migration_failed(self, now: float, reason: str) -> None:
        """Resume at the source: it unfreezes the session, nothing was lost. The destination drops whatever
        it may still install for this move."""
        r = self.round
        assert r is not None and r.migration is not None
        m, r.migration = r.migration, None
        self._send(m.source, Abort(migration=m.id))
        self._send(m.dest, Abort(migration=m.id))
        self._status(NodeState.TRAINING)
        self._do(Emit("migration_failed", "warning", {
            "device": self.node, "source": m.source, "destination": m.dest, "migration": m.id, "reason": reason,
            "action": "continue at source"}), Log("warning", "migration failed, continuing at the source",
                                                  {"reason": reason}))
        self._advance(now)

    def _restart_at(self, now: float, dest: str, mid: str, source: str, reason: str) -> None:
        """The source edge is gone with our edge-side state: ask the cloud to restart our round at dest."""
        r = self.round
        assert r is not None
        self.edge = dest
        # Best effort: a live source forgets us instead of reporting us missing at its deadline.
        self._send(source, Leave(migration=mid))
        self._send(dest, Abort(migration=mid))  # drop a late install
        self._send(self.cloud, Restart(run=r.plan.run, round=r.plan.round, migration=mid, edge=dest, source=source))
        self._do(Emit("migration_fallback", "warning", {
            "device": self.node, "source": source, "destination": dest, "migration": mid, "reason": reason,
            "action": "restart the round at the destination from the global model"}))
        self._abort(now, "source edge gone; restarting the round at the destination")

    # ------------------------------------------------------------------ federated evaluation
    def _on_evaluate(self, ev: Received, msg: EvaluateModel) -> None:
        if ev.src not in (self.edge, self.previous_edge):
            self._do(Drop("unknown_sender", f"model from {ev.src}, attached to {self.edge}", ev.src))
            return
        plan = msg.plan
        if (plan.run, plan.round) in self.evaluated or any(p.key == plan.key for p in self.eval_jobs.values()):
            return  # re-delivered
        if not self.eval_samples:
            self._do(Drop("no_eval_data", "asked to evaluate, but this device has no eval_data", ev.src))
            return
        schema = self._compatible(plan, msg.schema)
        if schema is None:
            return
        try:
            state = check_state(msg.state, schema.specs(), "evaluated model")
        except ProtocolError as e:
            self._do(Drop(e.code, str(e), ev.src))
            return
        self._ids += 1
        job = stage.Evaluate(f"eval{self._id_prefix}.{self._ids}", plan.model_ref, state, plan.loss)
        self.eval_jobs[job] = plan
        self._do(Run(job))

    def _evaluated(self, ev: JobDone) -> None:
        plan = self.eval_jobs.pop(ev.job)
        self.evaluated = (self.evaluated + [(plan.run, plan.round)])[-8:]
        res: stage.EvalResult | None = ev.result
        if ev.error is not None or res is None or not res.n:
            self._do(Emit("evaluation_failed", "error", {"run": plan.run, "round": plan.round,
                                                         "error": (ev.error or "no held-out data")[:300]}))
            return
        metrics = {k: float(v) for k, v in res.metrics.items() if math.isfinite(v) and v >= 0}
        self._send(self.cloud, EvalReport(run=plan.run, round=plan.round, n=res.n, metrics=metrics), reliable=True)
        self._do(Log("info", "evaluated", {"round": plan.round, "n": res.n, **metrics}))

    # ------------------------------------------------------------------ commands
    def _on_command(self, ev: Command, now: float) -> None:
        try:
            result: Any
            if ev.cmd == "chain":
                result = self._cmd_chain(ev.args, now)
            elif ev.cmd == "train_stats":
                r = self.round
                result = {"rounds_done": self.rounds_done, "step": r.step if r else 0,
                               "resends": r.down.resends if r else 0, "edge": self.edge,
                               "migrations": self.migrations[-10:]}
            elif ev.cmd == "move":
                result = self._cmd_move(ev.args, now)
            elif ev.cmd == "set_edge":
                edge = check_id(arg(ev.args, "edge", str), "edge")
                if self.round is not None:
                    raise CommandError("cannot change edge during a round; use 'move'", "busy")
                self.edge = edge
                self._status(NodeState.IDLE)
                result = {"edge": edge}
            else:
                raise CommandError(f"unknown command {ev.cmd!r}; known: {sorted(COMMANDS)}", "unknown_command")
        except CommandError as e:
            self._do(Reply(ev, False, error=str(e), code=e.code))
            return
        self._do(Reply(ev, True, result))

    def _cmd_chain(self, args: dict[str, Any], now: float) -> dict[str, Any]:
        """The helpers of my pipeline online now (from the cloud, which sees them come and go, or an
        operator): a lost one is dropped at once, a new one joins at the next flush; idle, the next round's
        announcement says."""
        helpers = arg(args, "helpers", list, check=lambda v: len(v) <= 62 and all(isinstance(h, str) for h in v))
        checked = tuple(check_id(h, "helper") for h in helpers)
        if self.node in checked or len(set(checked)) != len(checked):
            raise CommandError("helpers must be other nodes, each once", "bad_request")
        r = self.round
        if r is None or r.pipe is None:
            return {"helpers": list(checked), "when": "next round"}
        return self._pipe_chain(checked, now)

    def _cmd_move(self, args: dict[str, Any], now: float) -> dict[str, Any]:
        """Move to another edge (FedFly). Idle: switch at once. Training: at the next mini-batch boundary,
        the edge-side state follows the device (``path`` direct = edge to edge, relay = through us)."""
        edge = check_id(arg(args, "edge", str), "edge")
        path = MovePath(arg(args, "path", str, default="direct", check=lambda v: v in set(MovePath),
                            why="direct, relay, or restart (drop the edge-side state and start the round "
                                "over there)"))
        at_step = arg(args, "at_step", int, default=0, check=lambda v: v >= 0)
        if edge == self.edge:
            cancelled = self.pending_move is not None
            self.pending_move = None  # moving back before the move happened: nothing to do
            return {"edge": edge, "moved": False, "reason": "already there", "cancelled": cancelled}
        if self.round is None:
            self.previous_edge = self.edge
            self.idle_move = (path, at_step)
            self.edge = edge
            self._status(NodeState.IDLE)
            self._do(Emit("moved", fields={"device": self.node, "destination": edge, "during_round": False}))
            return {"edge": edge, "moved": True, "when": "now (idle)"}
        self.pending_move = (edge, path)
        self.move_at_step = at_step
        when = f"mini-batch boundary {at_step}" if at_step > self.round.step else "next mini-batch boundary"
        return {"edge": edge, "moved": False, "when": when, "path": str(path)}


COMMANDS = ("move", "set_edge", "train_stats", "chain")
