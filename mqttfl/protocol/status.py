"""Presence: the retained ``status`` a node publishes about itself, typed and checked at the boundary.

A status is the node's own word. It tells the cloud who is online, which edge a device is attached to, its
sample count and (if shared) its label histogram; a field of the wrong type is refused with the whole
message, so a malformed retained status can never raise later inside a timer (docs/design.md, "Trust").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.plan import check_encodings
from mqttfl.wire.topics import TopicError, validate_id


class NodeState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    TRAINING = "training"
    MIGRATING = "migrating"
    OFFLINE = "offline"
    # the cloud's run states
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"


MAX_CLASSES = 100_000


@dataclass(frozen=True, slots=True)
class Presence:
    node: str
    role: str
    state: str
    boot: int = 0
    edge: str | None = None
    cut: int | None = None
    samples: int | None = None
    labels: tuple[int, ...] | None = None
    eval_samples: int | None = None  # a device's held-out split for federated evaluation
    fingerprint: str | None = None  # the node's own build of the last plan's model
    refused_run: str | None = None  # the run whose plan the node refused (model or data mismatch) ...
    refused: str | None = None  # ... and why

    encodings: tuple[tuple[str, str], ...] = ()  # a device's own tensor encodings (kind, name), over the plan's
    klass: str | None = None  # a device's class ([device] class): what the cloud's [cloud.classes] has it train

    def refuses(self, run: str) -> bool:
        return self.refused_run == run

    @property
    def online(self) -> bool:
        return self.state not in (NodeState.OFFLINE, NodeState.STARTING)


def parse_status(src: str, data: Mapping[str, Any]) -> Presence:
    """The presence in a status message from ``src``; ProtocolError names the first bad field."""

    def opt_int(name: str, low: int) -> int | None:
        v = data.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ProtocolError("bad_field", f"status field {name!r} must be an integer >= {low}")
        return v

    role, state = data.get("role", ""), data.get("state", "")
    if not isinstance(role, str) or not isinstance(state, str) or len(role) > 32 or len(state) > 32:
        raise ProtocolError("bad_field", "status 'role' and 'state' must be short strings")
    edge = data.get("edge")
    if edge is not None:
        try:
            validate_id(edge)
        except TopicError as e:
            raise ProtocolError("bad_field", f"status field 'edge': {e}") from None
    labels = data.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or len(labels) > MAX_CLASSES or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels):
            raise ProtocolError("bad_field", "status field 'labels' must be a list of counts")
        labels = tuple(labels)
    cut = opt_int("cut", -1)
    fingerprint = data.get("fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or len(fingerprint) > 64):
        raise ProtocolError("bad_field", "status field 'fingerprint' must be a short string")
    refused = data.get("refused")
    refused_run = reason = None
    if refused is not None:
        if not (isinstance(refused, Mapping) and isinstance(refused.get("run"), str)
                and isinstance(refused.get("reason"), str)):
            raise ProtocolError("bad_field", "status field 'refused' must be {run, reason}")
        refused_run, reason = refused["run"][:64], refused["reason"][:500]
    encodings = tuple(sorted(check_encodings(data.get("encodings") or {}, "status field 'encodings'").items()))
    klass = data.get("class")
    if klass is not None:
        try:
            validate_id(klass)
        except TopicError as e:
            raise ProtocolError("bad_field", f"status field 'class': {e}") from None
    return Presence(node=src, role=role, state=state, boot=opt_int("boot", 0) or 0, edge=edge,
                    cut=None if cut is None or cut < 0 else cut, samples=opt_int("samples", 0), labels=labels,
                    eval_samples=opt_int("eval_samples", 0), fingerprint=fingerprint, refused_run=refused_run,
                    refused=reason, encodings=encodings, klass=klass)
