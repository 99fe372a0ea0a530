"""The cloud's protocol machine: the global model, the run, the fleet view, and one round policy.

Theory of operation (docs/design.md, "Cloud"). The machine keeps what every run has: the global model and
the run's settings, the fleet as the nodes' retained statuses tell it, the history of completed rounds
(or versions), persistence, and the operators' commands. *How* rounds happen is a policy:
:class:`~mqttfl.protocol.cloud.sync.SyncRounds` (FedAvg rounds with deadline, quorum and retries) or
:class:`~mqttfl.protocol.cloud.groups.AsyncGroups` (group rounds mixed into global versions). Both drive
the same :class:`~mqttfl.protocol.cloud.rounds.CloudRound` bookkeeping and end in the same
:meth:`CloudMachine.commit`: the new global model is evaluated (a ``stage.Evaluate`` job), recorded,
persisted, and published as metrics, before the next round may start.

Joining: every plan carries the model's fingerprint and the cloud's description of it; a node whose own build
differs refuses and says so in its status, and the cloud leaves it (an edge: with its devices) out of the run and
out of the round in progress. Round 0 of a run waits for the devices ``wait_for`` names, or a grace period
(:meth:`CloudMachine.may_begin`). After each committed round the cloud keeps the model (``SaveModel``: the last
few and the run's best), and may ask the devices to evaluate it (``fedeval``). Every run's summary (state,
rounds, best) stays in the cloud's state: ``runs`` lists them.

Pipelines (Eco-FL; docs/design.md, "Pipeline"): a device's helpers come from ``[cloud] chains`` or the ``chain``
command; each round names the ones online to the device's edge, and when one comes or goes the cloud tells the
device (its ``chain`` command), which re-plans its stages.

Run states: idle -> running <-> paused; running -> done | failed; any -> stopped; ``start`` and ``new-run``
leave done, failed and stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from mqttfl.protocol import stage
from mqttfl.protocol.cloud import fedeval, record
from mqttfl.protocol.cloud.context import Policy
from mqttfl.protocol.cloud.cutplan import CutPlanner
from mqttfl.protocol.cloud.groups import AsyncGroups
from mqttfl.protocol.cloud.roles import Roles
from mqttfl.protocol.cloud.rounds import CloudRound, class_costs
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.protocol.cloud.sync import SyncRounds
from mqttfl.protocol.control import arg, check_id
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import (
    Command,
    CommandError,
    Count,
    Drop,
    Effect,
    Emit,
    Event,
    JobDone,
    Log,
    Metrics,
    Persist,
    Received,
    Reply,
    Run,
    RunLog,
    SaveModel,
    Send,
    SendCommand,
    SetStatus,
    SetTimer,
    Started,
    StatusSeen,
    TimerFired,
)
from mqttfl.protocol.hetero import DEFAULT_CLASS, LocalModel, expand
from mqttfl.protocol.messages import (
    DeviceProfile,
    EdgeProfile,
    EdgeUpdate,
    EvalReport,
    MovePath,
    OpenRound,
    Restart,
    RoundTag,
)
from mqttfl.protocol.plan import BEST_METRIC, PARTITIONS, PIPELINE_SCHEDULES, Plan, round_lr
from mqttfl.protocol.schema import ModelRef, ModelSchema, check_state, state_norm
from mqttfl.protocol.status import NodeState, Presence
from mqttfl.wire.encoding import ALLOWED as ENCODINGS_ALLOWED

STATE_FORMAT = 2
HISTORY = 1000  # rounds kept in memory (bounded entries, record.bounded); the run log keeps everything

# Run parameters an operator may change with `set` (flat [cloud] keys), and their checks.
SETTABLE: dict[str, tuple[type | tuple[type, ...], Callable[[Any], bool]]] = {
    "rounds": (int, lambda v: v >= 0),
    "lr": ((int, float), lambda v: v > 0),
    "momentum": ((int, float), lambda v: 0 <= v < 1),
    "epochs": (int, lambda v: v >= 1),
    "batch_size": (int, lambda v: v >= 1),
    "micro_batches": (int, lambda v: v >= 1),
    "deadline_s": ((int, float), lambda v: v > 0),
    "quorum": ((int, float), lambda v: 0 < v <= 1),
    "min_devices": (int, lambda v: v >= 1),
    "max_attempts": (int, lambda v: v >= 1),
    "max_versions": (int, lambda v: v >= 0),
    "group_deadline_s": ((int, float), lambda v: v > 0),
    "regroup_every": (int, lambda v: v >= 0),
    "sample_fraction": ((int, float), lambda v: 0 < v <= 1),
    "sample_size": (int, lambda v: v >= 0),
    "fed_eval_every": (int, lambda v: v >= 0),
    "max_update_norm": ((int, float), lambda v: v >= 0),
    "max_samples": (int, lambda v: v >= 0),
    "metrics_devices": (int, lambda v: v >= 0),
    "resume_every": (int, lambda v: v >= 0),
    "cut": (int, lambda v: v == -1 or v >= 1),
    # Pipelines (docs/design.md, "Pipeline"): from the next round on.
    "pipeline_schedule": (str, PIPELINE_SCHEDULES.__contains__),
    "partition": (str, PARTITIONS.__contains__),
    "rebalance_threshold": ((int, float), lambda v: v >= 0),
    "rebalance_windows": (int, lambda v: v >= 1),
    # Tensor encodings per kind (docs/algorithms.md, "Compression"): from the next round on.
    **{f"{kind}_encoding": (str, ENCODINGS_ALLOWED[kind].__contains__) for kind in ENCODINGS_ALLOWED},
    "topk_ratio": ((int, float), lambda v: 0 < v <= 1),
}

SchemaSource = Callable[[ModelRef], ModelSchema]


class CloudMachine:
    def __init__(self, node: str, *, settings: CloudSettings, initial_state: dict[str, np.ndarray],
                 schemas: SchemaSource, run_ids: Callable[[], str], roles: Roles,
                 restored: dict[str, Any] | None = None) -> None:
        self.node = node
        self.roles = roles  # who is an edge, and which devices may use which edges: configuration, not statuses
        self.config = settings  # the config file's settings: new-run starts from these
        self.initial_state = initial_state
        self.schemas = schemas
        self.run_ids = run_ids
        self.settings = settings if settings.run else _with_run(settings, run_ids())
        self.global_state = {k: np.array(v) for k, v in initial_state.items()}
        self.state = NodeState.RUNNING if settings.autostart else NodeState.IDLE
        self.history: list[dict[str, Any]] = []
        self.fleet: dict[str, Presence] = {}
        self.last_seen: dict[str, float] = {}
        self.joined: dict[str, tuple[int, int]] = {}  # device -> (boot, samples it declared when it came online)
        self.refused_claims: dict[str, tuple[int, str]] = {}  # node -> (boot, claim) already reported
        self.elapsed0 = 0.0  # run time before this process (restored)
        self.run_started = 0.0
        self.resumed = False
        self.notes: list[tuple[str, dict[str, Any]]] = []  # what the restore decided, said at start
        self._committing: tuple[dict[str, Any], Callable[[], None] | None] | None = None  # awaiting evaluation
        self.fed_eval: fedeval.FederatedEval | None = None
        self.runs: dict[str, dict[str, Any]] = {}  # every run's summary, this one's included
        self.best: dict[str, Any] | None = None  # this run's best round: round, metric, value
        self.begun = False  # round 0 of this run has started (it no longer waits for wait_for)
        self._enough_since: float | None = None  # when min_devices were first online (start_grace_s)
        self._waiting: list[str] | None = None  # the devices round 0 waits for, as last announced
        self._refusals: set[tuple[str, str, str]] = set()  # (node, run, reason) already reported
        self.chain_overrides: dict[str, tuple[str, ...]] = {}  # device -> helpers, set by the chain command
        self._helpers: frozenset[str] | None = None  # helper_nodes(), until chain_overrides changes
        self.cut_planner = CutPlanner()  # devices' and edges' profiles (split-point planning)
        self._unknown_classes: set[tuple[str, str]] = set()  # (device, class) reported as not configured
        self._eligible: dict[str, Presence] = {}  # eligible(), maintained per status
        self._eligible_run: str | None = None  # the run _eligible was built for (None: rebuild)
        self.eligible_version = 0  # bumped when a device becomes eligible or not, or changes edge
        self._fx: list[Effect] = []
        saved_policy: dict[str, Any] | None = None
        if restored:
            saved_policy = self._restore(restored)
        self.schema = schemas(self.settings.training.model_ref)
        self.policy: Policy = self._make_policy(saved_policy)

    # ------------------------------------------------------------------ construction and persistence
    def _make_policy(self, saved: dict[str, Any] | None) -> Policy:
        cls: Any = SyncRounds if self.settings.mode == "sync" else AsyncGroups
        return cls(self, saved)

    def _restore(self, saved: dict[str, Any]) -> dict[str, Any] | None:
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"cloud state format {saved.get('format')} not supported (this cloud reads "
                             f"{STATE_FORMAT}); move the state directory away to start afresh")
        run_settings = CloudSettings().with_values(saved["settings"])
        self.runs = {str(k): dict(v) for k, v in saved.get("runs", {}).items()}
        self.chain_overrides = {str(d): tuple(str(h) for h in hs) for d, hs in saved.get("chains", {}).items()}
        if self.config.run and self.config.run != run_settings.run:
            self.notes.append(("new_run_from_config", {"previous": run_settings.run, "run": self.config.run}))
            return None  # the config names another run: start it afresh
        schema = self.schemas(run_settings.training.model_ref)
        self.global_state = check_state(saved["global"], schema.specs(), "persisted global model")
        self.settings = run_settings
        self.state = NodeState(saved.get("state", self.state))
        self.history = list(saved.get("history", []))
        self.elapsed0 = float(saved.get("elapsed", 0.0))
        self.best = self.runs.get(run_settings.run, {}).get("best")
        self.resumed = True
        differs = {k: [v, self.config.flat().get(k)] for k, v in run_settings.flat().items()
                   if k != "run" and self.config.flat().get(k) != v}
        if differs:
            self.notes.append(("settings_from_run", {"run": run_settings.run, "differs": differs,
                                                     "hint": "the run's settings win; 'new-run' applies the config"}))
        return saved.get("policy")

    def persist(self, now: float) -> None:
        self.runs[self.settings.run] = self.summary()
        self._do(Persist({
            "format": STATE_FORMAT, "run": self.settings.run, "round": self.policy.completed,
            "settings": self.settings.flat(), "global": self.global_state,
            "state": str(self.state), "history": self.history, "elapsed": self.elapsed(now),
            "policy": self.policy.state_dict(now), "runs": self.runs,
            "chains": {d: list(hs) for d, hs in self.chain_overrides.items()},
        }))

    def summary(self) -> dict[str, Any]:
        """This run as ``runs`` lists it."""
        last = self.history[-1] if self.history else {}
        t = self.settings.training
        return {"run": self.settings.run, "state": str(self.state), "completed": self.policy.completed,
                "rounds": self.settings.rounds if self.settings.mode == "sync" else self.settings.max_versions,
                "mode": self.settings.mode, "model": t.model, "loss": t.loss, "fingerprint": self.schema.fingerprint,
                "accuracy": last.get("accuracy"), "test_loss": last.get("loss"), "best": self.best}

    def elapsed(self, now: float) -> float:
        return self.elapsed0 + max(0.0, now - self.run_started)

    # ------------------------------------------------------------------ interface
    def presence(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> dict[str, Any]:
        return {}

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(COMMANDS)

    def status_fields(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"run": self.settings.run, "state": str(self.state), "round": self.policy.completed,
                "rounds": self.settings.rounds, "accuracy": last.get("accuracy"), "in_round": self.policy.busy(),
                **self.policy.status()}

    def handle(self, ev: Event, now: float) -> list[Effect]:
        self._fx = []
        if isinstance(ev, StatusSeen):
            self._on_status(ev.presence, now)
        elif isinstance(ev, Received):
            if isinstance(ev.msg, EdgeUpdate):
                self.policy.on_update(ev, ev.msg, now)
            elif isinstance(ev.msg, Restart):
                self.policy.on_restart(ev, ev.msg, now)
            elif isinstance(ev.msg, EvalReport):
                fx, why = fedeval.on_report(self.fed_eval, ev, ev.msg)
                self._do(*fx)
                if why is not None:
                    self.drop("wrong_round", why, ev.src)
            elif isinstance(ev.msg, EdgeProfile):
                self._on_profile(ev.src, ev.msg)
            else:
                self.drop("unexpected", f"{ev.msg.kind}/{ev.msg.op} is not for the cloud", ev.src)
        elif isinstance(ev, JobDone):
            self._on_job(ev, now)
        elif isinstance(ev, Command):
            self._on_command(ev, now)
        elif isinstance(ev, Started):
            self.run_started = now
            self.publish_status()
            for name, fields in self.notes:
                self._do(Emit(name, "warning", fields), Log("warning", name, fields))
            if self.resumed:
                self._do(Emit("resumed", fields={"run": self.settings.run, "round": self.policy.completed}),
                         Log("info", "resumed", {"run": self.settings.run, "round": self.policy.completed,
                                                 "state": str(self.state)}))
        elif isinstance(ev, TimerFired):
            pass  # deadlines: progress below looks at them
        if self.fed_eval is not None and self.fed_eval.done(now):
            self._close_fed_eval(now)
        if self._committing is None and self.fed_eval is None:
            self.policy.progress(now)
        fx, self._fx = self._fx, []
        return fx

    # ------------------------------------------------------------------ services for the policies
    def do(self, *effects: Effect) -> None:
        self._fx.extend(effects)

    _do = do

    def drop(self, reason: str, detail: str, src: str = "") -> None:
        self._do(Drop(reason, detail, src))

    @property
    def running(self) -> bool:
        return self.state == NodeState.RUNNING

    @property
    def committing(self) -> bool:
        return self._committing is not None

    def role_of(self, node: str) -> str | None:
        """What ``node`` is by configuration ("Trust"): an edge only if ``[cloud] edges`` says so; a device if
        the devices table lists it, or (open enrolment, no table) if it says so and is no configured edge."""
        if self.roles.is_edge(node):
            return "edge"
        helper = node in self.helper_nodes()
        if self.roles.devices:
            return "device" if node in self.roles.devices else "helper" if helper else None
        p = self.fleet.get(node)
        if helper and (p is None or not p.samples):
            return "helper"  # a device agent that only serves others' pipelines
        return "device" if p is not None and p.role == "device" else None

    # ------------------------------------------------------------------ pipelines
    def chain_of(self, device: str) -> tuple[str, ...]:
        """The helpers ``device`` may pipeline across: the chain command's, else ``[cloud] chains``."""
        return self.chain_overrides.get(device, self.roles.chains.get(device, ()))

    def helper_nodes(self) -> frozenset[str]:
        """Every node some device's chain names; asked on every status, so kept until a chain changes."""
        if self._helpers is None:
            self._helpers = frozenset(h for d in {*self.roles.chains, *self.chain_overrides} for h in self.chain_of(d))
        return self._helpers

    def helpers_online(self, device: str) -> tuple[str, ...]:
        run = self.settings.run
        return tuple(h for h in self.chain_of(device)
                     if (p := self.fleet.get(h)) is not None and p.online and not p.refuses(run))

    def chains_for(self, devices: list[str]) -> dict[str, tuple[str, ...]]:
        return {d: hs for d in devices if (hs := self.helpers_online(d))}

    def _tell_chain(self, device: str) -> None:
        p = self.fleet.get(device)
        if p is not None and p.online:
            self._do(SendCommand(device, "chain", {"helpers": list(self.helpers_online(device))}))

    def online(self, role: str) -> dict[str, Presence]:
        return {n: p for n, p in self.fleet.items() if p.online and self.role_of(n) == role}

    def eligible(self) -> Mapping[str, Presence]:
        """Online devices attached to an online edge they may use, with a usable sample count, unless either
        refused this run (another model, unfit data). Kept up to date per status (``_note_eligible``), so that a
        fleet of thousands coming online costs O(1) per status, not a scan of the fleet each; a read-only view
        (no copy: the policies look at it after every event), which a caller copies to keep."""
        if self._eligible_run != self.settings.run:
            run = self.settings.run
            edges = {e for e, p in self.online("edge").items() if not p.refuses(run)}
            self._eligible = {d: p for d, p in self.online("device").items() if self._fits(d, p, edges)}
            self.eligible_version += 1
            self._eligible_run = run
        return MappingProxyType(self._eligible)

    def _fits(self, device: str, p: Presence, edges: set[str]) -> bool:
        run = self.settings.run
        return (p.edge in edges and self.roles.may_use(device, p.edge) and self.declared(device) > 0
                and not p.refuses(run))

    def _note_eligible(self, node: str) -> None:
        """After ``node``'s status changed: update the eligible devices (an edge's change: all of them, lazily)."""
        if self._eligible_run != self.settings.run:
            return  # rebuilt on the next eligible()
        role = self.role_of(node)
        if role == "edge":
            self._eligible_run = None
            self.eligible_version += 1
            return
        before = self._eligible.pop(node, None)
        p = self.fleet.get(node)
        if role == "device" and p is not None and p.online and p.edge is not None:
            edge = self.fleet.get(p.edge)
            if edge is not None and edge.online and self.role_of(p.edge) == "edge" \
                    and not edge.refuses(self.settings.run) and self._fits(node, p, {p.edge}):
                self._eligible[node] = p
        after = self._eligible.get(node)
        if (before is None) != (after is None) or (before is not None and after is not None
                                                   and before.edge != after.edge):
            self.eligible_version += 1

    def may_begin(self, devices: Mapping[str, Presence], now: float) -> bool:
        """Whether the first round of the run may start with these eligible devices: at least ``min_devices``,
        and every device ``wait_for`` names, or else ``start_grace_s`` passed since ``min_devices`` were there.
        Without ``wait_for``, a grace period lets more devices join before round 0."""
        s = self.settings
        if len(devices) < s.min_devices:
            self._enough_since = None
            return False
        if self.begun:
            return True
        if self._enough_since is None:
            self._enough_since = now
        missing = sorted(d for d in set(s.wait_for) if d not in devices)  # O(wait_for), not O(fleet): per event
        grace_over = s.start_grace_s > 0 and now >= self._enough_since + s.start_grace_s
        if (s.wait_for and not missing) or (not s.wait_for and s.start_grace_s == 0) or grace_over:
            self.begun = True
            if missing:
                self._do(Emit("starting_without", "warning", {"run": s.run, "devices": missing}))
            return True
        if s.start_grace_s > 0:
            self._do(SetTimer(("grace", s.run), self._enough_since + s.start_grace_s))
        if missing != self._waiting:
            self._waiting = missing
            self._do(Emit("waiting_for_devices", fields={
                "run": s.run, "missing": missing, "online": sorted(devices),
                "until": None if s.start_grace_s == 0 else round(self._enough_since + s.start_grace_s - now, 3)}))
        return False

    def is_edge(self, node: str) -> bool:
        return self.roles.is_edge(node)

    def may_use(self, device: str, edge: str) -> bool:
        return self.roles.may_use(device, edge)

    def declared(self, device: str) -> int:
        """The sample count the device declared when it came online (this boot); 0 when unusable."""
        joined = self.joined.get(device)
        return joined[1] if joined is not None else 0

    def local_for(self, device: str) -> LocalModel | None:
        """What a device's class trains (None: the whole model in fp32, no cutoff): ``[cloud.classes]`` by the
        class in the device's status. A device with helpers online trains the whole model across its pipeline
        (a partial or compressed model cannot be laid out over stages): its chain wins over its class."""
        if self.helpers_online(device):
            return None
        p = self.fleet.get(device)
        name = (p.klass if p is not None else None) or DEFAULT_CLASS
        c = self.settings.classes.get(name)
        if c is None:
            if name != DEFAULT_CLASS and (device, name) not in self._unknown_classes:
                self._unknown_classes.add((device, name))
                self._do(Emit("unknown_class", "warning", {"device": device, "class": name,
                                                           "action": "trains the whole model"}))
            return None
        return None if c.plain else c.local()

    def class_of(self, device: str) -> str:
        p = self.fleet.get(device)
        return (p.klass if p is not None else None) or DEFAULT_CLASS

    def cut_for(self, device: str) -> int:
        local = self.local_for(device)
        if local is not None and local.local_only:
            return self.schema.n_blocks  # a class's compressed or partial model trains locally
        p = self.fleet.get(device)
        cut = p.cut if p is not None else None
        if cut is not None and 1 <= cut <= self.schema.n_blocks:
            return cut
        configured = self.settings.cut
        return configured if 1 <= configured <= self.schema.n_blocks else self.schema.default_cut

    def plan(self, round: int, attempt: int, **changes: Any) -> Plan:
        """The plan of a round: the run's training settings, the schedule's learning rate at this point of the
        run (rounds or versions completed), and the model's fingerprint that every node checks its own against."""
        t = self.settings.training
        horizon = self.settings.rounds if self.settings.mode == "sync" else self.settings.max_versions
        changes = {"lr": round_lr(t, self.policy.completed, horizon), "fingerprint": self.schema.fingerprint,
                   **changes}
        return Plan.of(t, run=self.settings.run, round=round, attempt=attempt, **changes)

    def encodings_for(self, device: str) -> dict[str, str]:
        """A device's own tensor encodings (its status says them), over the plan's."""
        p = self.fleet.get(device)
        return dict(p.encodings) if p is not None else {}

    def announce(self, plan: Plan, by_edge: dict[str, list[str]], tag: RoundTag | None = None,
                 partial: dict[str, list[str]] | None = None, cuts: dict[str, int] | None = None) -> None:
        """Open the round at each edge with its devices, their cuts (planned, or each device's configured one),
        class models, encodings and declared sample counts, and the global model (only the layers in
        ``partial[edge]`` for an edge that keeps a copy of the rest: FedLAMA)."""
        for edge, devs in by_edge.items():
            keys = (partial or {}).get(edge)
            state = self.global_state if keys is None else {k: self.global_state[k] for k in keys}
            encodings = {d: e for d in devs if (e := self.encodings_for(d))}
            locals_ = {d: m for d in devs if (m := self.local_for(d)) is not None}
            self._do(Send(edge, OpenRound(run=plan.run, round=plan.round, plan=plan, tag=tag,
                                          cuts={d: (cuts or {}).get(d) or self.cut_for(d) for d in devs},
                                          state=state, samples={d: self.declared(d) for d in devs},
                                          encodings=encodings, partial=keys is not None,
                                          schema=self.schema.describe(), locals=locals_,
                                          chains=self.chains_for(devs)),
                          encoding=plan.model_encoding))

    def _on_profile(self, src: str, msg: EdgeProfile) -> None:
        """A device's or an edge's profile for split-point planning, from a node in that role."""
        role = self.role_of(src)
        if role != ("device" if isinstance(msg, DeviceProfile) else "edge"):
            self.drop("unexpected", f"{msg.op} profile from {src}, which is {role or 'nothing'} here", src)
            return
        why = self.cut_planner.on_profile(src, msg, self.schema)
        if why is not None:
            self.drop("bad_profile", why, src)

    def plan_cuts(self, plan: Plan, by_edge: dict[str, list[str]]) -> tuple[dict[str, int], dict[str, Any]]:
        """Each device's cut for this round from the latest profiles (``[cloud] plan_cuts``), with the report
        for ``metrics``."""
        devices = [d for ds in by_edge.values() for d in ds]
        fixed = {d for d in devices if (p := self.fleet.get(d)) is not None and p.cut is not None}
        fixed |= set(self.chains_for(devices))  # a pipelined device's blocks are laid out by its pipeline
        local_only = {d for d in devices if (m := self.local_for(d)) is not None and m.local_only}
        return self.cut_planner.plan(plan, by_edge, self.schema, {d: self.cut_for(d) for d in devices}, fixed,
                                     local_only, {d: self.declared(d) for d in devices},
                                     {d: self.encodings_for(d) for d in devices})

    def check_update(self, src: str, msg: EdgeUpdate, r: CloudRound | None, keys: list[str] | None = None
                     ) -> dict[str, np.ndarray] | None:
        """The update's delta (None when it carries no samples), checked before anything of it is used: from a
        configured edge; reports only for devices of the round (``r``; None: a late update of a closed round,
        checked against what the devices declared) that this edge may report, with at most the samples each
        declared; the delta (or each device's, when the edge forwarded them) against the model: exactly
        ``keys`` (all of the model's by default), its shapes, finite values and, when ``max_update_norm`` is
        set, a norm within that many times the global model's. ProtocolError names what is wrong."""
        if not self.is_edge(src):
            raise ProtocolError("not_an_edge", f"{src} is not a configured edge ([cloud] edges)")
        for d, rep in msg.reports.items():
            if r is not None and not r.may_report(d, src, self.fleet.get(d)):
                raise ProtocolError("not_in_round", f"{src} reports {d}, which is not in this round at {src}")
            if not self.roles.may_use(d, src):
                raise ProtocolError("not_in_round", f"{d} may not train through {src}")
            cap = r.declared.get(d, 0) if r is not None and r.declared else self.declared(d)
            if rep.samples > cap:
                raise ProtocolError("implausible_samples", f"{src} reports {rep.samples} samples for {d}, which "
                                                           f"declared {cap}")
        if msg.samples <= 0:
            return None
        specs = self.schema.specs()
        if keys is not None:
            specs = {k: specs[k] for k in keys}
        bound = self.settings.training.max_update_norm
        checked: dict[str, np.ndarray] = {}
        # Devices that trained part of the model (docs/algorithms.md, "Heterogeneous devices") send part of the
        # keys, or masked keys; an edge's mean of them says which samples stand behind each entry.
        partial = any(not m.plain for m in self.settings.classes.values())
        for k, c in msg.coverage.items():
            if not partial or k not in specs or (c.shape != () and c.shape != specs[k].shape) or \
                    not np.isfinite(c).all() or c.min(initial=0.0) < 0 or c.max(initial=0.0) > msg.samples + 0.5:
                raise ProtocolError("bad_field", f"coverage of {k!r} from {src} does not fit the key or its samples")
        for who, part in (msg.deltas or {src: msg.delta}).items():
            if msg.masks.get(who):
                part, _ = expand(part, msg.masks[who], specs, f"delta of {who}")
            want = specs if not partial else {k: specs[k] for k in part if k in specs}
            checked = check_state(part, want, f"delta of {who}")
            if bound > 0:
                norm, ref = state_norm(checked), state_norm({k: self.global_state[k] for k in checked})
                if not norm <= bound * max(ref, 1e-12):
                    raise ProtocolError("implausible_update", f"delta of {who} has norm {norm:.4g}, more than "
                                                              f"{bound:g} x the global model's {ref:.4g}")
        return checked

    def commit(self, new_state: dict[str, np.ndarray], entry: dict[str, Any], now: float,
               then: Callable[[], None] | None = None) -> None:
        """Adopt a new global model: evaluate it, record the entry with its accuracy, persist, publish."""
        self.global_state = new_state
        entry["closed_at"] = now
        self._committing = (entry, then)
        t = self.settings.training
        self._do(Run(stage.Evaluate("eval", t.model_ref, self.global_state, t.loss)))

    def _on_job(self, ev: JobDone, now: float) -> None:
        if not isinstance(ev.job, stage.Evaluate) or self._committing is None:
            return
        entry, then = self._committing
        self._committing = None
        # T_global (heterogeneous-IoT cost model): from closing the round to the evaluated new model.
        t_global = round(max(0.0, now - entry.pop("closed_at", now)), 4)
        for costs in entry.get("devices", {}).values():
            costs["T_global"] = t_global
        if entry.get("devices"):
            entry["classes"] = class_costs(entry["devices"], self.settings.classes)
        res: stage.EvalResult | None = ev.result if ev.error is None else None
        if ev.error is not None:
            self._do(Emit("evaluation_failed", "error", {"error": ev.error[:300]}))
        # A diverged model evaluates to an infinite loss: reported as null (JSON has no infinity, and metrics
        # that fail to encode would be lost).
        entry["accuracy"] = _finite(None if res is None else res.accuracy)
        entry["loss"] = _finite(None if res is None else res.loss)
        for name, value in (res.metrics if res is not None else {}).items():
            entry.setdefault(name, _finite(value))  # the task's other metrics: mse, mae, exact_match
        entry["wall_s"] = round(self.elapsed(now), 3)
        # The run log has the whole record; memory, the persisted state and large rounds' metrics a bounded one.
        self.history.append(record.bounded(entry))
        del self.history[:-HISTORY]
        self._keep_model(entry)
        self.persist(now)  # on disk before anyone hears of it
        self._do(RunLog(entry), Metrics(record.for_metrics(entry, self.settings.metrics_devices)))
        self.publish_status(accuracy=entry["accuracy"])
        self._do(Log("info", f"{entry['kind']} done", {k: entry.get(k) for k in
                                                        ("round", "version", "accuracy", "loss", "participants")}))
        if then is not None:
            then()
        s = self.settings
        if s.mode == "sync" and entry.get("kind") == "round" and fedeval.due(entry["round"], s.fed_eval_every,
                                                                              s.rounds):
            self._open_fed_eval(int(entry["round"]), now)

    def _keep_model(self, entry: dict[str, Any]) -> None:
        """Hand the new global model to the runtime to keep, marked when it is the run's best so far."""
        t = self.settings.training
        metric, higher = BEST_METRIC[t.task]
        value = entry.get(metric)
        index = int(entry["version"] if entry.get("kind") == "version" else entry["round"])
        best = value is not None and (self.best is None or (value > self.best["value"] if higher
                                                            else value < self.best["value"]))
        if best:
            self.best = {"round": index, "metric": metric, "value": value}
        info = {"model": t.model, "input_shape": list(t.input_shape), "num_classes": t.num_classes, "loss": t.loss,
                "task": t.task, "fingerprint": self.schema.fingerprint, "kind": entry.get("kind"),
                "metrics": {k: entry[k] for k in ("accuracy", "loss", "mse", "mae", "exact_match")
                            if entry.get(k) is not None}}
        self._do(SaveModel(self.settings.run, index, self.global_state, info, best=best))

    # ------------------------------------------------------------------ federated evaluation
    def _open_fed_eval(self, round: int, now: float) -> None:
        devices = {d: p for d, p in self.eligible().items() if p.eval_samples}
        if not devices:
            self._do(Emit("evaluation_skipped", "warning", {"run": self.settings.run, "round": round,
                                                             "reason": "no online device has eval_data"}))
            return
        self.fed_eval, effects = fedeval.open_eval(self.plan(round, 0), devices, self.global_state,
                                                   self.schema.describe(), now)
        self._do(*effects)

    def _close_fed_eval(self, now: float) -> None:
        ev, self.fed_eval = self.fed_eval, None
        assert ev is not None
        if not ev.reports:
            self._do(Emit("evaluation_failed", "warning", {"run": ev.plan.run, "round": ev.plan.round,
                                                            "reason": "no device reported",
                                                            "missing": sorted(ev.expected)}))
            return
        entry = fedeval.close(ev, now)
        for h in self.history:
            if h.get("kind") == "round" and h.get("run") == ev.plan.run and h.get("round") == ev.plan.round:
                h["federated"] = {k: v for k, v in entry.items() if k not in ("kind", "run", "round", "devices")}
        self.persist(now)
        self._do(*fedeval.publish(entry))

    def publish_status(self, **fields: Any) -> None:
        self._do(SetStatus(self.state, {"run": self.settings.run, "round": self.policy.completed, **fields,
                                        **self.policy.status_fields()}))

    def complete(self, now: float, **fields: Any) -> None:
        self.state = NodeState.DONE
        self.persist(now)
        last = self.history[-1] if self.history else {}
        self.publish_status(accuracy=last.get("accuracy"))
        info = {"run": self.settings.run, "rounds": self.policy.completed, "accuracy": last.get("accuracy"),
                "wall_s": round(self.elapsed(now), 2), **fields}
        self._do(Emit("run_complete", fields=info), Log("info", "run complete", info))

    def fail(self, now: float, reason: str, **fields: Any) -> None:
        self.state = NodeState.FAILED
        self.persist(now)
        self.publish_status()
        info = {"run": self.settings.run, "round": self.policy.completed, "reason": reason, **fields}
        self._do(Emit("run_failed", "error", info), Log("error", "run failed", info))

    # ------------------------------------------------------------------ fleet
    def _on_status(self, p: Presence, now: float) -> None:
        was = self.fleet.get(p.node)
        self.fleet[p.node] = p
        self.last_seen[p.node] = now
        run = self.settings.run
        if p.refuses(run) and (p.node, run, str(p.refused)) not in self._refusals:
            self._refusals.add((p.node, run, str(p.refused)))
            info = {"refusing": p.node, "as": p.role, "run": run, "reason": p.refused, "fingerprint": p.fingerprint,
                    "expected": self.schema.fingerprint, "action": "left out of the run"}
            self._do(Emit("node_refused", "warning", info), Log("warning", "node refused the run", info))
            if self.fed_eval is not None:  # nor will it evaluate
                behind = [p.node] if p.role == "device" else [d for d, e in self.fed_eval.expected.items()
                                                               if e == p.node]
                for d in behind:
                    self.fed_eval.expected.pop(d, None)
        role = self.role_of(p.node)
        if (was is None or was.online != p.online) and p.node in self.helper_nodes():
            # A helper came or went: the devices whose chain names it re-plan their pipelines.
            for d in sorted(d for d in {*self.roles.chains, *self.chain_overrides} if p.node in self.chain_of(d)):
                self._tell_chain(d)
        if p.role != (role or "") and p.online and not (role == "helper" and p.role == "device"):
            self._refuse_claim(p, f"role {p.role or '(none)'}", f"says it is {p.role or 'nothing'}, configured as "
                                                                 f"{role or 'nothing'}")
        if role == "device" and p.online:
            self._join(p)
            if p.edge is not None and not self.roles.may_use(p.node, p.edge):
                self._refuse_claim(p, f"edge {p.edge}", f"attached to {p.edge}, which it may not use")
        self._note_eligible(p.node)
        if role is not None:  # policies hear of configured (or enrolled) nodes only, in their authorised role
            self.policy.on_status(replace(p, role=role), was)

    def _join(self, p: Presence) -> None:
        """A device's sample count is the one it declared when it came online (docs/design.md, "Trust")."""
        joined = self.joined.get(p.node)
        if joined is not None and joined[0] == p.boot:
            if p.samples != joined[1]:
                self._refuse_claim(p, f"samples {p.samples}", f"now says {p.samples} samples, declared "
                                                              f"{joined[1]} when it joined")
            return
        samples = p.samples or 0
        cap = self.settings.max_samples
        if cap and samples > cap:
            self._refuse_claim(p, f"samples {samples}", f"declares {samples} samples, more than max_samples {cap}")
            samples = 0
        self.joined[p.node] = (p.boot, samples)

    def _refuse_claim(self, p: Presence, claim: str, detail: str) -> None:
        """Report once per boot and claim what a status says that the configuration does not allow."""
        if self.refused_claims.get(p.node) == (p.boot, claim):
            return
        self.refused_claims[p.node] = (p.boot, claim)
        self._do(Emit("role_refused", "warning", {"sender": p.node, "claim": claim, "detail": detail}),
                 Count("role_refused"), Log("warning", "status claim refused", {"node": p.node, "detail": detail}))

    # ------------------------------------------------------------------ commands
    def _on_command(self, ev: Command, now: float) -> None:
        handler = COMMANDS.get(ev.cmd)
        try:
            if handler is None:
                raise CommandError(f"unknown command {ev.cmd!r}; known: {sorted(COMMANDS)}", "unknown_command")
            result = handler(self, ev.args, now)
        except CommandError as e:
            self._do(Reply(ev, False, error=str(e), code=e.code))
            return
        self._do(Reply(ev, True, result))

    def _state_reply(self) -> dict[str, Any]:
        return {"state": str(self.state), "round": self.policy.completed, "run": self.settings.run}

    def cmd_start(self, args: dict[str, Any], now: float) -> Any:
        if self.state == NodeState.RUNNING:
            raise CommandError("a run is already in progress", "busy")
        if args:
            self.cmd_set(args, now)
        if self.state in (NodeState.DONE, NodeState.FAILED, NodeState.STOPPED) and self.finished():
            raise CommandError(f"run {self.settings.run} finished its {self.settings.rounds} rounds; "
                               "raise 'rounds' to continue, or start a new run with 'new-run'", "finished")
        self.state = NodeState.RUNNING
        self.policy.on_start()
        self.persist(now)
        self.publish_status()
        return self._state_reply()

    def finished(self) -> bool:
        limit = self.settings.rounds if self.settings.mode == "sync" else self.settings.max_versions
        return self.policy.completed >= limit

    def cmd_stop(self, args: dict[str, Any], now: float) -> Any:
        self.policy.on_stop()  # the round in progress is abandoned; late deltas are acknowledged and dropped
        self.fed_eval = None
        self.state = NodeState.STOPPED
        self.persist(now)
        self.publish_status()
        return self._state_reply()

    def cmd_pause(self, args: dict[str, Any], now: float) -> Any:
        if self.state != NodeState.RUNNING:
            raise CommandError(f"cannot pause in state {self.state}", "bad_state")
        self.state = NodeState.PAUSED  # the round in progress completes; no new round starts
        self.persist(now)
        self.publish_status()
        return self._state_reply()

    def cmd_resume(self, args: dict[str, Any], now: float) -> Any:
        if self.state != NodeState.PAUSED:
            raise CommandError(f"cannot resume in state {self.state}", "bad_state")
        self.state = NodeState.RUNNING
        self.persist(now)
        self.publish_status()
        return self._state_reply()

    def cmd_set(self, args: dict[str, Any], now: float) -> Any:
        unknown = set(args) - set(SETTABLE)
        if unknown:
            raise CommandError(f"unknown parameter(s) {sorted(unknown)}; settable: {sorted(SETTABLE)}")
        checked = {k: arg(args, k, SETTABLE[k][0], check=SETTABLE[k][1]) for k in args}
        self.settings = self.settings.with_values(checked)
        self.persist(now)
        flat = self.settings.flat()
        return {k: flat[k] for k in checked}

    def cmd_new_run(self, args: dict[str, Any], now: float) -> Any:
        """Start a new run from the config file's settings (and the model's initial weights)."""
        run = arg(args, "run", str, default="") or self.run_ids()
        check_id(run, "run")
        if run == self.settings.run:
            raise CommandError(f"run {run!r} is the current run; choose another id", "bad_request")
        previous = self.settings.run
        self.policy.on_stop()
        self.fed_eval = None
        self.runs[previous] = self.summary()
        self.settings = _with_run(self.config, run)
        self.schema = self.schemas(self.settings.training.model_ref)
        self.global_state = {k: np.array(v) for k, v in self.initial_state.items()}
        self.history = []
        self.best, self.begun, self._enough_since, self._waiting = None, False, None, None
        self.elapsed0, self.run_started = 0.0, now
        self.policy = self._make_policy(None)
        self.state = NodeState.RUNNING if self.settings.autostart else NodeState.IDLE
        self.persist(now)
        self.publish_status()
        self._do(Emit("new_run", fields={"run": run, "previous": previous}))
        return {**self._state_reply(), "previous": previous}

    def cmd_fleet(self, args: dict[str, Any], now: float) -> Any:
        return {n: {**asdict(p), "authorised": self.role_of(n), "declared_samples": self.joined.get(n, (0, None))[1],
                    "seen_s_ago": round(now - self.last_seen.get(n, now), 1)}
                for n, p in sorted(self.fleet.items())}

    def cmd_history(self, args: dict[str, Any], now: float) -> Any:
        last = arg(args, "last", int, default=20, check=lambda v: v >= 1)
        return self.history[-last:]

    def cmd_runs(self, args: dict[str, Any], now: float) -> Any:
        """Every run this cloud trained, oldest first, with its state, rounds and best round."""
        self.runs[self.settings.run] = self.summary()
        return {"current": self.settings.run, "runs": list(self.runs.values())}

    def cmd_chain(self, args: dict[str, Any], now: float) -> Any:
        """Set (``helpers``: a list or "h1,h2"; empty: no pipeline) or ``reset`` (back to ``[cloud] chains``) a
        device's helpers; persisted, and told to the device at once. Without a device: every chain."""
        if "device" not in args:
            devices = sorted({*self.roles.chains, *self.chain_overrides})
            return {d: {"helpers": list(self.chain_of(d)), "online": list(self.helpers_online(d)),
                        "set_by": "ctl" if d in self.chain_overrides else "config"} for d in devices}
        device = check_id(arg(args, "device", str), "device")
        if arg(args, "reset", bool, default=False):
            self.chain_overrides.pop(device, None)
            self._helpers = None
        else:
            raw = arg(args, "helpers", (list, str))
            names = [h.strip() for h in raw.split(",")] if isinstance(raw, str) else raw
            helpers = tuple(check_id(h, "helper") for h in names if isinstance(h, str) and h)
            if len(helpers) != len([h for h in names if h]) or device in helpers or len(set(helpers)) != len(helpers) \
                    or any(self.roles.is_edge(h) for h in helpers):
                raise CommandError("helpers must be node ids other than the device and the edges, each once")
            self.chain_overrides[device] = helpers
            self._helpers = None
        self.persist(now)
        self._tell_chain(device)
        return {"device": device, "helpers": list(self.chain_of(device)), "online": list(self.helpers_online(device))}

    def cmd_move(self, args: dict[str, Any], now: float) -> Any:
        """Ask a device to move to another edge; the device answers the cloud, we answer the operator."""
        device = check_id(arg(args, "device", str), "device")
        edge = check_id(arg(args, "edge", str), "edge")
        path = arg(args, "path", str, default="direct", check=lambda v: v in set(MovePath))
        at_step = arg(args, "at_step", int, default=0, check=lambda v: v >= 0)
        if device not in self.fleet or self.role_of(device) != "device":
            raise CommandError(f"unknown device {device!r}", "unknown_node")
        if not self.roles.may_use(device, edge):
            raise CommandError(f"{edge!r} is not an edge {device} may use ([cloud] edges, devices)", "unknown_node")
        self._do(SendCommand(device, "move", {"edge": edge, "path": path, "at_step": at_step}))
        return {"forwarded": True, "device": device, "edge": edge, "path": path}


COMMANDS: dict[str, Callable[[CloudMachine, dict[str, Any], float], Any]] = {
    "start": CloudMachine.cmd_start, "stop": CloudMachine.cmd_stop, "pause": CloudMachine.cmd_pause,
    "resume": CloudMachine.cmd_resume, "set": CloudMachine.cmd_set, "new-run": CloudMachine.cmd_new_run,
    "fleet": CloudMachine.cmd_fleet, "history": CloudMachine.cmd_history, "move": CloudMachine.cmd_move,
    "runs": CloudMachine.cmd_runs, "chain": CloudMachine.cmd_chain,
}


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 5)


def _with_run(s: CloudSettings, run: str) -> CloudSettings:
    return replace(s, run=run)
