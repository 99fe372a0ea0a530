"""One open round at the cloud: who takes part (by edge), what the edges reported, when it closes.

Shared by both round policies (docs/design.md, "Cloud"): a synchronous round, and each group's round in
asynchronous mode. Accounting is per device, not per edge: a device that moved mid-round is reported by its
new edge, and a round closes when every device is reported done or missing, or at its deadline.

Memory and time per report are independent of the fleet's size: when the round's rule is linear
(``plan.preaggregate``) an edge's mean delta is folded into a running mean as it arrives and dropped
(``mqttfl.fl.streaming``), and who is expected, accounted for and reported is kept in sets updated per report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mqttfl.fl.strategies import Update
from mqttfl.fl.streaming import RunningMean
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.hetero import DEFAULT_CLASS, DeviceClass, expand
from mqttfl.protocol.messages import EdgeUpdate, Report, RoundTag
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import TensorSpec
from mqttfl.protocol.status import Presence


@dataclass
class CloudRound:
    plan: Plan
    edges: dict[str, list[str]]  # edge -> its participating devices
    started: float
    deadline: float
    tag: RoundTag | None = None  # asynchronous groups: kind, group, base versions
    # One entry per edge report. An edge may report twice in one round when a device migrated to it after it
    # had already reported its own devices.
    reports: list[tuple[str, EdgeUpdate]] = field(default_factory=list)
    accounted: set[str] = field(default_factory=set)  # devices some edge reported done or missing
    eligible: int = 0  # devices that could have taken part (client sampling picked the round's devices from these)
    declared: dict[str, int] = field(default_factory=dict)  # device -> samples it declared when it joined
    cuts: dict[str, int] = field(default_factory=dict)  # device -> its cut this round (planned or configured)
    mean: RunningMean | None = None  # the edges' mean deltas folded in so far (a linear rule)
    _expected: set[str] = field(default_factory=set)
    _where: dict[str, str] = field(default_factory=dict)  # device -> the edge it is assigned to now
    _reported: set[str] = field(default_factory=set)  # devices some report counted as done

    def __post_init__(self) -> None:
        self._index()

    def _index(self) -> None:
        self._where = {d: e for e, ds in self.edges.items() for d in ds}
        self._expected = set(self._where)

    @property
    def expected(self) -> set[str]:
        return self._expected

    @property
    def devices(self) -> list[str]:
        return sorted(self._expected)

    def done(self, now: float) -> bool:
        return len(self.accounted) >= len(self._expected) or now >= self.deadline

    def move(self, device: str, edge: str) -> None:
        for ds in self.edges.values():
            if device in ds:
                ds.remove(device)
        self.edges.setdefault(edge, []).append(device)
        self._index()
        self.accounted.discard(device)

    def give_up(self, devices: list[str]) -> None:
        """These devices will not report (they refused the run): they count as missing at once."""
        self.accounted |= set(devices) & self._expected

    def may_report(self, device: str, edge: str, presence: Presence | None) -> bool:
        """A device of this round, reported by the edge it was announced at, or by the one its own status says it
        moved to during the round (a migration the cloud hears of from the device, never from an edge)."""
        if device not in self._expected:
            return False
        return self._where.get(device) == edge or (presence is not None and presence.edge == edge)

    def applied(self, update: EdgeUpdate) -> bool:
        """Whether some device of this report was already counted from an earlier report."""
        return any(d in self._reported for d in update.reports)

    def add(self, edge: str, update: EdgeUpdate) -> None:
        if self.plan.preaggregate and not update.deltas and not update.coverage and update.delta \
                and update.samples > 0:
            # A linear rule: fold the edge's mean in now and keep only its reports (mqttfl.fl.streaming).
            if self.mean is None:
                self.mean = RunningMean()
            # As float32, as check_state reads it: edges on different delta encodings still fold together.
            self.mean.add({k: np.asarray(v, dtype=np.float32) for k, v in update.delta.items()}, float(update.samples))
            update = replace(update, delta={})
        self.reports.append((edge, update))
        self._reported |= set(update.reports)
        # "Missing" counts only from the edge the device is assigned to now: after a restart elsewhere, the
        # old edge's timed-out session must not close the round before the device reports from its new edge.
        missing = {d for d in update.missing if self._where.get(d) == edge}
        self.accounted |= (set(update.reports) | missing) & self._expected

    def updates(self, specs: Mapping[str, TensorSpec] | None = None) -> list[Update]:
        """The running mean of the edges' mean deltas as one update weighing their samples (a linear rule), one
        update per edge report that carries a mean delta (an edge's samples weigh its devices' mean), or one per
        device when the edge forwarded each device's delta. Updates that cover part of the model (docs/
        algorithms.md, "Heterogeneous devices") carry their masks: a device's, unpacked against ``specs``, or an
        edge's coverage as a share of its samples; they are never folded into the running mean."""
        out = []
        if self.mean is not None and self.mean.weight > 0:
            out.append(Update("edges", self.mean.mean(), int(self.mean.weight)))
        for edge, u in self.reports:
            if u.deltas:
                for d in sorted(u.deltas):
                    delta, masks = u.deltas[d], None
                    if u.masks.get(d):
                        if specs is None:
                            raise ProtocolError("bad_field", "masked deltas need the model's schema")
                        delta, masks = expand(delta, u.masks[d], specs, f"delta of {d}")
                    out.append(Update(d, delta, u.reports[d].samples, steps=u.reports[d].steps, mask=masks))
            elif u.delta and u.samples > 0:
                share = {k: np.asarray(c, np.float64) / u.samples for k, c in u.coverage.items()}
                out.append(Update(edge, u.delta, u.samples, mask=share or None))
        return out

    def sqnorms(self) -> dict[str, float]:
        """FedLAMA: per layer, sum over every reported device of samples * |delta|^2."""
        out: dict[str, float] = {}
        for _, u in self.reports:
            for k, v in u.sqnorms.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def device_reports(self) -> dict[str, Report]:
        return {d: rep for _, u in self.reports for d, rep in u.reports.items()}

    def edge_of(self) -> dict[str, str]:
        return {d: e for e, u in self.reports for d in u.reports}

    def to_saved(self, now: float) -> dict[str, Any]:
        return {"plan": self.plan.to_body(), "edges": self.edges, "elapsed": now - self.started,
                "remaining": max(0.0, self.deadline - now), "tag": self.tag.to_body() if self.tag else None,
                "declared": dict(self.declared), "cuts": dict(self.cuts)}

    @classmethod
    def from_saved(cls, d: dict[str, Any], now: float, grace_s: float = 1.0) -> CloudRound:
        return cls(Plan.from_body(d["plan"]), {str(e): [str(x) for x in ds] for e, ds in d["edges"].items()},
                   started=now - float(d["elapsed"]), deadline=now + float(d["remaining"]) + grace_s,
                   tag=RoundTag.from_body(d.get("tag")),
                   declared={str(k): int(v) for k, v in d.get("declared", {}).items()},
                   cuts={str(k): int(v) for k, v in d.get("cuts", {}).items()})


def device_costs(reports: dict[str, Report], t_global: float, edge_of: dict[str, str],
                 classes: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per device and round: the heterogeneous-IoT cost model's T_local, T_upload, T_global, T_download, bytes
    up and down and peak memory, plus what the device did and its class (docs/operations.md, "Metrics")."""
    return {d: {
        "T_local": round(rep.t_local, 4), "T_total": round(rep.t_total or rep.t_local, 4),
        "T_upload": round(rep.t_upload, 4), "T_global": round(t_global, 4), "T_download": round(rep.t_download, 4),
        "bytes_up": rep.bytes_up, "bytes_down": rep.bytes_down, "peak_rss_mb": rep.peak_rss_mb,
        "samples": rep.samples, "cut": rep.cut, "resends": rep.resends, "steps": rep.steps,
        "edge_steps": rep.edge_steps, "seen": rep.seen, "edge": edge_of.get(d), "cpu_s": rep.cpu_s,
        "energy_j": rep.energy_j, "train_mem_mb": rep.train_mem_mb, "cutoff": rep.cutoff,
        "class": (classes or {}).get(d, DEFAULT_CLASS), **({"stages": rep.stages} if rep.stages else {}),
    } for d, rep in sorted(reports.items())}


COST_TIMES = ("T_local", "T_upload", "T_global", "T_download")


def class_costs(devices: Mapping[str, Mapping[str, Any]], classes: Mapping[str, DeviceClass]
                ) -> dict[str, dict[str, Any]]:
    """The round's costs per device class (the heterogeneous-IoT paper's eq. 1, T = T_local + T_upload + T_global
    + T_download): mean and max of each time and of T, bytes, the largest peak and training memory, and energy
    (the boards' sensor readings, else CPU time x the class's power_w; null when neither)."""
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for costs in devices.values():
        by_class.setdefault(str(costs.get("class", DEFAULT_CLASS)), []).append(costs)
    out: dict[str, dict[str, Any]] = {}
    for name, rows in sorted(by_class.items()):
        power = classes[name].power_w if name in classes else 0.0
        totals = [sum(float(r.get(k, 0.0)) for k in COST_TIMES) for r in rows]
        energy = [float(r.get("energy_j") or 0.0) or float(r.get("cpu_s", 0.0)) * power for r in rows]
        entry: dict[str, Any] = {"devices": len(rows)}
        for k in COST_TIMES:
            values = [float(r.get(k, 0.0)) for r in rows]
            entry[k] = round(sum(values) / len(values), 4)
            entry[f"{k}_max"] = round(max(values), 4)
        entry.update(
            T=round(sum(totals) / len(totals), 4), T_max=round(max(totals), 4),
            bytes_up=sum(int(r.get("bytes_up", 0)) for r in rows),
            bytes_down=sum(int(r.get("bytes_down", 0)) for r in rows),
            peak_rss_mb=max(float(r.get("peak_rss_mb", 0.0)) for r in rows),
            train_mem_mb=max(float(r.get("train_mem_mb", 0.0)) for r in rows),
            cpu_s=round(sum(float(r.get("cpu_s", 0.0)) for r in rows), 4),
            energy_j=round(sum(energy), 3) if any(energy) else None,
            samples=sum(int(r.get("samples", 0)) for r in rows), seen=sum(int(r.get("seen", 0)) for r in rows),
            cutoffs=sum(int(r.get("cutoff", 0)) for r in rows))
        out[name] = entry
    return out
