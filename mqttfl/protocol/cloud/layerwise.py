"""FedLAMA at the cloud (docs/algorithms.md, "FedLAMA"): which layers each synchronous round aggregates.

The schedule (``mqttfl.fl.fedlama``) counts in rounds: tau' is one round of local training, a relaxed layer is
aggregated every phi rounds. Every plan carries the current intervals, so devices and edges know which layers
are due at the end of the round (``Plan.due``) and send only those. After a round the cloud measures each
aggregated layer's discrepancy and, at the end of each window of phi rounds, re-plans the intervals.

The discrepancy needs ``sum_i n_i |x_i - u|^2``; edges send ``sum_i n_i |delta_i|^2`` per layer (``sqnorms``), and
with the mean delta ``d`` the cloud gets ``sum_i n_i |delta_i - d|^2 = sum_i n_i |delta_i|^2 - N |d|^2``.
[choice] Weighted by samples, like FedAvg; the paper's mean over clients is the same with equal shards.

Downloads are partial too: an edge that reported in the last completed round keeps a copy of the global model,
so it gets only the layers that round aggregated; any other edge gets the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mqttfl.fl.fedlama import FedLAMA
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import ModelSchema


class LayerWise:
    def __init__(self, schema: ModelSchema, phi: int, warmup: int) -> None:
        self.shapes = {k: s.shape for k, s in schema.specs().items()}
        self.sched = FedLAMA(self.shapes, tau=1, phi=phi, warmup_windows=warmup)
        self.synced: list[str] | None = None  # layers the last completed round aggregated
        self.edges: set[str] = set()  # edges that reported devices in it
        self.syncs: dict[str, int] = dict.fromkeys(self.shapes, 0)  # aggregations per layer so far

    def plan_fields(self) -> dict[str, Any]:
        relaxed = tuple(sorted((k, t) for k, t in self.sched.intervals.items() if t != 1))
        return {"fedlama": True, "intervals": relaxed}

    def due(self, round: int) -> list[str]:
        """The layers aggregated at the end of ``round`` (what every update of that round must carry)."""
        return self.sched.due(round + 1)

    def partial(self, edges: Iterable[str]) -> dict[str, list[str]]:
        """Edges that get only the layers aggregated last round (the others get the whole model)."""
        if self.synced is None:
            return {}
        return {e: list(self.synced) for e in edges if e in self.edges}

    def closed(self, plan: Plan, mean: Mapping[str, np.ndarray], sqnorms: Mapping[str, float], samples: int,
               edges: Iterable[str]) -> dict[str, Any]:
        """After a round: measure the aggregated layers, re-plan at a window's end; the round's report."""
        keys = list(mean)
        discrepancy = {}
        for k in keys:
            d = np.asarray(mean[k], np.float64)
            spread = max(0.0, sqnorms.get(k, 0.0) / max(samples, 1) - float(np.sum(d * d)))
            discrepancy[k] = spread / (self.sched.intervals[k] * max(1, d.size))
            self.sched.observe(k, discrepancy[k])
            self.syncs[k] += 1
        adjusted = self.sched.after_step(plan.round + 1)
        self.synced, self.edges = keys, set(edges)
        dims = {k: int(np.prod(s)) for k, s in self.shapes.items()}
        return {"phi": self.sched.phi, "synced": len(keys), "layers": len(self.shapes), "adjusted": adjusted,
                "elements_synced": sum(dims[k] for k in keys), "elements_total": sum(dims.values()),
                "intervals": {k: self.sched.intervals[k] for k in self.sched.relaxed()},
                "traffic_ratio": round(self.sched.traffic_ratio(), 6),
                "discrepancy": {k: float(f"{v:.6g}") for k, v in discrepancy.items()},
                "layer_syncs": dict(self.syncs)}

    def state_dict(self) -> dict[str, Any]:
        return {"sched": self.sched.state_dict(), "synced": self.synced, "edges": sorted(self.edges),
                "syncs": dict(self.syncs)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.sched.load_state_dict(d["sched"])
        self.synced = None if d["synced"] is None else [str(k) for k in d["synced"]]
        self.edges = {str(e) for e in d["edges"]}
        self.syncs = {k: int(d["syncs"].get(k, 0)) for k in self.shapes}
