"""Asynchronous group aggregation (``[cloud] mode = "async"``; docs/async.md).

Global *versions* replace rounds. Clients are split into groups; every group runs its own synchronous rounds
(FedAvg inside the group, :func:`~mqttfl.fl.strategies.mean_delta`), concurrently with the other groups.
When a group round closes (every device reported, or ``group_deadline_s`` passed) its mean delta goes to the
asynchronous strategy as one ``Update`` with the strategy version the round started from; the strategy mixes
it into the global model (damped by staleness) and the group starts its next round at once from the newest
global model. How groups are formed is the strategy's ``grouping``:

  ecofl       by response latency and label mix, regrouped at run time (Eco-FL's Algorithm 1)
  tiers       latency tiers (FedAT)
  per_client  every device is a group of one (FedAsync, FedBuff)
  one         one group with everyone: synchronous FedAvg (the ``sync`` strategy, a check)

Run: ``profile_rounds`` synchronous *profiling* rounds with every online device measure each device's
response latency (t_download + t_local + t_upload from its report); their FedAvg updates are versions (group
-1 in metrics). Then groups are formed and group rounds run until ``max_versions``. Latencies are a moving
average over every round a device takes part in; a device that misses a round while online is charged the
round's duration.

Intermittent devices: an offline device is left out of its group's rounds and rejoins its group's next round
when its status is online again. An edge's delta that reaches the cloud after its group round closed (the
edge echoes the round's tag) is applied as a stale update, weighted by the staleness function, not dropped.
A dropped device (its latency fits no group) trains only in *probe* rounds, alone, whose update is not mixed;
they refresh its latency so that it is re-admitted when it fits a group again.

Persistence: version, strategy state, groups, latency averages, the open rounds and the round counter are
saved with the cloud's state after every version and every round start, and restored after a kill -9;
restored open rounds keep accepting their edges' deltas until their deadline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mqttfl.fl.aggregate import apply_delta
from mqttfl.fl.grouping import DROPPED, ClientProfile, form_groups, initial_groups, regroup
from mqttfl.fl.strategies import Grouping, Update, UpdateRejected, make_strategy, mean_delta
from mqttfl.protocol.cloud import record
from mqttfl.protocol.cloud.context import Cloud
from mqttfl.protocol.cloud.rounds import CloudRound, device_costs
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import Ack, Emit, Log, Metrics, Received, SetTimer
from mqttfl.protocol.messages import EdgeUpdate, Restart, RoundKind, RoundTag
from mqttfl.protocol.status import Presence

PROFILE = -1  # the group id of profiling and probe rounds in metrics
APPLIED_MEMORY = 512  # (round, edge) pairs remembered so that a re-sent late delta is applied once


class AsyncGroups:
    def __init__(self, cloud: Cloud, saved: dict[str, Any] | None) -> None:
        self.cloud = cloud
        s = cloud.settings
        self.strategy = make_strategy(s.strategy_name, s.params)
        self.grouping = self.strategy.grouping
        self.completed = 0  # global versions
        self.next_round = 0
        self.phase = "profile"
        self.profiled = 0
        self.assign: dict[str, int] = {}
        self.latency: dict[str, float] = {}
        self.labels: dict[str, list[int] | None] = {}
        self.open: dict[int, CloudRound] = {}
        self.last_regroup = 0
        self.group_versions: dict[int, int] = {}
        self.applied: list[tuple[int, str]] = []
        self.probe_due: set[str] = set()
        self.online_seen: dict[str, bool] = {}
        self.dirty = False
        self._scheduled: tuple[Any, ...] | None = None  # what the last schedule() saw (progress)
        self._saved_open: dict[str, Any] = {}
        if saved:
            self._load(saved)

    # ------------------------------------------------------------------ persistence
    def state_dict(self, now: float) -> dict[str, Any]:
        return {
            "version": self.completed, "next_round": self.next_round, "phase": self.phase,
            "profiled": self.profiled, "assign": dict(self.assign), "latency": dict(self.latency),
            "strategy": self.strategy.state_dict(),
            "open": {**self._saved_open, **{str(k): r.to_saved(now) for k, r in self.open.items()}},
            "last_regroup": self.last_regroup,
            "group_versions": {str(g): n for g, n in self.group_versions.items()},
            "applied": [[r, e] for r, e in self.applied], "probe_due": sorted(self.probe_due),
        }

    def _load(self, d: dict[str, Any]) -> None:
        self.completed = int(d["version"])
        self.next_round = int(d["next_round"])
        self.phase = str(d["phase"])
        self.profiled = int(d.get("profiled", 0))
        self.assign = {str(k): int(v) for k, v in d["assign"].items()}
        self.latency = {str(k): float(v) for k, v in d["latency"].items()}
        self.last_regroup = int(d.get("last_regroup", 0))
        self.group_versions = {int(g): int(n) for g, n in d.get("group_versions", {}).items()}
        self.applied = [(int(r), str(e)) for r, e in d.get("applied", [])]
        self.probe_due = set(d.get("probe_due", []))
        self.strategy.load_state_dict(d["strategy"])
        self._saved_open = dict(d.get("open", {}))  # restored at the first event: their times need a clock

    def _restore_open(self, now: float) -> None:
        for k, o in self._saved_open.items():
            # The edges keep training restored rounds; their reliable deltas arrive after the restart.
            r = CloudRound.from_saved(o, now)
            self.open[int(k)] = r
            self.cloud.do(SetTimer(("deadline", r.plan.key), r.deadline))
        self._saved_open = {}

    def status(self) -> dict[str, Any]:
        return {"mode": "async", "strategy": self.strategy.name, "version": self.completed,
                "max_versions": self.cloud.settings.max_versions, "phase": self.phase,
                "groups": self._groups_field(), "open_rounds": sorted(self.open)}

    def status_fields(self) -> dict[str, Any]:
        return {"version": self.completed}

    def busy(self) -> bool:
        return bool(self.open)

    def on_start(self) -> None:
        pass

    def on_stop(self) -> None:
        self.open.clear()  # abandoned; their late deltas are applied as stale updates if the run resumes
        self.dirty = True

    def on_restart(self, ev: Received, msg: Restart, now: float) -> None:
        self.cloud.drop("unsupported", "restarting a device's round is a synchronous-mode fallback", ev.src)

    # ------------------------------------------------------------------ fleet
    def on_status(self, p: Presence, was: Presence | None) -> None:
        """A configured (or enrolled) node's status, in its authorised role; the cloud passes no other."""
        for r in self.open.values():
            if p.refuses(r.plan.run):  # it will not report: its group round need not wait for the deadline
                r.give_up([p.node] if p.role == "device" else r.edges.get(p.node, []))
        if p.role != "device":
            return
        if p.labels is not None or p.online:
            self.labels[p.node] = list(p.labels) if p.labels is not None else None
        seen = self.online_seen.get(p.node)
        self.online_seen[p.node] = p.online
        c = self.cloud
        if self.phase == "groups" and seen is False and p.online:
            c.do(Emit("device_rejoined", fields={"run": c.settings.run, "device": p.node,
                                                 "group": self.assign.get(p.node), "version": self.completed}))
        elif seen and not p.online:
            c.do(Emit("device_offline", "warning", {"run": c.settings.run, "device": p.node,
                                                    "group": self.assign.get(p.node), "version": self.completed}))

    def busy_devices(self) -> set[str]:
        return {d for r in self.open.values() for d in r.devices}

    def groups(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for d, g in sorted(self.assign.items()):
            if g != DROPPED:
                out.setdefault(g, []).append(d)
        return out

    # ------------------------------------------------------------------ loop
    def progress(self, now: float) -> None:
        c = self.cloud
        if self._saved_open:
            self._restore_open(now)
        for r in sorted(self.open.values(), key=lambda r: r.plan.round):
            if r.done(now) and self.open.get(r.plan.round) is r:
                self.close(r, now)
                if c.committing:
                    return  # the rest waits until the new version is committed
        if c.running and self.completed >= c.settings.max_versions:
            self.open.clear()  # rounds still running are abandoned; their deltas are acknowledged and dropped
            self.dirty = False
            c.complete(now, versions=self.completed, mode="async", strategy=self.strategy.name,
                       group_versions={str(g): n for g, n in self.group_versions.items()})
            return
        if c.running:
            # Scheduling looks at every eligible device: only when something it depends on changed, so that
            # the statuses of a large fleet's devices cost O(1) each (the profile phase's first round also
            # waits on a clock: always).
            key = (c.eligible_version, self.phase, self.completed, self.next_round, len(self.open),
                   len(self.probe_due), len(self.assign), self.last_regroup, self.strategy.version)
            if self.phase == "profile" or key != self._scheduled:
                self.schedule(now)
                self._scheduled = (c.eligible_version, self.phase, self.completed, self.next_round, len(self.open),
                                   len(self.probe_due), len(self.assign), self.last_regroup, self.strategy.version)
        if self.dirty:
            self.dirty = False
            c.persist(now)

    def schedule(self, now: float) -> None:
        s = self.cloud.settings
        ready = self.cloud.eligible()
        if self.phase == "profile":
            first = self.next_round == 0
            if not self.open and len(ready) >= s.min_devices and (not first or self.cloud.may_begin(ready, now)):
                self.start(ready, RoundKind.PROFILE, PROFILE, float(s.training.deadline_s), now)
            return
        busy = self.busy_devices()
        self._admit_newcomers(ready)
        for g, members in self.groups().items():
            if any(r.tag is not None and r.tag.kind == RoundKind.GROUP and r.tag.group == g
                   for r in self.open.values()):
                continue
            free = {d: ready[d] for d in members if d in ready and d not in busy}
            if free:
                self.start(free, RoundKind.GROUP, g, float(s.group_deadline_s), now)
        for d in sorted(self.probe_due):
            if d in ready and d not in busy:
                self.probe_due.discard(d)
                self.start({d: ready[d]}, RoundKind.PROBE, PROFILE, float(s.group_deadline_s), now)

    def _admit_newcomers(self, ready: Mapping[str, Presence]) -> None:
        """A device first seen after profiling: its own group (per client), the one group, or a probe round
        first so that its latency decides its group (Eco-FL, tiers)."""
        for d in sorted(set(ready) - set(self.assign)):
            if self.grouping == Grouping.PER_CLIENT:
                self.assign[d] = max(self.assign.values(), default=-1) + 1
            elif self.grouping == Grouping.ONE:
                self.assign[d] = 0
            elif d in self.latency:
                self._place(d)
            else:
                self.assign[d] = DROPPED
                self.probe_due.add(d)
            self.strategy.set_groups(self.assign)
            self.dirty = True

    def _place(self, device: str) -> None:
        if self.grouping == Grouping.TIERS:
            means = {g: float(np.mean([self.latency[m] for m in ms if m in self.latency]))
                     for g, ms in self.groups().items() if any(m in self.latency for m in ms)}
            self.assign[device] = min(means, key=lambda g: abs(means[g] - self.latency[device])) if means else 0
            self.strategy.set_groups(self.assign)
            return
        self.assign.setdefault(device, DROPPED)
        self.regroup(reason="probe")

    def start(self, devices: Mapping[str, Presence], kind: RoundKind, group: int, deadline_s: float,
              now: float) -> None:
        c = self.cloud
        rid = self.next_round
        self.next_round += 1
        plan = c.plan(rid, 0, deadline_s=deadline_s)
        by_edge: dict[str, list[str]] = {}
        for d, p in sorted(devices.items()):
            by_edge.setdefault(str(p.edge), []).append(d)
        tag = RoundTag(group=group, version=self.completed, base=self.strategy.version, kind=kind)
        r = CloudRound(plan, by_edge, started=now, deadline=now + deadline_s, tag=tag,
                       declared={d: c.declared(d) for d in devices})
        self.open[rid] = r
        c.announce(plan, by_edge, tag)
        who = record.round_devices(by_edge, c.settings.metrics_devices)  # a large round: counts
        c.do(SetTimer(("deadline", plan.key), r.deadline),
             Emit("round_started", fields={"run": plan.run, "round": rid, "attempt": 0, **who,
                                           "group": group, "version": self.completed, "kind": kind}),
             Log("info", "group round start", {"round": rid, "group": group, "kind": kind,
                                               "version": self.completed, **who}))
        self.dirty = True

    # ------------------------------------------------------------------ deltas
    def on_update(self, ev: Received, msg: EdgeUpdate, now: float) -> None:
        c = self.cloud
        if not c.is_edge(ev.src):
            c.drop("not_an_edge", f"delta from {ev.src}, which is not a configured edge", ev.src)
            return
        r = self.open.get(msg.round)
        known = msg.run == c.settings.run and msg.round < self.next_round
        if r is not None and msg.run == c.settings.run and ev.src in r.edges:
            if not r.applied(msg) and not any(e == ev.src for e, _ in r.reports):
                try:
                    c.check_update(ev.src, msg, r)
                except ProtocolError as e:
                    c.drop(e.code, str(e), ev.src)
                    c.do(Ack(ev))
                    return
                r.add(ev.src, msg)
            c.do(Ack(ev))
            return
        if known and (msg.round, ev.src) not in self.applied:
            self.on_late_update(ev, msg, now)
            return
        if known:
            c.do(Ack(ev))  # a re-sent delta we already applied
        c.drop("wrong_round", f"delta from {ev.src} for {msg.run}/{msg.round}", ev.src)

    def on_late_update(self, ev: Received, msg: EdgeUpdate, now: float) -> None:
        """A delta for a group round that closed without it: mixed in as a stale update, not lost."""
        c = self.cloud
        tag = msg.tag
        c.do(Ack(ev))
        if self.phase != "groups" or tag is None or tag.kind != RoundKind.GROUP or not c.running \
                or self.completed >= c.settings.max_versions:
            c.drop("wrong_round", f"late delta from {ev.src} for round {msg.round}", ev.src)
            return
        try:
            delta = c.check_update(ev.src, msg, None)
        except ProtocolError as e:
            c.drop(e.code, str(e), ev.src)
            return
        self._remember(msg.round, ev.src)
        if delta is None:
            return
        r = CloudRound(c.plan(msg.round, 0), {ev.src: sorted(msg.reports)}, started=now, deadline=now, tag=tag)
        r.add(ev.src, msg)
        self._observe(r, now)
        self.submit(r, late=True, now=now)
        self.dirty = True

    def _remember(self, rid: int, edge: str) -> None:
        self.applied.append((rid, edge))
        del self.applied[:-APPLIED_MEMORY]

    # ------------------------------------------------------------------ closing a round
    def _observe(self, r: CloudRound, now: float) -> None:
        beta = float(self.cloud.settings.latency_ema)
        reports = r.device_reports()
        for d in r.devices:
            rep = reports.get(d)
            p = self.cloud.fleet.get(d)
            if rep is not None:
                obs = rep.t_download + rep.t_local + rep.t_upload
            elif p is not None and p.online:
                obs = now - r.started  # online but missed the round: at least this slow
            else:
                continue  # offline: no measurement
            old = self.latency.get(d)
            # Profiling rounds overwrite: the first includes every process's warm-up, not the device's speed.
            profile = r.tag is not None and r.tag.kind == RoundKind.PROFILE
            self.latency[d] = obs if old is None or profile else (1 - beta) * old + beta * obs

    def close(self, r: CloudRound, now: float) -> None:
        c = self.cloud
        self.open.pop(r.plan.round, None)
        self.dirty = True
        for e, _ in r.reports:
            self._remember(r.plan.round, e)
        self._observe(r, now)
        kind = r.tag.kind if r.tag else RoundKind.GROUP
        if kind == RoundKind.PROBE:
            c.do(Log("info", "probe done", {"round": r.plan.round, "devices": r.devices,
                                            "latency": {d: self.latency.get(d) for d in r.devices}}))
            self._place_after_probe(r)
            return
        updates = r.updates()
        if kind == RoundKind.PROFILE:
            if not updates:
                c.do(Emit("quorum_not_met", "warning", {"run": c.settings.run, "round": r.plan.round,
                                                        "reported": 0, "needed": 1, "attempt": 0,
                                                        "action": "retry"}))
                return
            new = apply_delta(c.global_state, mean_delta(updates))
            self.profiled += 1
            if self.profiled >= c.settings.profile_rounds:
                self.form_groups(r)
            self._version(r, new, staleness=0, late=False, now=now)
            return
        if not updates:
            c.do(Log("warning", "group round without updates", {"round": r.plan.round,
                                                                "group": r.tag.group if r.tag else None}))
            return
        self.submit(r, late=False, now=now)

    def submit(self, r: CloudRound, *, late: bool, now: float) -> None:
        c = self.cloud
        assert r.tag is not None
        updates = r.updates()
        group = r.tag.group
        client = r.devices[0] if self.grouping == Grouping.PER_CLIENT and r.devices else f"group-{group}"
        upd = Update(client=client, delta=mean_delta(updates), num_samples=sum(u.num_samples for u in updates),
                     base_version=r.tag.base, group=group)
        staleness = self.strategy.version - r.tag.base
        try:
            new, advanced = self.strategy.submit(c.global_state, upd)
        except UpdateRejected as e:
            c.drop("rejected", str(e))
            return
        self.group_versions[group] = self.group_versions.get(group, 0) + 1
        if not advanced:
            c.do(Metrics({"kind": "update", "run": c.settings.run, "version": self.completed, "group": group,
                          "round": r.plan.round, "staleness": staleness, "late": late,
                          "participants": sorted(r.device_reports()), "wall_s": round(c.elapsed(now), 3)}))
            return
        self._version(r, new, staleness=staleness, late=late, now=now)
        s = c.settings
        if self.grouping == Grouping.ECOFL and s.regroup_every > 0 and \
                self.completed - self.last_regroup >= s.regroup_every:
            self.regroup(reason="periodic")

    def _version(self, r: CloudRound, new: dict[str, np.ndarray], *, staleness: int, late: bool, now: float) -> None:
        c = self.cloud
        self.completed += 1
        # A profiling round's mean is applied in full (FedAvg), whatever the strategy's mixing rule.
        profile = r.tag is None or r.tag.kind == RoundKind.PROFILE
        mixing = 1.0 if profile else self.strategy.mixing_weight(staleness)
        reports = r.device_reports()
        entry = {
            "kind": "version", "run": c.settings.run, "version": self.completed,
            "group": r.tag.group if r.tag else PROFILE, "round": r.plan.round, "strategy": self.strategy.name,
            "staleness": staleness, "late": late, "base_version": r.tag.version if r.tag else 0,
            "alpha_t": None if mixing is None else round(float(mixing), 5), "participants": sorted(reports),
            "missing": sorted(set(r.devices) - set(reports)), "round_s": round(now - r.started, 3),
            "groups": self._groups_field(), "group_versions": {str(g): n for g, n in self.group_versions.items()},
            "devices": device_costs(reports, 0.0, r.edge_of(), {d: c.class_of(d) for d in reports}),
        }
        self.dirty = False
        c.commit(new, entry, now)

    # ------------------------------------------------------------------ groups
    def _profiles(self) -> dict[str, ClientProfile]:
        out = {}
        width = max((len(h) for h in self.labels.values() if h), default=0)
        for d, lat in sorted(self.latency.items()):
            h = self.labels.get(d)
            # Devices count the labels they hold; histograms of unequal length are padded with zeros.
            hist = None if h is None else np.pad(np.asarray(h, np.float64), (0, width - len(h)))
            out[d] = ClientProfile(d, lat, hist)
        return out

    def form_groups(self, r: CloudRound) -> None:
        s = self.cloud.settings
        profiles = self._profiles()
        names = sorted(profiles)
        if self.grouping == Grouping.PER_CLIENT:
            self.assign = {d: i for i, d in enumerate(names)}
        elif self.grouping == Grouping.ONE:
            self.assign = {d: 0 for d in names}
        elif self.grouping == Grouping.TIERS:
            self.assign = initial_groups(profiles, min(s.num_groups, len(names)))
        else:
            self.assign = form_groups(profiles, min(s.num_groups, len(names)), float(s.lam),
                                      seed=s.training.seed)
        self.strategy.set_groups(self.assign)
        self.phase = "groups"
        self.last_regroup = self.completed
        for d in r.devices:
            self.online_seen.setdefault(d, True)
        self.publish_groups(reason="profile", moves={})

    def num_groups(self) -> int:
        return max([g + 1 for g in self.assign.values()] + [1])

    def regroup(self, reason: str) -> None:
        if self.grouping != Grouping.ECOFL:
            return
        c = self.cloud
        self.last_regroup = self.completed
        new, moves = regroup(self.assign, self._profiles(), self.num_groups(), float(c.settings.lam))
        # Groups keep their ids while emptied, so that a round still open for one of them can be mixed in.
        self.strategy.set_groups({**{f"(group {g})": g for g in range(self.num_groups())}, **new})
        self.assign = new
        for d, g in new.items():
            if g == DROPPED:
                self.probe_due.add(d)
        self.dirty = True
        self.publish_groups(reason=reason, moves=moves)
        if moves:
            c.do(Emit("regrouped", fields={"run": c.settings.run, "version": self.completed, "reason": reason,
                                           "moves": moves, "groups": self._groups_field()}),
                 Log("info", "regrouped", {"version": self.completed, "moves": moves}))

    def _place_after_probe(self, r: CloudRound) -> None:
        for d in r.devices:
            if self.assign.get(d, DROPPED) == DROPPED and d in self.latency:
                if self.grouping == Grouping.TIERS:
                    self._place(d)
                else:
                    self.regroup(reason="probe")
                if self.assign.get(d, DROPPED) == DROPPED:
                    self.probe_due.add(d)

    def _groups_field(self) -> dict[str, list[str]]:
        return {str(g): ms for g, ms in self.groups().items()}

    def publish_groups(self, reason: str, moves: dict[str, str]) -> None:
        c = self.cloud
        c.do(Metrics({
            "kind": "groups", "run": c.settings.run, "version": self.completed, "strategy": self.strategy.name,
            "reason": reason, "groups": self._groups_field(),
            "dropped": sorted(d for d, g in self.assign.items() if g == DROPPED), "moves": moves,
            "latency": {d: round(v, 4) for d, v in sorted(self.latency.items())},
            "labels_shared": {d: self.labels.get(d) is not None for d in sorted(self.assign)},
        }))

