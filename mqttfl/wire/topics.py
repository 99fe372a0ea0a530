"""The topic tree: ``mqttfl/v1/{fleet}/{kind}/{src}/{dst}``.

The sender's id is a topic level so that the broker, with one MQTT username per node and the ACL patterns
``write mqttfl/v1/+/+/%u/+`` / ``read mqttfl/v1/+/+/+/%u`` / ``read mqttfl/v1/+/+/+/all``, is what proves who
sent a message (docs/design.md, "Topics"). The kind precedes the node ids so that ``mqttfl/v1/+/status/#``
selects one kind.

Ids are restricted to ``[a-z0-9][a-z0-9_.-]{0,63}``: no ``/``, ``+`` or ``#`` (which would change the level
structure or act as wildcards) and no uppercase, so that an id is also safe as an MQTT username, a client id,
a file name and a systemd instance name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "mqttfl/v1"
KINDS: frozenset[str] = frozenset(
    {"status", "metrics", "event", "ctl", "reply", "act", "grad", "model", "delta", "ckpt", "profile", "ack"}
)
# Human-facing kinds are JSON so that `mosquitto_sub` output is readable; the rest are msgpack envelopes.
JSON_KINDS: frozenset[str] = frozenset({"status", "metrics", "event", "ctl", "reply"})
BINARY_KINDS: frozenset[str] = KINDS - JSON_KINDS
BROADCAST = "all"
WILDCARD = "+"

_PREFIX_LEVELS = tuple(PREFIX.split("/"))
_LEVELS = len(_PREFIX_LEVELS) + 4
# fullmatch, not `$`: `$` also matches before a trailing newline.
_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


class TopicError(ValueError):
    """A topic, topic filter or id that does not follow the mqttfl topic tree."""


def validate_id(node_or_fleet: str) -> str:
    """Return the id unchanged if it is a valid node or fleet id, else raise TopicError."""
    if not isinstance(node_or_fleet, str) or _ID_RE.fullmatch(node_or_fleet) is None:
        raise TopicError(
            f"invalid id {node_or_fleet!r}: expected 1-64 characters of [a-z0-9_.-] starting with [a-z0-9]"
        )
    return node_or_fleet


def _validate_kind(kind: str) -> str:
    if kind not in KINDS:
        raise TopicError(f"unknown kind {kind!r}: expected one of {sorted(KINDS)}")
    return kind


def _validate_src(src: str) -> str:
    validate_id(src)
    if src == BROADCAST:
        # "all" is the broadcast destination; as a sender it would make the ACL pattern %u meaningless.
        raise TopicError(f"{BROADCAST!r} is reserved for broadcast destinations and cannot be a sender")
    return src


@dataclass(frozen=True)
class Topic:
    fleet: str
    kind: str
    src: str
    dst: str

    def __str__(self) -> str:
        return f"{PREFIX}/{self.fleet}/{self.kind}/{self.src}/{self.dst}"


def topic(fleet: str, kind: str, src: str, dst: str) -> str:
    """The topic a node publishes on; every level is validated."""
    validate_id(fleet)
    _validate_kind(kind)
    _validate_src(src)
    validate_id(dst)
    return f"{PREFIX}/{fleet}/{kind}/{src}/{dst}"


def parse(t: str) -> Topic:
    """Split a received topic into its parts, raising TopicError if it is not a valid mqttfl topic."""
    if not isinstance(t, str):
        raise TopicError(f"topic must be a str, got {type(t).__name__}")
    levels = t.split("/")
    if len(levels) != _LEVELS:
        raise TopicError(
            f"topic {t!r} has {len(levels)} levels, expected {_LEVELS} ({PREFIX}/fleet/kind/src/dst)"
        )
    if tuple(levels[: len(_PREFIX_LEVELS)]) != _PREFIX_LEVELS:
        raise TopicError(f"topic {t!r} does not start with {PREFIX!r}")
    fleet, kind, src, dst = levels[len(_PREFIX_LEVELS) :]
    try:
        validate_id(fleet)
        _validate_kind(kind)
        _validate_src(src)
        validate_id(dst)
    except TopicError as exc:
        raise TopicError(f"topic {t!r}: {exc}") from None
    return Topic(fleet=fleet, kind=kind, src=src, dst=dst)


def filter_for(fleet: str = WILDCARD, kind: str = WILDCARD, src: str = WILDCARD, dst: str = WILDCARD) -> str:
    """A subscription filter with exactly the six levels of a topic; each part is an id/kind or ``+``.

    Only single-level wildcards are offered: a ``#`` filter would also match topics of a future tree with
    more levels, which receivers could not parse.
    """
    if fleet != WILDCARD:
        validate_id(fleet)
    if kind != WILDCARD:
        _validate_kind(kind)
    if src != WILDCARD:
        _validate_src(src)
    if dst != WILDCARD:
        validate_id(dst)
    return f"{PREFIX}/{fleet}/{kind}/{src}/{dst}"


def inbox_filters(fleet: str, node: str) -> list[str]:
    """The filters a node subscribes to: everything addressed to it and every broadcast in its fleet."""
    validate_id(fleet)
    _validate_src(node)
    return [filter_for(fleet, dst=node), filter_for(fleet, dst=BROADCAST)]
