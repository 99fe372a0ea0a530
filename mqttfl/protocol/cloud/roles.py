"""Who is what in a fleet, as the cloud's configuration says: roles come from authorisation, never from a
node's own words (docs/design.md, "Trust").

The broker authenticates who sent a message (the topic's sender level); it cannot say what that node is.
A node's retained status carries a ``role`` and, for a device, the edge it uses: the node's own word. The
cloud therefore takes the edges from ``[cloud] edges`` and, optionally, the devices and the edges each may
use from ``[cloud] devices``. A status whose role disagrees is reported (``role_refused``) and ignored; an
edge that is not configured is never sent a round nor heard for a delta; a device attached to an edge it may
not use is left out of rounds. Without a ``devices`` table any other node may enrol as a device (open
enrolment): it can only ever report for itself, through a configured edge, with the sample count it declared
when it joined (``max_samples`` caps that).

``[cloud] chains`` names, per device, the helpers it may pipeline its blocks across (Eco-FL; docs/design.md,
"Pipeline"): a helper is a device agent with ``[device] serve``; it need not be a device that trains its own data.

These keys are read from the config file at every start and are not part of a run's persisted settings: an
operator who adds an edge restarts the cloud and the edge counts at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mqttfl.wire.topics import TopicError, validate_id

ROLE_KEYS = ("edges", "devices", "chains")


@dataclass(frozen=True)
class Roles:
    edges: tuple[str, ...] = field(default=(), metadata={"doc": (
        "node ids of the edges this cloud trusts (required): only these are sent rounds and heard for deltas; "
        "a node that only says it is an edge is reported and ignored")})
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict, metadata={"doc": (
        "optional table device = edge or [edges]: only these devices join rounds, each only through the edges "
        "listed ([] or \"*\": any configured edge); empty: any other node may enrol as a device")})
    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict, metadata={"doc": (
        "optional table device = [helpers]: the nearby devices (device agents with [device] serve) a device may "
        "pipeline its blocks across, in chain order; the device plans the stages (Eco-FL, docs/design.md "
        "\"Pipeline\"); mqttfl ctl cloud chain changes it at run time")})

    def problems(self) -> list[str]:
        out = []
        if not self.edges:
            out.append("[cloud] edges must list the node ids of the edges this cloud trusts "
                       "(docs/design.md, \"Trust\")")
        for d, hs in self.chains.items():
            if d in hs or len(set(hs)) != len(hs) or set(hs) & set(self.edges):
                out.append(f"[cloud] chains: {d!r} must name other nodes than itself and the edges, each once")
        for d, es in self.devices.items():
            if d in self.edges:
                out.append(f"[cloud] devices: {d!r} is also listed in edges")
            unknown = [e for e in es if e not in self.edges]
            if unknown:
                out.append(f"[cloud] devices: {d!r} may use {unknown}, which are not in edges")
        return out

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> Roles:
        """The roles of a ``[cloud]`` table (other keys are ignored); ValueError names a bad value."""
        edges = section.get("edges", [])
        if not isinstance(edges, (list, tuple)):
            raise ValueError("[cloud] edges must be a list of node ids")
        table = section.get("devices", {})
        if not isinstance(table, Mapping):
            raise ValueError("[cloud] devices must be a table: device = \"edge\" or [\"edge\", ...]")
        devices: dict[str, tuple[str, ...]] = {}
        chains: dict[str, tuple[str, ...]] = {}
        links = section.get("chains", {})
        if not isinstance(links, Mapping) or not all(isinstance(v, (list, tuple)) for v in links.values()):
            raise ValueError("[cloud] chains must be a table: device = [\"helper\", ...]")
        try:
            for d, hs in links.items():
                chains[validate_id(d)] = tuple(validate_id(h) for h in hs)
            checked = tuple(validate_id(e) for e in edges)
            for d, es in table.items():
                if es == "*":
                    es = []
                es = [es] if isinstance(es, str) else es
                if not isinstance(es, (list, tuple)):
                    raise ValueError(f"[cloud] devices: {d!r} must name an edge or a list of edges")
                devices[validate_id(d)] = tuple(validate_id(e) for e in es)
        except TopicError as e:
            raise ValueError(f"[cloud] edges/devices: {e}") from None
        return cls(edges=checked, devices=devices, chains=chains)

    def is_edge(self, node: str) -> bool:
        return node in self.edges

    def may_be_device(self, node: str) -> bool:
        if node in self.edges:
            return False
        return node in self.devices if self.devices else True

    def may_use(self, device: str, edge: str) -> bool:
        """Whether ``device`` may train through ``edge``."""
        if not self.is_edge(edge) or not self.may_be_device(device):
            return False
        allowed = self.devices.get(device, ())
        return not allowed or edge in allowed

    def to_body(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "devices": {d: list(es) for d, es in sorted(self.devices.items())},
                "chains": {d: list(hs) for d, hs in sorted(self.chains.items())}}
