"""The cloud's protocol machine: the global model, the run, the fleet view, and one round policy.

Theory of operation (docs/design.md, "Cloud"). The machine keeps what every run has: the global model and
the run's settings, the fleet as the nodes' retained statuses tell it, the history of completed rounds
(or versions), persistence, and the operators' commands. *How* rounds happen is a policy:
:class:`~mqttfl.protocol.cloud.sync.SyncRounds` (FedAvg rounds with deadline, quorum and retries) or
:class:`~mqttfl.protocol.cloud.groups.AsyncGroups` (group rounds mixed into global versions). Both drive
the same :class:`~mqttfl.protocol.cloud.rounds.CloudRound` bookkeeping and end in the same
:meth:`CloudMachine.commit`: the new global model is evaluated (a ``stage.Evaluate`` job), recorded,
persisted, and published as metrics, before the next round may start.

Run states: idle -> running <-> paused; running -> done | failed; any -> stopped; ``start`` and ``new-run``
leave done, failed and stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from mqttfl.protocol import stage
from mqttfl.protocol.cloud.context import Policy
from mqttfl.protocol.cloud.groups import AsyncGroups
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.protocol.cloud.sync import SyncRounds
from mqttfl.protocol.control import arg, check_id
from mqttfl.protocol.events import (
    Command,
    CommandError,
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
    Send,
    SendCommand,
    SetStatus,
    Started,
    StatusSeen,
    TimerFired,
)
from mqttfl.protocol.messages import EdgeUpdate, MovePath, OpenRound, Restart, RoundTag
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import ModelRef, ModelSchema, check_state
from mqttfl.protocol.status import NodeState, Presence
from mqttfl.wire.encoding import ALLOWED as ENCODINGS_ALLOWED

STATE_FORMAT = 2
HISTORY = 1000  # rounds kept in memory; the run log keeps everything

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
    # Tensor encodings per kind (docs/algorithms.md, "Compression"): from the next round on.
    **{f"{kind}_encoding": (str, ENCODINGS_ALLOWED[kind].__contains__) for kind in ENCODINGS_ALLOWED},
    "topk_ratio": ((int, float), lambda v: 0 < v <= 1),
}

SchemaSource = Callable[[ModelRef], ModelSchema]


class CloudMachine:
    def __init__(self, node: str, *, settings: CloudSettings, initial_state: dict[str, np.ndarray],
                 schemas: SchemaSource, run_ids: Callable[[], str], restored: dict[str, Any] | None = None) -> None:
        self.node = node
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
        self.elapsed0 = 0.0  # run time before this process (restored)
        self.run_started = 0.0
        self.resumed = False
        self.notes: list[tuple[str, dict[str, Any]]] = []  # what the restore decided, said at start
        self._committing: tuple[dict[str, Any], Callable[[], None] | None] | None = None  # awaiting evaluation
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
        if self.config.run and self.config.run != run_settings.run:
            self.notes.append(("new_run_from_config", {"previous": run_settings.run, "run": self.config.run}))
            return None  # the config names another run: start it afresh
        schema = self.schemas(run_settings.training.model_ref)
        self.global_state = check_state(saved["global"], schema.specs(), "persisted global model")
        self.settings = run_settings
        self.state = NodeState(saved.get("state", self.state))
        self.history = list(saved.get("history", []))
        self.elapsed0 = float(saved.get("elapsed", 0.0))
        self.resumed = True
        differs = {k: [v, self.config.flat().get(k)] for k, v in run_settings.flat().items()
                   if k != "run" and self.config.flat().get(k) != v}
        if differs:
            self.notes.append(("settings_from_run", {"run": run_settings.run, "differs": differs,
                                                     "hint": "the run's settings win; 'new-run' applies the config"}))
        return saved.get("policy")

    def persist(self, now: float) -> None:
        self._do(Persist({
            "format": STATE_FORMAT, "run": self.settings.run, "round": self.policy.completed,
            "settings": self.settings.flat(), "global": self.global_state,
            "state": str(self.state), "history": self.history, "elapsed": self.elapsed(now),
            "policy": self.policy.state_dict(now),
        }))

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
        if self._committing is None:
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

    def online(self, role: str) -> dict[str, Presence]:
        return {n: p for n, p in self.fleet.items() if p.role == role and p.online}

    def eligible(self) -> dict[str, Presence]:
        """Online devices whose edge is online."""
        edges = self.online("edge")
        return {d: p for d, p in self.online("device").items() if p.edge in edges}

    def is_edge(self, node: str) -> bool:
        return self.fleet.get(node) is not None and self.fleet[node].role == "edge"

    def cut_for(self, device: str) -> int:
        p = self.fleet.get(device)
        cut = p.cut if p is not None else None
        if cut is not None and 1 <= cut <= self.schema.n_blocks:
            return cut
        configured = self.settings.cut
        return configured if 1 <= configured <= self.schema.n_blocks else self.schema.default_cut

    def plan(self, round: int, attempt: int, **changes: Any) -> Plan:
        return Plan.of(self.settings.training, run=self.settings.run, round=round, attempt=attempt, **changes)

    def encodings_for(self, device: str) -> dict[str, str]:
        """A device's own tensor encodings (its status says them), over the plan's."""
        p = self.fleet.get(device)
        return dict(p.encodings) if p is not None else {}

    def announce(self, plan: Plan, by_edge: dict[str, list[str]], tag: RoundTag | None = None,
                 partial: dict[str, list[str]] | None = None) -> None:
        """Open the round at each edge with its devices, their cuts and encodings, and the global model (only
        the layers in ``partial[edge]`` for an edge that keeps a copy of the rest: FedLAMA)."""
        for edge, devs in by_edge.items():
            keys = (partial or {}).get(edge)
            state = self.global_state if keys is None else {k: self.global_state[k] for k in keys}
            encodings = {d: e for d in devs if (e := self.encodings_for(d))}
            self._do(Send(edge, OpenRound(run=plan.run, round=plan.round, plan=plan, tag=tag,
                                          cuts={d: self.cut_for(d) for d in devs}, state=state,
                                          encodings=encodings, partial=keys is not None),
                          encoding=plan.model_encoding))

    def check_update(self, src: str, msg: EdgeUpdate, keys: list[str] | None = None
                     ) -> dict[str, np.ndarray] | None:
        """The update's delta (None when it carries no samples), checked, like each device's when the edge
        forwarded them, against the global model: exactly ``keys`` (all of the model's by default), the model's
        shapes, finite values. ProtocolError when anything is off."""
        if msg.samples <= 0:
            return None
        specs = self.schema.specs()
        if keys is not None:
            specs = {k: specs[k] for k in keys}
        checked: dict[str, np.ndarray] = {}
        for who, d in (msg.deltas or {src: msg.delta}).items():
            checked = check_state(d, specs, f"delta of {who}")
        return checked

    def commit(self, new_state: dict[str, np.ndarray], entry: dict[str, Any], now: float,
               then: Callable[[], None] | None = None) -> None:
        """Adopt a new global model: evaluate it, record the entry with its accuracy, persist, publish."""
        self.global_state = new_state
        entry["closed_at"] = now
        self._committing = (entry, then)
        self._do(Run(stage.Evaluate("eval", self.settings.training.model_ref, self.global_state)))

    def _on_job(self, ev: JobDone, now: float) -> None:
        if not isinstance(ev.job, stage.Evaluate) or self._committing is None:
            return
        entry, then = self._committing
        self._committing = None
        # T_global (heterogeneous-IoT cost model): from closing the round to the evaluated new model.
        t_global = round(max(0.0, now - entry.pop("closed_at", now)), 4)
        for costs in entry.get("devices", {}).values():
            costs["T_global"] = t_global
        res: stage.EvalResult | None = ev.result if ev.error is None else None
        if ev.error is not None:
            self._do(Emit("evaluation_failed", "error", {"error": ev.error[:300]}))
        # A diverged model evaluates to an infinite loss: reported as null (JSON has no infinity, and metrics
        # that fail to encode would be lost).
        entry["accuracy"] = _finite(None if res is None else res.accuracy)
        entry["loss"] = _finite(None if res is None else res.loss)
        entry["wall_s"] = round(self.elapsed(now), 3)
        self.history.append(entry)
        del self.history[:-HISTORY]
        self.persist(now)  # on disk before anyone hears of it
        self._do(RunLog(entry), Metrics(entry))
        self.publish_status(accuracy=entry["accuracy"])
        self._do(Log("info", f"{entry['kind']} done", {k: entry.get(k) for k in
                                                        ("round", "version", "accuracy", "loss", "participants")}))
        if then is not None:
            then()

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
        self.policy.on_status(p, was)

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
        self.settings = _with_run(self.config, run)
        self.schema = self.schemas(self.settings.training.model_ref)
        self.global_state = {k: np.array(v) for k, v in self.initial_state.items()}
        self.history = []
        self.elapsed0, self.run_started = 0.0, now
        self.policy = self._make_policy(None)
        self.state = NodeState.RUNNING if self.settings.autostart else NodeState.IDLE
        self.persist(now)
        self.publish_status()
        self._do(Emit("new_run", fields={"run": run, "previous": previous}))
        return {**self._state_reply(), "previous": previous}

    def cmd_fleet(self, args: dict[str, Any], now: float) -> Any:
        return {n: {**asdict(p), "seen_s_ago": round(now - self.last_seen.get(n, now), 1)}
                for n, p in sorted(self.fleet.items())}

    def cmd_history(self, args: dict[str, Any], now: float) -> Any:
        last = arg(args, "last", int, default=20, check=lambda v: v >= 1)
        return self.history[-last:]

    def cmd_move(self, args: dict[str, Any], now: float) -> Any:
        """Ask a device to move to another edge; the device answers the cloud, we answer the operator."""
        device = check_id(arg(args, "device", str), "device")
        edge = check_id(arg(args, "edge", str), "edge")
        path = arg(args, "path", str, default="direct", check=lambda v: v in set(MovePath))
        at_step = arg(args, "at_step", int, default=0, check=lambda v: v >= 0)
        if device not in self.fleet or self.fleet[device].role != "device":
            raise CommandError(f"unknown device {device!r}", "unknown_node")
        if not self.is_edge(edge):
            raise CommandError(f"unknown edge {edge!r}", "unknown_node")
        self._do(SendCommand(device, "move", {"edge": edge, "path": path, "at_step": at_step}))
        return {"forwarded": True, "device": device, "edge": edge, "path": path}


COMMANDS: dict[str, Callable[[CloudMachine, dict[str, Any], float], Any]] = {
    "start": CloudMachine.cmd_start, "stop": CloudMachine.cmd_stop, "pause": CloudMachine.cmd_pause,
    "resume": CloudMachine.cmd_resume, "set": CloudMachine.cmd_set, "new-run": CloudMachine.cmd_new_run,
    "fleet": CloudMachine.cmd_fleet, "history": CloudMachine.cmd_history, "move": CloudMachine.cmd_move,
}


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 5)


def _with_run(s: CloudSettings, run: str) -> CloudSettings:
    return replace(s, run=run)
