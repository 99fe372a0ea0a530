"""The cloud's memory and per-round state at fleet scale: what it keeps of a round does not grow with the fleet.

A round's record lists every device (costs, sampled, missing). It must reach the run log, and only the run log:
kept in the history (and so persisted on every round) it cost the cloud O(rounds x devices) memory and every
persist O(rounds x devices) time. These tests drive the cloud machine alone, with a real evaluation backend,
through rounds of fleets of different sizes and count what it keeps.
"""

from __future__ import annotations

import collections
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
import pytest

from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.data import load_digits
from mqttfl.ml.models import build_model, model_state, schema_of
from mqttfl.protocol.cloud.machine import CloudMachine
from mqttfl.protocol.cloud.roles import Roles
from mqttfl.protocol.cloud.rounds import CloudRound
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.protocol.events import (
    Command,
    Effect,
    Emit,
    Event,
    JobDone,
    Metrics,
    Persist,
    Received,
    Run,
    RunLog,
    StatusSeen,
)
from mqttfl.protocol.messages import EdgeUpdate, Report
from mqttfl.protocol.status import Presence
from mqttfl.runtime.persist import dumps
from mqttfl.runtime.transport import Inbound
from mqttfl.tools.monitor import FleetView
from mqttfl.wire.topics import Topic

SHAPE = (64,)
EDGES = ("edge1", "edge2")


class Cloud:
    """A cloud machine fed the way the runtime feeds it (job results before the next event), effects kept."""

    def __init__(self, backend: TorchBackend, **section: Any) -> None:
        settings = CloudSettings.from_section({"model": "mlp", "input_shape": list(SHAPE), "run": "r",
                                               "deadline_s": 600.0, "rounds": 1000, **section})
        init = model_state(build_model("mlp", num_classes=10, input_shape=SHAPE))
        self.machine = CloudMachine("cloud", settings=settings, initial_state=init, schemas=schema_of,
                                    run_ids=lambda: "r2", roles=Roles(edges=EDGES))
        self.backend = backend
        self.effects: list[Effect] = []

    def __call__(self, event: Event, now: float) -> list[Effect]:
        out, queue = [], collections.deque([event])
        while queue:
            for fx in self.machine.handle(queue.popleft(), now):
                out.append(fx)
                if isinstance(fx, Run):
                    queue.append(JobDone(fx.job, self.backend.run(fx.job)))
        self.effects = out
        return out


def fleet(backend: TorchBackend, n: int, **section: Any) -> Cloud:
    cloud = Cloud(backend, min_devices=n, **section)
    for e in EDGES:
        cloud(StatusSeen(Presence(e, "edge", "idle", boot=1)), 0.0)
    for i in range(n):
        cloud(StatusSeen(Presence(f"dev{i}", "device", "idle", boot=1, edge=EDGES[i % 2], samples=10)), 0.0)
    return cloud


def play_round(cloud: Cloud, now: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every device of the open round reports (each edge in reports of 50); the round's run log entry, metrics
    and the state persisted as it committed."""
    r = cloud.machine.policy.current
    assert r is not None
    out = report_all(cloud, r, now)
    (logged,) = [fx.entry for fx in out if isinstance(fx, RunLog)]
    (metrics,) = [fx.fields for fx in out if isinstance(fx, Metrics)]
    persisted = [fx.state for fx in out if isinstance(fx, Persist) and fx.state is not None][0]
    return logged, metrics, persisted


def report_all(cloud: Cloud, r: CloudRound, now: float) -> list[Effect]:
    delta = {k: np.full_like(v, 1e-3) for k, v in cloud.machine.global_state.items()}
    rng = np.random.default_rng(r.plan.round)
    out: list[Effect] = []
    for edge, devices in r.edges.items():
        for j in range(0, len(devices), 50):
            chunk = devices[j:j + 50]
            reports = {d: Report(samples=10, t_local=float(rng.uniform(0.1, 2.0)), t_total=float(rng.uniform(2, 3)),
                                 bytes_up=1000) for d in chunk}
            out += cloud(Received(edge, EdgeUpdate(run="r", round=r.plan.round, attempt=r.plan.attempt,
                                                   reports=reports, missing=(), delta=delta, tag=r.tag)), now)
    return out


def items(obj: Any, seen: set[int] | None = None) -> int:
    """Containers' entries reachable from ``obj`` (an array counts as one): what a fleet's size could grow."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), np.ndarray, np.generic)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return len(obj) + sum(items(k, seen) + items(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return len(obj) + sum(items(v, seen) for v in obj)
    if is_dataclass(obj):
        return sum(items(getattr(obj, f.name), seen) for f in fields(obj))
    return 0


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    _, test = load_digits(SHAPE)
    return TorchBackend("cloud", test=test)


def kept(cloud: Cloud) -> int:
    """What the cloud keeps between rounds: its fleet view, history, runs and the policy's state."""
    m = cloud.machine
    return items([m.history, m.fleet, m.last_seen, m.joined, m.runs, m.eligible().copy(), m.refused_claims,
                  m.policy.state_dict(0.0)])


def test_what_the_cloud_keeps_of_its_rounds_does_not_grow_with_the_fleet(backend: TorchBackend) -> None:
    growth, per_round, persisted_size = {}, {}, {}
    for n in (6, 240):
        cloud = fleet(backend, n)
        play_round(cloud, 1.0)
        after_one = kept(cloud)
        for i in range(2, 7):
            logged, _, state = play_round(cloud, float(i))
        assert cloud.machine.policy.completed == 6 and logged["participants"] == n
        assert len(logged["devices"]) == n and len(logged["sampled"]) == n, "the run log has every device"
        per_round[n] = (kept(cloud) - after_one) / 5
        growth[n] = kept(cloud)
        persisted_size[n] = len(dumps(state["history"]))
        assert all("devices" not in h and "sampled" not in h and "missing" not in h for h in cloud.machine.history)
        assert [len(h["slowest"]) for h in cloud.machine.history] == [5] * 6
    assert per_round[240] == per_round[6], "a round adds the same to the cloud's memory whatever the fleet"
    # The fleet view: a presence, when it was seen and what it declared, per device; nothing per device and round.
    assert (growth[240] - growth[6]) / 234 <= 12
    assert persisted_size[240] <= persisted_size[6] * 1.2, "the persisted history does not list devices"


def test_a_large_rounds_metrics_carry_classes_and_the_slowest_and_the_run_log_every_device(
        backend: TorchBackend) -> None:
    cloud = fleet(backend, 120, metrics_devices=100)
    (started,) = [fx.fields for fx in cloud.effects if isinstance(fx, Emit) and fx.event == "round_started"]
    assert started["devices_per_edge"] == {"edge1": 60, "edge2": 60} and started["devices_omitted"] == 120
    assert "edges" not in started and "sampled" not in started, "a large round's event names no device"
    logged, metrics, _ = play_round(cloud, 1.0)
    assert "devices" not in metrics and "sampled" not in metrics and metrics["devices_omitted"] == 120
    assert metrics["classes"]["default"]["devices"] == 120 and metrics["participants"] == 120
    slowest = sorted(logged["devices"].items(), key=lambda kv: -kv[1]["T_total"])[:5]
    assert [s["device"] for s in metrics["slowest"]] == [d for d, _ in slowest]
    cloud(Command("op", "set-1", "set", {"metrics_devices": 500}), 1.5)
    _, metrics, _ = play_round(cloud, 2.0)
    (started,) = [fx.fields for fx in cloud.effects if isinstance(fx, Emit) and fx.event == "round_started"]
    assert sorted(started["sampled"]) == sorted(d for ds in started["edges"].values() for d in ds)
    assert len(metrics["devices"]) == 120 and metrics["sampled"] == sorted(metrics["devices"])


def test_the_monitor_shows_the_slowest_devices_from_a_large_rounds_metrics(backend: TorchBackend) -> None:
    cloud = fleet(backend, 120, metrics_devices=10)
    logged, metrics, _ = play_round(cloud, 1.0)
    v = FleetView("f")
    v.update(Inbound(Topic("f", "metrics", "cloud", "all"), None, {"node": "cloud", "role": "cloud", **metrics},
                     False, 0.0), now=0.0)
    top = sorted(logged["devices"], key=lambda d: -logged["devices"][d]["T_total"])[:3]
    assert [s["node"] for s in v.summary(slowest=3)["slowest"]] == top



def test_async_scheduling_looks_at_the_fleet_only_when_a_device_becomes_eligible_or_not(
        backend: TorchBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scheduling group rounds walks every eligible device: a status that changes no device's eligibility (the
    many state changes of a large fleet's rounds) must not trigger it."""
    cloud = fleet(backend, 60, mode="async", profile_rounds=1, max_versions=50, num_groups=3)
    policy = cloud.machine.policy
    (profiling,) = policy.open.values()
    report_all(cloud, profiling, 1.0)
    assert policy.phase == "groups" and policy.completed == 1 and len(policy.open) == 3, "a round per group"
    calls: list[float] = []
    schedule = policy.schedule
    monkeypatch.setattr(policy, "schedule", lambda now: (calls.append(now), schedule(now)))
    for i in range(60):
        cloud(StatusSeen(Presence(f"dev{i}", "device", "training", boot=1, edge=EDGES[i % 2], samples=10)), 2.0)
    assert calls == []
    cloud(StatusSeen(Presence("dev0", "device", "offline", boot=1, edge=EDGES[0], samples=10)), 3.0)
    cloud(StatusSeen(Presence("dev2", "device", "idle", boot=1, edge=EDGES[1], samples=10)), 3.0)  # moved
    assert calls == [3.0, 3.0]
