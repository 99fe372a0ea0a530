"""Asynchronous group aggregation for the cloud agent (``[cloud] mode = "async"``, ALGORITHMS §4–§5).

Global *versions* replace rounds. Clients are split into groups; every group runs its own synchronous rounds
(FedAvg inside the group, exactly like a synchronous round of the cloud), concurrently with the other groups.
When a group round closes (every edge of it reported, or ``group_deadline_s`` passed) its sample-weighted
mean delta goes to an asynchronous strategy (``mqttfl.fl.strategies``) as one ``Update`` with the global version
the round started from; the strategy mixes it into the global model (damped by staleness) and the group
starts its next round at once from the newest global model.

Strategies and their groups:
  ecofl     Eco-FL hybrid: groups by response latency and label mix (``grouping.form_groups``), regrouped at
            run time by Eco-FL's Algorithm 1 every ``regroup_every`` versions (``grouping.regroup``).
  fedat     FedAT: tiers = latency groups (clients sorted by latency, cut into ``num_groups``).
  fedasync  FedAsync: every device is a group of one.
  fedbuff   FedBuff: every device is a group of one; a version per ``fedbuff_k`` updates.
  sync      one group with everyone, synchronous FedAvg: the same model as ``mode = "sync"`` (a check).

Run: one synchronous *profiling* round with every online device measures each device's response latency
(t_download + t_local + t_upload from its report); its FedAvg update is version 1 (group −1 in metrics). Then
groups are formed and group rounds run until ``max_versions``. Latencies are a moving average over every round
a device takes part in; a device that misses a round while online is charged the round's duration.

Intermittent devices: an offline device is left out of its group's rounds (the group does not wait for it
past the deadline: the edge closes its part at 0.85 of it) and rejoins its group's next round when its status
is online again. An edge's delta that reaches the cloud after its group round closed (the edge echoes group and
base version in ``extra``) is applied as a stale update, weighted by the staleness function, not dropped.
A dropped device (Algorithm 1: its latency fits no group) trains only in *probe* rounds, alone, whose update is
not mixed; they refresh its latency so that it is re-admitted when it fits a group again.

Persistence: global model, version, strategy state, groups, latency averages, the open rounds and the round
counter are saved atomically with the cloud's state after every version and every round start (``persist``),
and restored after a kill -9; restored open rounds keep accepting their edges' deltas until their deadline.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mqttfl.fl.aggregate import apply_delta, weighted_average
from mqttfl.fl.grouping import DROPPED, ClientProfile, form_groups, initial_groups, regroup
from mqttfl.protocol.messages import Plan, ProtocolError, check_state
from mqttfl.fl.staleness import by_name as staleness_by_name
from mqttfl.fl.strategies import EcoFLHybrid, FedAsync, FedAT, FedBuff, SyncFedAvg, Update, UpdateRejected
from mqttfl.runtime.transport import Inbound

if TYPE_CHECKING:
    from cloud_agent.agent import CloudAgent

STRATEGIES = ("ecofl", "fedasync", "fedbuff", "fedat", "sync")
PROFILE = -1  # the group id of the profiling round and of probe rounds in metrics
APPLIED_MEMORY = 512  # (round, edge) pairs remembered so that a re-sent late delta is applied once


@dataclass
class GroupRun:
    """One open round of one group (or the profiling round, or a dropped device's probe)."""

    kind: str  # "profile" | "group" | "probe"
    group: int
    round: int
    base_sv: int  # strategy version at the start (the strategy's staleness frame)
    base_version: int  # global version at the start
    edges: dict[str, list[str]]
    started: float  # monotonic
    deadline: float  # monotonic
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    deltas: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def devices(self) -> list[str]:
        return sorted(d for ds in self.edges.values() for d in ds)

    def done(self, now: float) -> bool:
        return set(self.reports) >= set(self.edges) or now >= self.deadline

    def to_saved(self, now: float) -> dict[str, Any]:
        return {"kind": self.kind, "group": self.group, "round": self.round, "base_sv": self.base_sv,
                "base_version": self.base_version, "edges": self.edges, "elapsed": now - self.started,
                "remaining": max(0.0, self.deadline - now)}


def _staleness_fn(name: str) -> Any:
    return staleness_by_name(name)


class AsyncMode:
    """The cloud's asynchronous aggregation: delegated to from ``CloudAgent`` when ``mode = "async"``."""

    def __init__(self, cloud: CloudAgent) -> None:
        s = cloud.settings
        if s.strategy not in STRATEGIES:
            raise ValueError(f"[cloud] strategy must be one of {STRATEGIES}, got {s.strategy!r}")
        if s.num_groups < 1 or s.max_versions < 0 or s.regroup_every < 0 or not 0 < s.alpha <= 1:
            raise ValueError("[cloud] needs num_groups >= 1, max_versions >= 0, regroup_every >= 0, 0 < alpha <= 1")
        _staleness_fn(s.staleness)  # fail at start on an unknown name
        self.cloud = cloud
        self.version = 0
        self.next_round = 0
        self.phase = "profile"
        self.profiled = 0
        self.assign: dict[str, int] = {}
        self.latency: dict[str, float] = {}
        self.labels: dict[str, list[int] | None] = {}
        self.open: dict[int, GroupRun] = {}
        self.strategy: Any = None
        self.last_regroup = 0
        self.group_versions: dict[int, int] = {}
        self.applied: list[tuple[int, str]] = []
        self.probe_due: set[str] = set()
        self.online_seen: dict[str, bool] = {}
        self.dirty = False
        if cloud.async_saved:
            self._load(cloud.async_saved)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "version": self.version, "next_round": self.next_round, "phase": self.phase, "profiled": self.profiled,
            "assign": dict(self.assign), "latency": dict(self.latency),
            "strategy": self.strategy.state_dict() if self.strategy is not None else None,
            "open": {str(k): r.to_saved(now) for k, r in self.open.items()},
            "last_regroup": self.last_regroup,
            "group_versions": {str(g): n for g, n in self.group_versions.items()},
            "applied": [[r, e] for r, e in self.applied], "probe_due": sorted(self.probe_due),
            "run_started": self.cloud.run_started,
        }

    def _load(self, d: dict[str, Any]) -> None:
        now = time.monotonic()
        self.version = int(d["version"])
        self.next_round = int(d["next_round"])
        self.phase = str(d["phase"])
        self.profiled = int(d.get("profiled", 0))
        self.assign = {str(k): int(v) for k, v in d["assign"].items()}
        self.latency = {str(k): float(v) for k, v in d["latency"].items()}
        self.last_regroup = int(d.get("last_regroup", 0))
        self.group_versions = {int(g): int(n) for g, n in d.get("group_versions", {}).items()}
        self.applied = [(int(r), str(e)) for r, e in d.get("applied", [])]
        self.probe_due = set(d.get("probe_due", []))
        self.cloud.run_started = float(d.get("run_started", self.cloud.run_started))
        if d.get("strategy") is not None:
            self.strategy = self._make_strategy(self.assign)
            self.strategy.load_state_dict(d["strategy"])
        for k, o in d.get("open", {}).items():
            # The edges keep training restored rounds; their reliable deltas arrive after the restart.
            self.open[int(k)] = GroupRun(
                str(o["kind"]), int(o["group"]), int(o["round"]), int(o["base_sv"]), int(o["base_version"]),
                {str(e): list(ds) for e, ds in o["edges"].items()}, started=now - float(o["elapsed"]),
                deadline=now + float(o["remaining"]) + 1.0)
        self.cloud.round = self.version

    def _make_strategy(self, assign: dict[str, int]) -> Any:
        s = self.cloud.settings
        fn = _staleness_fn(s.staleness)
        if s.strategy == "ecofl":
            return EcoFLHybrid(assign, alpha=float(s.alpha), staleness=fn)
        if s.strategy == "fedasync":
            return FedAsync(alpha=float(s.alpha), staleness=fn)
        if s.strategy == "fedbuff":
            return FedBuff(k=int(s.fedbuff_k), staleness=fn)
        if s.strategy == "fedat":
            return FedAT({c: g for c, g in assign.items() if g != DROPPED})
        return SyncFedAvg([f"group-{g}" for g in sorted(set(assign.values())) if g != DROPPED])

    # ------------------------------------------------------------------ fleet
    def on_status(self, node: str, data: dict[str, Any]) -> None:
        if data.get("role") != "device":
            return
        if "labels" in data or data.get("state") != "offline":
            labels = data.get("labels")
            self.labels[node] = [int(x) for x in labels] if isinstance(labels, list) else None
        online = data.get("state") != "offline"
        was = self.online_seen.get(node)
        self.online_seen[node] = online
        if self.phase == "groups" and was is False and online:
            group = self.assign.get(node)
            self.cloud.transport.event("device_rejoined", run=self.cloud.settings.run, device=node, group=group,
                                       version=self.version)
        elif was and not online:
            self.cloud.transport.event("device_offline", level="warning", run=self.cloud.settings.run,
                                       device=node, group=self.assign.get(node), version=self.version)

    def eligible(self) -> dict[str, dict[str, Any]]:
        edges = self.cloud.online("edge")
        return {d: s for d, s in self.cloud.online("device").items() if s.get("edge") in edges}

    def busy(self) -> set[str]:
        return {d for r in self.open.values() for d in r.devices}

    def groups(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for d, g in sorted(self.assign.items()):
            if g != DROPPED:
                out.setdefault(g, []).append(d)
        return out

    # ------------------------------------------------------------------ loop
    def tick(self, now: float) -> None:
        c = self.cloud
        for r in sorted(self.open.values(), key=lambda r: r.round):
            if r.done(now) and self.open.get(r.round) is r:
                self.close(r, now)
        if c.state == "stopped" and self.open:
            self.open.clear()  # abandoned; their late deltas are applied as stale updates if the run resumes
            self.dirty = True
        if c.state == "running" and self.version >= c.settings.max_versions:
            self.complete()
        elif c.state == "running":
            self.schedule(now)
        if self.dirty:
            self.dirty = False
            c.persist()

    def schedule(self, now: float) -> None:
        s = self.cloud.settings
        ready = self.eligible()
        if self.phase == "profile":
            if not self.open and len(ready) >= s.min_devices:
                self.start(ready, "profile", PROFILE, float(s.deadline_s), now)
            return
        busy = self.busy()
        self._admit_newcomers(ready)
        for g, members in self.groups().items():
            if any(r.kind == "group" and r.group == g for r in self.open.values()):
                continue
            free = {d: ready[d] for d in members if d in ready and d not in busy}
            if free:
                self.start(free, "group", g, float(s.group_deadline_s), now)
        for d in sorted(self.probe_due):
            if d in ready and d not in busy:
                self.probe_due.discard(d)
                self.start({d: ready[d]}, "probe", PROFILE, float(s.group_deadline_s), now)

    def _admit_newcomers(self, ready: dict[str, dict[str, Any]]) -> None:
        """A device first seen after the profiling round: its own group (FedAsync/FedBuff), the one group
        (sync), or a probe round first so that its latency decides its group (Eco-FL, FedAT)."""
        for d in sorted(set(ready) - set(self.assign)):
            strategy = self.cloud.settings.strategy
            if strategy in ("fedasync", "fedbuff"):
                self.assign[d] = max(self.assign.values(), default=-1) + 1
            elif strategy == "sync":
                self.assign[d] = 0
            elif d in self.latency:
                self._place(d)
            else:
                self.assign[d] = DROPPED
                self.probe_due.add(d)
            self.dirty = True

    def _place(self, device: str) -> None:
        if self.cloud.settings.strategy == "fedat":
            means = {g: float(np.mean([self.latency[m] for m in ms if m in self.latency]))
                     for g, ms in self.groups().items() if any(m in self.latency for m in ms)}
            self.assign[device] = min(means, key=lambda g: abs(means[g] - self.latency[device])) if means else 0
            return
        self.assign.setdefault(device, DROPPED)
        self.regroup(reason="probe")

    def start(self, devices: dict[str, dict[str, Any]], kind: str, group: int, deadline_s: float,
              now: float) -> GroupRun:
        c = self.cloud
        rid = self.next_round
        self.next_round += 1
        plan: Plan = c.plan().with_(round=rid, attempt=0, deadline_s=deadline_s)
        by_edge: dict[str, list[str]] = {}
        for d, st in sorted(devices.items()):
            by_edge.setdefault(str(st["edge"]), []).append(d)
        base_sv = self.strategy.version if self.strategy is not None else 0
        r = GroupRun(kind, group, rid, base_sv, self.version, by_edge, started=now, deadline=now + deadline_s)
        self.open[rid] = r
        extra = {"group": group, "version": self.version, "base": base_sv, "kind": kind}
        for edge, devs in by_edge.items():
            body = {"plan": plan.to_body(), "devices": {d: {"cut": c.cut_for(devices[d])} for d in devs},
                    "extra": extra}
            c.transport.send("model", edge, body=body, tensors=c.global_state, run=plan.run, round=rid)
        c.transport.event("round_started", run=plan.run, round=rid, attempt=0, edges=by_edge, group=group,
                          version=self.version, kind=kind)
        c.log.info("group round start", round=rid, group=group, kind=kind, version=self.version, edges=by_edge)
        self.dirty = True
        return r

    # ------------------------------------------------------------------ deltas
    def _validate(self, msg: Inbound) -> tuple[int, dict[str, np.ndarray] | None]:
        env = msg.env
        assert env is not None
        samples = int(env.body.get("samples", 0))
        if samples < 0:
            raise ProtocolError("bad_field", "negative samples")
        if samples == 0:
            return 0, None
        check_state(dict(env.tensors), self.cloud.global_state, f"delta of {msg.src}")
        return samples, {k: np.array(v) for k, v in env.tensors.items()}

    def on_edge_delta(self, msg: Inbound) -> None:
        env = msg.env
        assert env is not None
        c = self.cloud
        r = self.open.get(env.round)
        known = env.run == c.settings.run and env.round < self.next_round
        if r is not None and env.run == c.settings.run and msg.src in r.edges:
            if msg.src not in r.reports:
                try:
                    samples, delta = self._validate(msg)
                except (ProtocolError, ValueError, TypeError) as e:
                    c.transport.drop(getattr(e, "code", "bad_field"), str(e), str(msg.topic))
                    return
                r.reports[msg.src] = dict(env.body)
                if delta is not None:
                    r.deltas[msg.src] = delta
            c.transport.ack(msg)
            return
        if known and (env.round, msg.src) not in self.applied:
            self.on_late_delta(msg)
            return
        if known:
            c.transport.ack(msg)  # a re-sent delta we already applied
        c.transport.drop("wrong_round", f"delta from {msg.src} for {env.run}/{env.round}", str(msg.topic))

    def on_late_delta(self, msg: Inbound) -> None:
        """A delta for a group round that closed without it: mixed in as a stale update, not lost."""
        env = msg.env
        assert env is not None
        c = self.cloud
        extra = env.body.get("extra") or {}
        c.transport.ack(msg)
        if self.phase != "groups" or extra.get("kind") != "group" or self.strategy is None or \
                c.state == "done" or self.version >= c.settings.max_versions:
            c.transport.drop("wrong_round", f"late delta from {msg.src} for round {env.round}", str(msg.topic))
            return
        try:
            samples, delta = self._validate(msg)
            group, base_sv = int(extra["group"]), int(extra["base"])
        except (ProtocolError, ValueError, TypeError, KeyError) as e:
            c.transport.drop(getattr(e, "code", "bad_field"), str(e), str(msg.topic))
            return
        self._remember(env.round, msg.src)
        if delta is None:
            return
        now = time.monotonic()
        base_version = int(extra.get("version", 0))
        devices = dict(env.body.get("devices", {}))
        r = GroupRun("group", group, env.round, base_sv, base_version, {msg.src: sorted(devices)},
                     started=now, deadline=now, reports={msg.src: dict(env.body)}, deltas={msg.src: delta})
        self._observe(r, now)
        self.submit(r, {msg.src: delta}, {msg.src: samples}, late=True, now=now)
        self.dirty = True

    def _remember(self, rid: int, edge: str) -> None:
        self.applied.append((rid, edge))
        del self.applied[:-APPLIED_MEMORY]

    # ------------------------------------------------------------------ closing a round
    def _observe(self, r: GroupRun, now: float) -> dict[str, dict[str, Any]]:
        beta = float(self.cloud.settings.latency_ema)
        reports = {d: rep for body in r.reports.values() for d, rep in dict(body.get("devices", {})).items()}
        for d in r.devices:
            rep = reports.get(d)
            if rep is not None:
                obs = float(rep.get("t_download", 0.0)) + float(rep.get("t_local", 0.0)) + \
                      float(rep.get("t_upload", 0.0))
            elif self.cloud.fleet.get(d, {}).get("state") not in (None, "offline"):
                obs = now - r.started  # online but missed the round: at least this slow
            else:
                continue  # offline: no measurement
            old = self.latency.get(d)
            # Profiling rounds overwrite: the first includes every process's warm-up, not the device's speed.
            self.latency[d] = obs if old is None or r.kind == "profile" else (1 - beta) * old + beta * obs
        return reports

    def close(self, r: GroupRun, now: float) -> None:
        self.open.pop(r.round, None)
        self.dirty = True
        for e in r.reports:
            self._remember(r.round, e)
        reports = self._observe(r, now)
        edges = sorted(r.deltas)
        samples = {e: int(r.reports[e]["samples"]) for e in edges}
        if r.kind == "probe":
            self.cloud.log.info("probe done", round=r.round, devices=r.devices,
                                latency={d: self.latency.get(d) for d in r.devices})
            self._place_after_probe(r)
            return
        if r.kind == "profile":
            if not edges:
                self.cloud.transport.event("quorum_not_met", level="warning", run=self.cloud.settings.run,
                                           round=r.round, reported=0, needed=1, attempt=0, action="retry")
                return
            mean = weighted_average([(r.deltas[e], float(samples[e])) for e in edges])
            self.cloud.global_state = apply_delta(self.cloud.global_state, mean)
            self.version += 1
            self.profiled += 1
            if self.profiled >= self.cloud.settings.profile_rounds:
                self.form_groups(r)
            self.publish_version(r, reports, staleness=0, late=False, now=now)
            return
        if not edges:
            self.cloud.log.warning("group round without updates", round=r.round, group=r.group)
            return
        self.submit(r, r.deltas, samples, late=False, now=now, reports=reports)

    def submit(self, r: GroupRun, deltas: dict[str, dict[str, np.ndarray]], samples: dict[str, int], *,
               late: bool, now: float, reports: dict[str, dict[str, Any]] | None = None) -> None:
        c = self.cloud
        edges = sorted(deltas)
        mean = weighted_average([(deltas[e], float(samples[e])) for e in edges])
        client = r.devices[0] if c.settings.strategy in ("fedasync", "fedbuff") and r.devices else f"group-{r.group}"
        upd = Update(client=client, delta=mean, num_samples=sum(samples.values()), base_version=r.base_sv,
                     group=r.group if c.settings.strategy in ("ecofl", "fedat") else None)
        staleness = self.strategy.version - r.base_sv
        try:
            new, advanced = self.strategy.submit(c.global_state, upd)
        except UpdateRejected as e:
            c.transport.drop("rejected", str(e), "")
            return
        self.group_versions[r.group] = self.group_versions.get(r.group, 0) + 1
        if reports is None:
            reports = {d: rep for body in r.reports.values() for d, rep in dict(body.get("devices", {})).items()}
        if not advanced:
            c.transport.metrics(kind="update", run=c.settings.run, version=self.version, group=r.group,
                                round=r.round, staleness=staleness, late=late, participants=sorted(reports),
                                wall_s=round(time.time() - c.run_started, 3))
            return
        c.global_state = new
        self.version += 1
        self.publish_version(r, reports, staleness=staleness, late=late, now=now)
        s = c.settings
        if s.strategy == "ecofl" and s.regroup_every > 0 and self.version - self.last_regroup >= s.regroup_every:
            self.regroup(reason="periodic")

    # ------------------------------------------------------------------ groups
    def _profiles(self) -> dict[str, ClientProfile]:
        out = {}
        for d, lat in sorted(self.latency.items()):
            h = self.labels.get(d)
            out[d] = ClientProfile(d, lat, None if h is None else np.asarray(h, np.float64))
        return out

    def form_groups(self, r: GroupRun) -> None:
        s = self.cloud.settings
        profiles = self._profiles()
        names = sorted(profiles)
        if s.strategy in ("fedasync", "fedbuff"):
            self.assign = {d: i for i, d in enumerate(names)}
        elif s.strategy == "sync":
            self.assign = {d: 0 for d in names}
        elif s.strategy == "fedat":
            self.assign = initial_groups(profiles, min(s.num_groups, len(names)))
        else:
            self.assign = form_groups(profiles, min(s.num_groups, len(names)), float(s.lam), seed=s.seed)
        self.strategy = self._make_strategy(self.assign)
        self.phase = "groups"
        self.last_regroup = self.version
        for d in r.devices:
            self.online_seen.setdefault(d, True)
        self.publish_groups(reason="profile", moves={})

    def num_groups(self) -> int:
        return max([g + 1 for g in self.assign.values()] + [1])

    def regroup(self, reason: str) -> None:
        if self.cloud.settings.strategy != "ecofl":
            return
        self.last_regroup = self.version
        new, moves = regroup(self.assign, self._profiles(), self.num_groups(), float(self.cloud.settings.lam))
        if isinstance(self.strategy, EcoFLHybrid):
            # Groups keep their ids while emptied, so that a round still open for one of them can be mixed in.
            self.strategy.set_groups({**{f"(group {g})": g for g in range(self.num_groups())}, **new})
        self.assign = new
        for d, g in new.items():
            if g == DROPPED:
                self.probe_due.add(d)
        self.dirty = True
        self.publish_groups(reason=reason, moves=moves)
        if moves:
            self.cloud.transport.event("regrouped", run=self.cloud.settings.run, version=self.version,
                                       reason=reason, moves=moves, groups=self._groups_field())
            self.cloud.log.info("regrouped", version=self.version, moves=moves)

    def _place_after_probe(self, r: GroupRun) -> None:
        for d in r.devices:
            if self.assign.get(d, DROPPED) == DROPPED and d in self.latency:
                if self.cloud.settings.strategy == "fedat":
                    self._place(d)
                else:
                    self.regroup(reason="probe")
                if self.assign.get(d, DROPPED) == DROPPED:
                    self.probe_due.add(d)

    def _groups_field(self) -> dict[str, list[str]]:
        return {str(g): ms for g, ms in self.groups().items()}

    def publish_groups(self, reason: str, moves: dict[str, str]) -> None:
        c = self.cloud
        c.transport.metrics(
            kind="groups", run=c.settings.run, version=self.version, strategy=c.settings.strategy, reason=reason,
            groups=self._groups_field(), dropped=sorted(d for d, g in self.assign.items() if g == DROPPED),
            moves=moves, latency={d: round(v, 4) for d, v in sorted(self.latency.items())},
            labels_shared={d: self.labels.get(d) is not None for d in sorted(self.assign)},
        )

    # ------------------------------------------------------------------ metrics and completion
    def publish_version(self, r: GroupRun, reports: dict[str, dict[str, Any]], *, staleness: int, late: bool,
                        now: float) -> None:
        c = self.cloud
        accuracy, loss = c.evaluate()
        alpha_t = None
        mixing = getattr(self.strategy, "mixing_weight", None)
        if mixing is not None:
            alpha_t = round(float(mixing(staleness)), 5)
        entry = {
            "kind": "version", "run": c.settings.run, "version": self.version, "group": r.group,
            "round": r.round, "strategy": c.settings.strategy, "staleness": staleness, "late": late,
            "base_version": r.base_version, "alpha_t": alpha_t, "accuracy": accuracy, "loss": loss,
            "participants": sorted(reports), "missing": sorted(set(r.devices) - set(reports)),
            "round_s": round(now - r.started, 3), "wall_s": round(time.time() - c.run_started, 3),
            "groups": self._groups_field(), "group_versions": {str(g): n for g, n in self.group_versions.items()},
            "devices": {d: {"T_local": round(float(rep.get("t_local", 0.0)), 4),
                            "T_upload": round(float(rep.get("t_upload", 0.0)), 4),
                            "T_download": round(float(rep.get("t_download", 0.0)), 4),
                            "bytes_up": int(rep.get("bytes_up", 0)), "bytes_down": int(rep.get("bytes_down", 0)),
                            "peak_rss_mb": rep.get("peak_rss_mb"),
                            "samples": int(rep.get("samples", 0))} for d, rep in sorted(reports.items())},
        }
        c.round = self.version
        c.history.append(entry)
        del c.history[:-1000]
        c.persist()  # on disk before anyone hears of the version
        if c.runlog is not None:
            with open(c.runlog, "a") as f:
                f.write(json.dumps(entry) + "\n")
        c.transport.metrics(**entry)
        c.transport.set_status("running", run=c.settings.run, round=self.version, version=self.version,
                               accuracy=accuracy)
        c.log.info("version", version=self.version, group=r.group, staleness=staleness, accuracy=accuracy)

    def complete(self) -> None:
        c = self.cloud
        self.open.clear()  # rounds still running are abandoned; their deltas are acknowledged and dropped
        c.state = "done"
        self.dirty = False
        c.persist()
        last = c.history[-1] if c.history else {}
        wall = round(time.time() - c.run_started, 2)
        c.transport.set_status("done", run=c.settings.run, round=self.version, version=self.version,
                               accuracy=last.get("accuracy"))
        c.transport.event("run_complete", run=c.settings.run, rounds=self.version, versions=self.version,
                          accuracy=last.get("accuracy"), wall_s=wall, mode="async", strategy=c.settings.strategy,
                          group_versions={str(g): n for g, n in self.group_versions.items()})
        c.log.info("run complete", versions=self.version, accuracy=last.get("accuracy"))

    def status(self) -> dict[str, Any]:
        return {"mode": "async", "strategy": self.cloud.settings.strategy, "version": self.version,
                "max_versions": self.cloud.settings.max_versions, "phase": self.phase,
                "groups": self._groups_field(), "open_rounds": sorted(self.open)}
