"""Synchronous rounds (``[cloud] mode = "sync"``): a strategy across edges with deadline, quorum and retries.

Each round: take the online devices whose edge is online (the first round of a run may wait for named
devices, ``CloudMachine.may_begin``), sample the ones that train (``sample_fraction`` or ``sample_size``,
seeded by the run's seed, the round and its attempt), announce the round to their edges with the global model,
wait until every device is reported done or missing (or the deadline passes), check the quorum, apply the
strategy to the edges' updates, and commit the new model. Below quorum the round is retried as a new attempt
with the same model, up to ``max_attempts`` times, then the run fails. A restarted cloud opens a new attempt of
the round it was in: devices that finished the old attempt recognise a new plan key and train again instead of
ignoring a re-delivered announcement.

The plan carries what the strategy asks of local training (FedProx's ``prox_mu``) and of the edges (whether they
may pre-aggregate), and under FedLAMA (``fedlama_phi``) the layers' intervals (``layerwise.LayerWise``). With
``plan_cuts`` it asks devices and edges for profiles, and each round's cuts are planned from the latest ones
(``cutplan.CutPlanner``); the plan and its predicted times go into the round's metrics (``cut_plan``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mqttfl.fl.sampling import sample_clients
from mqttfl.fl.strategies import RoundInfo, UpdateRejected, make_strategy, mean_delta
from mqttfl.protocol.cloud import record
from mqttfl.protocol.cloud.context import Cloud, quorum_needed
from mqttfl.protocol.cloud.layerwise import LayerWise
from mqttfl.protocol.cloud.rounds import CloudRound, device_costs
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import Ack, Emit, Log, Received, Send, SetTimer
from mqttfl.protocol.messages import EdgeUpdate, OpenRound, Restart
from mqttfl.protocol.status import Presence


class SyncRounds:
    def __init__(self, cloud: Cloud, saved: dict[str, Any] | None) -> None:
        self.cloud = cloud
        self.strategy = make_strategy(cloud.settings.strategy_name, cloud.settings.params)
        self.strategy.buffers = frozenset(k for k, s in cloud.schema.specs().items() if not s.trainable)
        phi = cloud.settings.fedlama_phi
        self.lama = LayerWise(cloud.schema, phi, cloud.settings.fedlama_warmup) if phi else None
        self.completed = 0  # rounds completed
        self.attempt = 0
        self.failures = 0  # quorum misses of the current round
        self.current: CloudRound | None = None
        self.cut_plan: dict[str, Any] = {}  # the current round's planned cuts and predicted times
        self.last_cuts: dict[str, int] = {}  # each device's cut in the last round it was planned for
        if saved:
            self.completed = int(saved["round"])
            # The round in flight at the crash starts over as a new attempt.
            self.attempt = int(saved.get("attempt", 0)) + 1
            self.failures = int(saved.get("failures", 0))
            if saved.get("strategy"):
                self.strategy.load_state_dict(saved["strategy"])
            if self.lama is not None and saved.get("fedlama"):
                self.lama.load_state_dict(saved["fedlama"])

    def state_dict(self, now: float) -> dict[str, Any]:
        return {"round": self.completed, "attempt": self.attempt, "failures": self.failures,
                "strategy": self.strategy.state_dict(),
                "fedlama": self.lama.state_dict() if self.lama is not None else None}

    def status(self) -> dict[str, Any]:
        return {"mode": "sync", "strategy": self.strategy.name, "attempt": self.attempt}

    def status_fields(self) -> dict[str, Any]:
        return {"attempt": self.attempt}

    def busy(self) -> bool:
        return self.current is not None

    def on_status(self, p: Presence, was: Presence | None) -> None:
        r = self.current
        if r is not None and p.refuses(r.plan.run):
            # A node that refused this run's plan will not report: count its devices missing now, so the round
            # closes with the others instead of at its deadline.
            r.give_up([p.node] if p.role == "device" else r.edges.get(p.node, []))

    def on_start(self) -> None:
        self.attempt += 1  # a fresh plan key: devices never mistake it for a round they already finished
        self.failures = 0

    def on_stop(self) -> None:
        self.current = None  # late deltas of the abandoned round are acknowledged and dropped

    # ------------------------------------------------------------------ rounds
    def progress(self, now: float) -> None:
        c = self.cloud
        r = self.current
        if r is not None:
            if r.done(now):
                self.close(now)
            return
        if not c.running:
            return
        if self.completed >= c.settings.rounds:
            c.complete(now)
            return
        devices = c.eligible()
        if len(devices) >= c.settings.min_devices and (self.completed > 0 or c.may_begin(devices, now)):
            self.start(devices, now)

    def start(self, devices: Mapping[str, Presence], now: float) -> None:
        c = self.cloud
        s = c.settings
        plan = c.plan(self.completed, self.attempt, prox_mu=self.strategy.prox_mu,
                      preaggregate=self.strategy.preaggregate, profile=s.plan_cuts,
                      probe_every=s.probe_every,
                      **(self.lama.plan_fields() if self.lama else {}))
        sampled = sample_clients(devices, fraction=s.sample_fraction, size=s.sample_size, seed=s.training.seed,
                                 round=plan.round, attempt=plan.attempt)
        by_edge: dict[str, list[str]] = {}
        for d in sampled:
            by_edge.setdefault(str(devices[d].edge), []).append(d)
        cuts: dict[str, int] = {}
        if s.plan_cuts:
            cuts, self.cut_plan = c.plan_cuts(plan, by_edge)
            changed = {d: [self.last_cuts[d], cut] for d, cut in cuts.items()
                       if d in self.last_cuts and self.last_cuts[d] != cut}
            self.last_cuts.update(cuts)
            if changed:
                c.do(Emit("cuts_planned", fields={"run": plan.run, "round": plan.round, "changed": changed,
                                                  "predicted_round_s": self.cut_plan.get("predicted_round_s")}))
        self.current = CloudRound(plan, by_edge, started=now, deadline=now + plan.deadline_s,
                                  eligible=len(devices), declared={d: c.declared(d) for d in sampled}, cuts=cuts)
        # This attempt is on disk before it is announced: a cloud restarted during the round opens the next
        # attempt, never this one again (devices ignore the announcement of an attempt they finished).
        c.persist(now)
        c.announce(plan, by_edge, partial=self.lama.partial(by_edge) if self.lama else None, cuts=cuts)
        c.do(SetTimer(("deadline", plan.key), self.current.deadline))
        c.publish_status()
        who = record.round_devices(by_edge, s.metrics_devices, sampled=True)  # a large round: counts
        c.do(Emit("round_started", fields={"run": plan.run, "round": plan.round, "attempt": plan.attempt, **who,
                                           "eligible": len(devices), "lr": plan.lr}),
             Log("info", "round start", {"round": plan.round, "attempt": plan.attempt, **who}))

    def on_update(self, ev: Received, msg: EdgeUpdate, now: float) -> None:
        c = self.cloud
        r = self.current
        if not c.is_edge(ev.src):
            # Only configured edges report; a node's own claim to be one counts for nothing ("Trust").
            c.drop("not_an_edge", f"delta from {ev.src}, which is not a configured edge", ev.src)
            return
        if r is None or msg.run != r.plan.run or msg.round != r.plan.round or msg.attempt != r.plan.attempt:
            if r is None or msg.round <= self.completed or msg.run != c.settings.run:
                c.do(Ack(ev))  # stale re-send: acknowledge so the edge stops, apply nothing
            c.drop("wrong_round", f"delta from {ev.src} for {msg.run}/{msg.round}", ev.src)
            return
        if r.applied(msg):
            c.do(Ack(ev))  # these devices were already applied from an earlier report
            return
        try:
            c.check_update(ev.src, msg, r, keys=self.lama.due(r.plan.round) if self.lama is not None else None)
            if msg.deltas and r.plan.preaggregate:
                raise ProtocolError("bad_field", "per-device deltas in a round whose strategy pre-aggregates")
            if not msg.deltas and not r.plan.preaggregate and msg.samples > 0:
                # A robust rule must see every device: a mean would hide a poisoning one.
                raise ProtocolError("bad_field", "a pre-aggregated delta in a round whose strategy needs each device's")
        except ProtocolError as e:
            c.drop(e.code, str(e), ev.src)
            c.do(Ack(ev))  # refused for good: the same bytes again would be refused again
            return
        r.add(ev.src, msg)
        c.do(Ack(ev))

    def close(self, now: float) -> None:
        c = self.cloud
        r = self.current
        assert r is not None
        self.current = None
        reports = r.device_reports()
        needed = quorum_needed(c.settings.quorum, len(r.expected))
        try:
            updates = r.updates(c.schema.specs())
        except ProtocolError as e:
            c.drop(e.code, str(e))
            updates = []
        if len(reports) < needed or not updates:
            self._retry(r, len(reports), needed, now)
            return
        population = sum(1 for p in c.fleet.values() if p.role == "device")
        info = RoundInfo(expected=len(r.expected), population=max(population, len(r.expected)))
        try:
            new = self.strategy.aggregate(c.global_state, updates, info)
        except ProtocolError as e:  # a masked update that does not unpack (checked when it came in)
            c.drop(e.code, str(e))
            self._retry(r, len(reports), needed, now)
            return
        except UpdateRejected as e:
            c.drop("rejected", str(e))
            self._retry(r, len(reports), needed, now)
            return
        self.completed += 1
        self.attempt = 0
        self.failures = 0
        entry = {
            "kind": "round", "run": r.plan.run, "round": r.plan.round, "attempt": r.plan.attempt,
            "strategy": self.strategy.name, "participants": len(reports), "missing": sorted(r.expected - set(reports)),
            "sampled": r.devices, "eligible": r.eligible, "lr": r.plan.lr,
            "round_s": round(now - r.started, 3),
            "bytes_up": sum(rep.bytes_up for rep in reports.values()),
            "bytes_down": sum(rep.bytes_down for rep in reports.values()),
            "devices": device_costs(reports, 0.0, r.edge_of(), {d: c.class_of(d) for d in reports}),
        }
        if r.cuts:
            entry["cut_plan"] = self.cut_plan
        if self.strategy.last_report:
            entry["aggregation"] = dict(self.strategy.last_report)
        if self.lama is not None:
            entry["fedlama"] = self.lama.closed(r.plan, mean_delta(updates), r.sqnorms(),
                                                sum(u.num_samples for u in updates),
                                                {e for e, u in r.reports if u.reports})
        c.commit(new, entry, now)

    def _retry(self, r: CloudRound, reported: int, needed: int, now: float) -> None:
        c = self.cloud
        self.attempt += 1
        self.failures += 1  # quorum misses only: attempts started by a cloud restart do not count
        failed = self.failures >= c.settings.max_attempts
        c.do(Emit("quorum_not_met", "error" if failed else "warning", {
            "run": r.plan.run, "round": r.plan.round, "reported": reported, "needed": needed,
            "attempt": r.plan.attempt, "action": "fail" if failed else "retry"}))
        if failed:
            c.fail(now, f"round {r.plan.round}: quorum not met in {self.failures} attempts")
        else:
            # The next attempt's number is on disk before it is announced: after a crash the cloud opens a
            # fresh attempt, never one that devices may already have finished.
            c.persist(now)

    def on_restart(self, ev: Received, msg: Restart, now: float) -> None:
        """Migration fallback: the device's source edge is gone with its edge-side state. Restart the device's
        part of the round at its new edge from the round's global model."""
        c = self.cloud
        r = self.current
        if r is None or msg.run != r.plan.run or msg.round != r.plan.round or ev.src not in r.expected:
            c.drop("wrong_round", f"restart request from {ev.src} for round {msg.round}", ev.src)
            return
        if not c.may_use(ev.src, msg.edge):
            c.drop("unknown_node", f"restart at {msg.edge!r}, not an edge {ev.src} may use", ev.src)
            return
        r.move(ev.src, msg.edge)
        enc = c.encodings_for(ev.src)
        local = c.local_for(ev.src)
        c.do(Send(msg.edge, OpenRound(run=r.plan.run, round=r.plan.round, plan=r.plan,
                                      cuts={ev.src: r.cuts.get(ev.src) or c.cut_for(ev.src)},
                                      samples={ev.src: r.declared.get(ev.src, c.declared(ev.src))},
                                      state=c.global_state, encodings={ev.src: enc} if enc else {},
                                      locals={ev.src: local} if local is not None else {},
                                      schema=c.schema.describe(), chains=c.chains_for([ev.src])),
                  encoding=r.plan.model_encoding))
        c.do(Emit("round_restarted_for_device", "warning", {"device": ev.src, "edge": msg.edge,
                                                            "round": r.plan.round, "source": msg.source}))

