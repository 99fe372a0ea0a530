"""Events in, effects out: the whole interface between a protocol machine and the world.

A machine is driven by ``effects = machine.handle(event, now)``; ``now`` is the runtime's monotonic clock
in seconds (the only clock a machine sees; wall-clock times arrive inside events where a message carries
one). A machine never blocks, sleeps, reads a clock or does I/O: everything it wants done is an effect,
and everything that happens to it is an event (docs/design.md, "Machines").
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from mqttfl.protocol.messages import Message
from mqttfl.protocol.stage import Job
from mqttfl.protocol.status import Presence

# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True, eq=False)
class Started:
    """The node is connected and subscribed (a restarted node gets this after restoring its state). ``wall``:
    the wall clock then, so a restored machine can place times it saved before (an edge's round deadline)."""

    wall: float = 0.0


@dataclass(frozen=True, eq=False)
class Received:
    """A typed message from ``src`` (authenticated by the broker: it is a topic level)."""

    src: str
    msg: Message
    id: bytes = b""
    sent_at: float = 0.0  # the sender's wall clock when it sent the message
    received_at: float = 0.0  # this node's wall clock at arrival
    reliable: bool = False  # the sender re-sends until acknowledged

    @property
    def transit_s(self) -> float:
        return max(0.0, self.received_at - self.sent_at)


@dataclass(frozen=True, eq=False)
class StatusSeen:
    presence: Presence
    retained: bool = False


@dataclass(frozen=True, eq=False)
class Command:
    """An authorised control command (the runtime refuses unauthorised senders before this)."""

    src: str
    id: str
    cmd: str
    args: dict[str, Any]


@dataclass(frozen=True, eq=False)
class TimerFired:
    key: Hashable


@dataclass(frozen=True, eq=False)
class JobDone:
    """The result of a ``Run(job)`` effect, or ``error`` when the job failed."""

    job: Job
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, eq=False)
class LinkChanged:
    up: bool


Event = Started | Received | StatusSeen | Command | TimerFired | JobDone | LinkChanged

# ------------------------------------------------------------------------------------------------ effects


@dataclass(frozen=True, eq=False)
class Send:
    dst: str
    msg: Message
    reliable: bool = False  # through the on-disk outbox, re-sent until the receiver acknowledges
    encoding: str = "none"  # how the message's tensors travel (mqttfl.wire.encoding)


@dataclass(frozen=True, eq=False)
class Ack:
    """Acknowledge a reliable message: it is applied here (and persisted where that matters)."""

    received: Received


@dataclass(frozen=True, eq=False)
class SetTimer:
    key: Hashable
    at: float  # on the machine's clock (``now``); setting a key again moves its timer


@dataclass(frozen=True, eq=False)
class CancelTimer:
    key: Hashable


@dataclass(frozen=True, eq=False)
class Run:
    job: Job


@dataclass(frozen=True, eq=False)
class Persist:
    """Write this state atomically; a restarted node is built from the last one. ``key`` names one of several
    independent states (an edge's sessions, one per device); ``state`` None removes that one."""

    state: dict[str, Any] | None
    key: str = ""


@dataclass(frozen=True, eq=False)
class RunLog:
    """Append one entry to the run's append-only log."""

    entry: dict[str, Any]


@dataclass(frozen=True, eq=False)
class SaveModel:
    """Keep this global model of a run (the cloud after each round): the runtime keeps the last few of each run
    and, with ``best``, that one as the run's best (docs/operations.md, "Runs")."""

    run: str
    round: int
    state: dict[str, Any]
    info: dict[str, Any]  # the model reference, task and the metrics the cloud measured
    best: bool = False


@dataclass(frozen=True, eq=False)
class SetStatus:
    state: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Emit:
    """An ``event`` message for operators."""

    event: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Metrics:
    fields: dict[str, Any]


@dataclass(frozen=True, eq=False)
class Drop:
    """A refused message: counted by reason and reported on ``event``."""

    reason: str
    detail: str
    src: str = ""


@dataclass(frozen=True, eq=False)
class Count:
    """Add to one of the node's counters (reported with its periodic metrics)."""

    name: str
    n: int = 1


@dataclass(frozen=True, eq=False)
class Reply:
    """The answer to a ``Command``: ``result`` when ok, else ``error`` with a short ``code``."""

    to: Command
    ok: bool
    result: Any = None
    error: str = ""
    code: str = ""


@dataclass(frozen=True, eq=False)
class Log:
    level: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class SendCommand:
    """Send a received control command to another node (the cloud asking a device to move)."""

    dst: str
    cmd: str
    args: dict[str, Any]


@dataclass(frozen=True, eq=False)
class ReconnectWithin:
    """While the link is down, try again at least this often (None: the configured backoff). A node in a round
    must be back before its peers give up on it (docs/design.md, "Transport")."""

    seconds: float | None


@dataclass(frozen=True, eq=False)
class Follow:
    """Hear the group announcements (``model`` broadcasts) of these edges and no other's: a device's current
    edge, and the one it just left while a round announced there may still arrive (docs/design.md, "Topics")."""

    edges: tuple[str, ...]


Effect = (Send | Ack | SetTimer | CancelTimer | Run | Persist | RunLog | SaveModel | SetStatus | Emit | Metrics | Drop
          | Count
          | Reply | Log | SendCommand | ReconnectWithin | Follow)


class CommandError(Exception):
    """A command that cannot be carried out; ``code`` goes back in the reply."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
