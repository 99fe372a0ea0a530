"""Federated evaluation (``[cloud] fed_eval_every``): devices evaluate the global model on their own held-out
split, and the cloud reports the sample-weighted result beside its central one (docs/operations.md, "Metrics").

After the round it is due for is committed, the cloud sends the global model to each edge with the devices that
advertise ``eval_samples`` (``model/eval``); each edge passes it to those devices (``model/evaluate``); each
device evaluates it and reports its metrics and sample count straight to the cloud (``delta/eval``, reliable).
The evaluation closes when every asked device answered or at the round deadline. Every metric of the task is a
mean over samples, so the weighted mean over devices equals the metric over the union of their held-out splits.
No round starts while an evaluation is open. An evaluation in progress is not persisted: a restarted cloud skips
it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mqttfl.protocol.events import Ack, Emit, Log, Metrics, Received, RunLog, Send, SetTimer
from mqttfl.protocol.messages import EvalReport, OpenEval
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.status import Presence


@dataclass
class FederatedEval:
    plan: Plan  # the plan of the round whose global model is evaluated
    expected: dict[str, str]  # device -> edge
    deadline: float
    started: float
    reports: dict[str, EvalReport] = field(default_factory=dict)

    def done(self, now: float) -> bool:
        return set(self.expected) <= set(self.reports) or now >= self.deadline


def due(round: int, every: int, rounds: int) -> bool:
    """Whether federated evaluation follows ``round`` (0-based): every ``every`` rounds and after the last."""
    return every > 0 and ((round + 1) % every == 0 or round + 1 >= rounds)


def open_eval(plan: Plan, devices: dict[str, Presence], state: dict[str, Any], schema: Any,
              now: float) -> tuple[FederatedEval, list[Any]]:
    """The evaluation of ``plan.round``'s model by ``devices``, and the effects that ask their edges for it."""
    by_edge: dict[str, list[str]] = {}
    for d, p in sorted(devices.items()):
        by_edge.setdefault(str(p.edge), []).append(d)
    ev = FederatedEval(plan, {d: str(p.edge) for d, p in devices.items()}, now + plan.deadline_s, now)
    effects: list[Any] = [Send(edge, OpenEval(run=plan.run, round=plan.round, plan=plan, devices=tuple(devs),
                                              state=state, schema=schema)) for edge, devs in by_edge.items()]
    effects += [SetTimer(("fed_eval", plan.key), ev.deadline),
                Emit("evaluation_started", fields={"run": plan.run, "round": plan.round, "devices": sorted(devices)})]
    return ev, effects


def on_report(ev: FederatedEval | None, rcv: Received, msg: EvalReport) -> tuple[list[Any], str | None]:
    """Record a device's report (effects), or why it is dropped. A report of another or a finished evaluation is
    acknowledged, so the device stops re-sending it."""
    if ev is None or msg.run != ev.plan.run or msg.round != ev.plan.round:
        return [Ack(rcv)], f"evaluation report from {rcv.src} for {msg.run}/{msg.round}"
    if rcv.src not in ev.expected:
        return [], f"evaluation report from {rcv.src}, which was not asked"
    ev.reports.setdefault(rcv.src, msg)
    return [Ack(rcv)], None


def close(ev: FederatedEval, now: float) -> dict[str, Any]:
    """The ``federated_eval`` entry: per device n and metrics, and the sample-weighted mean of every metric."""
    n = sum(r.n for r in ev.reports.values())
    names = set.intersection(*(set(r.metrics) for r in ev.reports.values())) if ev.reports else set()
    entry: dict[str, Any] = {
        "kind": "federated_eval", "run": ev.plan.run, "round": ev.plan.round, "n": n,
        "devices": {d: {"n": r.n, **{k: round(v, 5) for k, v in r.metrics.items()}}
                    for d, r in sorted(ev.reports.items())},
        "missing": sorted(set(ev.expected) - set(ev.reports)), "eval_s": round(now - ev.started, 3)}
    for name in sorted(names):
        entry[name] = round(sum(r.n * r.metrics[name] for r in ev.reports.values()) / n, 5)
    return entry


def publish(entry: dict[str, Any]) -> list[Any]:
    summary = {k: v for k, v in entry.items() if k not in ("devices", "kind")}
    return [Metrics(entry), RunLog(entry), Log("info", "federated evaluation done", summary)]
