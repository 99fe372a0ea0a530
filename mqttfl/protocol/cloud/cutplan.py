"""Split-point planning at the cloud (``[cloud] plan_cuts``; docs/algorithms.md, "Split-point planning").

Devices and edges report profiles on the ``profile`` kind whenever the plan asks (``Plan.profile``): a device
before each round (its blocks measured once per model and batch size, again when its compute drifted; its link
to its edge probed every round), an edge in the first rounds of a model and batch size (the fastest of each
block). Before every round the cloud plans each device's cut with ``mqttfl.fl.split_plan`` from the latest
profiles: rho is the number of the round's devices at that edge that split (planned with all of them first,
then with those that split in that plan), the activation bytes come from the model's schema and the device's
act and grad encodings.

What wins over the planner: a device's own ``[device] cut``; a device class whose local model trains locally
(cut = end). A device without a profile (or whose edge has none yet) keeps the configured cut. [choice] A
planned cut changes only when the new one is predicted at least ``HYSTERESIS`` faster than the current one under
the same profiles, so measurement noise does not move cuts back and forth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mqttfl.fl.split_plan import Link, NodeProfile, batch_time, plan_cut
from mqttfl.protocol.messages import DeviceProfile, EdgeProfile
from mqttfl.protocol.plan import Plan, round_steps
from mqttfl.protocol.schema import ModelSchema

HYSTERESIS = 0.05
# Bytes per activation element on the wire, by tensor encoding (int8's scales are negligible).
ELEMENT_BYTES = {"none": 4.0, "fp16": 2.0, "int8": 1.0, "int8c": 1.0}


@dataclass
class CutPlanner:
    devices: dict[str, DeviceProfile] = field(default_factory=dict)
    edges: dict[str, EdgeProfile] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)  # the last planned cut of each device

    def on_profile(self, src: str, msg: EdgeProfile, schema: ModelSchema) -> str | None:
        """Keep a node's profile; why it is refused, or None."""
        if msg.fingerprint != schema.fingerprint:
            return f"profile of another model ({msg.fingerprint}, the run's is {schema.fingerprint})"
        if len(msg.block_s) != schema.n_blocks:
            return f"profile of {len(msg.block_s)} blocks, the model has {schema.n_blocks}"
        if not all(math.isfinite(t) for t in msg.block_s):
            return "profile times must be finite"
        if isinstance(msg, DeviceProfile):
            self.devices[src] = msg
        else:
            self.edges[src] = msg
        return None

    def plan(self, plan: Plan, by_edge: Mapping[str, list[str]], schema: ModelSchema, configured: Mapping[str, int],
             fixed: set[str], local_only: set[str], samples: Mapping[str, int],
             encodings: Mapping[str, Mapping[str, str]]) -> tuple[dict[str, int], dict[str, Any]]:
        """Each device's cut for this round and the report that goes on ``metrics``: per device its cut, why,
        the predicted time per mini-batch and per round, and the round's predicted time (the slowest planned
        device's)."""
        n = schema.n_blocks
        cuts: dict[str, int] = {}
        report: dict[str, Any] = {}
        for edge, devices in sorted(by_edge.items()):
            # rho counts the devices whose blocks the edge runs: [choice] plan with all of them first, then
            # again with those that split in that plan (a device training locally leaves the edge alone).
            rho = float(len(devices))
            trial = self._plan_edge(plan, edge, devices, schema, configured, fixed, local_only, samples, encodings,
                                    rho, commit=False)
            rho = float(max(1, sum(1 for d in devices if trial[0][d] < n)))
            edge_cuts, edge_report = self._plan_edge(plan, edge, devices, schema, configured, fixed, local_only,
                                                     samples, encodings, rho, commit=True)
            cuts.update(edge_cuts)
            report.update(edge_report)
        predicted = [e["predicted_s"] for e in report.values() if "predicted_s" in e]
        return cuts, {"devices": report, "predicted_round_s": max(predicted) if predicted else None}

    def _plan_edge(self, plan: Plan, edge: str, devices: list[str], schema: ModelSchema,
                   configured: Mapping[str, int], fixed: set[str], local_only: set[str], samples: Mapping[str, int],
                   encodings: Mapping[str, Mapping[str, str]], rho: float, *, commit: bool
                   ) -> tuple[dict[str, int], dict[str, Any]]:
        """The cuts of one edge's devices when ``rho`` of them share it; ``commit`` keeps them as current."""
        n = schema.n_blocks
        cuts: dict[str, int] = {}
        report: dict[str, Any] = {}
        ep = self.edges.get(edge)
        for d in sorted(devices):
            cut, why, choice = configured[d], "no_profile", None
            dp = self.devices.get(d)
            measured = None  # (profile, link, activation bytes) when this device can be planned
            if dp is not None and ep is not None and dp.batch_size == plan.batch_size == ep.batch_size \
                    and dp.edge == edge and dp.bandwidth > 0:
                enc = {"act": plan.act_encoding, "grad": plan.grad_encoding, **encodings.get(d, {})}
                per = (ELEMENT_BYTES.get(enc["act"], 4.0) + ELEMENT_BYTES.get(enc["grad"], 4.0)) / 2
                acts = [per * plan.batch_size * math.prod(schema.activation(c)) for c in range(1, n)]
                measured = (NodeProfile(tuple(dp.block_s), tuple(dp.block_bytes), dp.batch_size),
                            Link(dp.bandwidth, dp.latency_s), acts)
            if d in fixed:
                why = "configured"
            elif d in local_only:
                cut, why = n, "class"
            elif measured is not None and dp is not None and ep is not None:
                profile, link, acts = measured
                choice = plan_cut(profile, ep.block_s, acts, link, rho=rho, memory_limit=dp.memory_limit)
                if choice is None:
                    why = "no_cut_fits_memory"
                else:
                    why, cut = "planned", choice.cut
                    previous = self.current.get(d)
                    if previous is not None and previous != cut and 1 <= previous <= n:
                        kept = batch_time(previous, profile, ep.block_s, acts, link, rho)
                        fits = not dp.memory_limit or kept.memory <= dp.memory_limit
                        if fits and choice.batch_s >= (1 - HYSTERESIS) * kept.batch_s:
                            cut, why = previous, "kept"
                    if commit:
                        self.current[d] = cut
            cuts[d] = cut
            entry: dict[str, Any] = {"cut": cut, "why": why, "edge": edge, "rho": rho}
            if measured is not None and ep is not None:
                profile, link, acts = measured
                at = batch_time(cut, profile, ep.block_s, acts, link, rho)
                steps = round_steps(samples.get(d, 0), plan)
                entry.update(batch_s=round(at.batch_s, 6), predicted_s=round(steps * at.batch_s, 4),
                             device_s=round(at.device_s, 6), link_s=round(at.link_s, 6),
                             edge_s=round(at.edge_s, 6), memory=at.memory)
            report[d] = entry
        return cuts, report
