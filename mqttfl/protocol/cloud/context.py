"""What a round policy may use of the cloud, and what the cloud asks of a policy (docs/design.md, "Cloud").

The policies (synchronous rounds, asynchronous groups) own their round state; the cloud owns the global model,
the run's settings and state, the fleet view, persistence and publishing. Each side sees the other only through
these interfaces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from mqttfl.protocol.cloud.rounds import CloudRound
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.protocol.events import Effect, Received
from mqttfl.protocol.hetero import LocalModel
from mqttfl.protocol.messages import EdgeUpdate, Restart, RoundTag
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import ModelSchema
from mqttfl.protocol.status import Presence


class Cloud(Protocol):
    settings: CloudSettings
    global_state: dict[str, np.ndarray]
    fleet: dict[str, Presence]
    schema: ModelSchema

    @property
    def running(self) -> bool: ...

    @property
    def committing(self) -> bool: ...

    def do(self, *effects: Effect) -> None: ...

    def drop(self, reason: str, detail: str, src: str = "") -> None: ...

    @property
    def eligible_version(self) -> int: ...

    def eligible(self) -> Mapping[str, Presence]: ...

    def may_begin(self, devices: Mapping[str, Presence], now: float) -> bool: ...

    def is_edge(self, node: str) -> bool: ...

    def may_use(self, device: str, edge: str) -> bool: ...

    def declared(self, device: str) -> int: ...

    def cut_for(self, device: str) -> int: ...

    def local_for(self, device: str) -> LocalModel | None: ...

    def class_of(self, device: str) -> str: ...

    def plan_cuts(self, plan: Plan, by_edge: dict[str, list[str]]) -> tuple[dict[str, int], dict[str, Any]]: ...

    def plan(self, round: int, attempt: int, **changes: Any) -> Plan: ...

    def announce(self, plan: Plan, by_edge: dict[str, list[str]], tag: RoundTag | None = None,
                 partial: dict[str, list[str]] | None = None, cuts: dict[str, int] | None = None) -> None: ...

    def check_update(self, src: str, msg: EdgeUpdate, r: CloudRound | None, keys: list[str] | None = None
                     ) -> dict[str, np.ndarray] | None: ...

    def encodings_for(self, device: str) -> dict[str, str]: ...

    def chains_for(self, devices: list[str]) -> dict[str, tuple[str, ...]]: ...

    def commit(self, new_state: dict[str, np.ndarray], entry: dict[str, Any], now: float,
               then: Callable[[], None] | None = None) -> None: ...

    def publish_status(self, **fields: Any) -> None: ...

    def persist(self, now: float) -> None: ...

    def complete(self, now: float, **fields: Any) -> None: ...

    def fail(self, now: float, reason: str, **fields: Any) -> None: ...

    def elapsed(self, now: float) -> float: ...


class Policy(Protocol):
    """How rounds happen. Methods return nothing: effects go through the cloud's ``do``."""

    completed: int  # rounds (sync) or global versions (async) completed

    def progress(self, now: float) -> None: ...

    def on_update(self, ev: Received, msg: EdgeUpdate, now: float) -> None: ...

    def on_restart(self, ev: Received, msg: Restart, now: float) -> None: ...

    def on_status(self, p: Presence, was: Presence | None) -> None: ...

    def on_start(self) -> None: ...

    def on_stop(self) -> None: ...

    def busy(self) -> bool: ...

    def state_dict(self, now: float) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def status_fields(self) -> dict[str, Any]: ...


def quorum_needed(quorum: float, expected: int) -> int:
    # The tolerance keeps 0.7 x 10 = 7.000000000000001 from demanding 8 reports.
    return max(1, math.ceil(quorum * expected - 1e-9))
