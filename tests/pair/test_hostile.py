"""One bad node must not stop a fleet (docs/design.md, "Trust"): each attack found against a training fleet,
replayed in memory while the fleet trains.

Every test ends on the global model of the same run without the attacker (unsplit FedAvg over the devices that
took part): a refused message that reached model state anywhere could not go unnoticed. The attacker is an
authenticated node using only its own id, as the production ACL allows, unless a test says it plays a
compromised configured node.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from mqttfl.ml.models import build_model, model_state
from mqttfl.protocol.events import LinkChanged
from mqttfl.protocol.messages import (
    Abort,
    Activations,
    DeviceUpdate,
    EdgeUpdate,
    Expect,
    Freeze,
    Gradients,
    Message,
    Ready,
    Report,
    Restart,
    TrainRound,
)
from mqttfl.protocol.plan import Plan
from mqttfl.runtime.memory import MemoryFleet, Packet, match
from mqttfl.wire.codec import Envelope
from mqttfl.wire.topics import JSON_KINDS, KINDS
from tests.pair.common import MODEL, SCHEMA, SHAPE, SPLIT_CUT, assert_reference, fleet_of, round_entries, spec

DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}
QUICK = {"act_timeout_s": 1.0}


def fleet3(cloud: dict[str, Any] | None = None, **kw: Any) -> tuple[Any, MemoryFleet]:
    s = spec(DEVICES, cloud=cloud, device_extra={d: dict(QUICK) for d in DEVICES})
    return s, fleet_of(s, **kw)


def send(fleet: MemoryFleet, src: str, dst: str, msg: Message, **body: Any) -> None:
    """A message as ``src`` would publish it (the broker vouches for ``src`` only)."""
    b, tensors = msg.to_wire()
    fleet.send_raw(Envelope(kind=msg.kind, src=src, dst=dst, body={**b, **body}, tensors=tensors, run=msg.run,
                            round=msg.round))


def training(fleet: MemoryFleet, device: str, step: int = 1) -> bool:
    r = fleet.machine(device).round
    return r is not None and r.step >= step


def full_delta(scale: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, scale) for k, v in model_state(build_model(MODEL, input_shape=SHAPE)).items()}


def status(fleet: MemoryFleet, src: str, body: dict[str, Any]) -> None:
    """A retained status published by ``src`` about itself, as the broker hands it to the cloud."""
    data = {"node": src, "boot": 1, **body}
    fleet.retained[src] = data
    fleet._transmit(Packet(src, fleet.cloud, "status", data=data, retained=True), fleet.now)


# ------------------------------------------------------------------------------------------------ finding 1


def test_model_messages_from_anyone_but_its_edge_never_abort_a_devices_round() -> None:
    """Finding 1: a few 200-byte ``model`` messages from an unrelated node made two devices abort every attempt.
    Now a device acts on a round announcement only from its edge, only when valid and newer."""
    s, fleet = fleet3()
    fleet.run_until(lambda: training(fleet, "dev1") and training(fleet, "dev2"), max_time=60)
    running = fleet.machine("dev1").round.plan
    newer = replace(running, round=running.round + 1, attempt=3)
    state = {k: v for k, v in full_delta(0.01).items() if k in SCHEMA.keys(0, SPLIT_CUT)}
    for dev in ("dev1", "dev2"):
        for _ in range(3):  # an unrelated node, with a perfectly valid newer plan
            send(fleet, "mallory", dev, TrainRound(run=newer.run, round=newer.round, plan=newer, cut=SPLIT_CUT,
                                                   edge="edge1", state=state))
        # Its own edge, replaying an older plan, and announcing one with an impossible cut.
        older = replace(running, attempt=0, round=max(0, running.round - 1))
        send(fleet, "edge1", dev, TrainRound(run=older.run, round=older.round, plan=older, cut=SPLIT_CUT,
                                             edge="edge1", state=state))
        bad = TrainRound(run=newer.run, round=newer.round, plan=newer, cut=99, edge="edge1", state=state)
        send(fleet, "edge1", dev, bad)
    fleet.run_to_end(max_time=600)
    assert fleet.events("round_aborted") == []
    for dev in ("dev1", "dev2"):
        assert len(fleet.drops(node=dev, reason="unknown_sender")) == 3
        assert fleet.drops(node=dev, reason="bad_plan")
    assert [e["participants"] for e in round_entries(fleet)] == [3, 3]
    assert_reference(fleet, s, rounds=2)


# ------------------------------------------------------------------------------------------------ finding 2


def test_a_node_that_says_it_is_an_edge_is_never_heard_and_reported() -> None:
    """Finding 2: a node declaring itself an edge in its own status had its delta aggregated; one 2.3 MB delta
    claiming 1e9 samples took accuracy from 0.77 to 0.15. Roles now come from [cloud] edges."""
    s, fleet = fleet3()
    status(fleet, "mallory", {"role": "edge", "state": "idle"})
    fleet.run_until(lambda: training(fleet, "dev1"), max_time=60)
    r = fleet.machine("cloud").policy.current
    poison = EdgeUpdate(run=r.plan.run, round=r.plan.round, attempt=r.plan.attempt,
                        reports={"dev1": Report(samples=10**9)}, missing=(), delta=full_delta(50.0))
    send(fleet, "mallory", "cloud", poison, reliable=True)
    fleet.run_to_end(max_time=600)
    assert [e["participants"] for e in round_entries(fleet)] == [3, 3]
    assert_reference(fleet, s, rounds=2)
    assert fleet.drops(node="cloud", reason="not_an_edge")
    (refused,) = fleet.events("role_refused", node="cloud")
    assert refused["sender"] == "mallory" and "edge" in refused["claim"]
    assert "mallory" not in {e for ev in fleet.events("round_started") for e in ev["edges"]}


def test_a_configured_edge_cannot_report_devices_outside_its_round_nor_more_samples_than_they_declared() -> None:
    """Played as a compromised configured edge: reports for a device that is not in the round at that edge, for
    more samples than the device declared when it joined, or with a delta that would swamp the model."""
    s, fleet = fleet3()
    fleet.run_until(lambda: training(fleet, "dev3"), max_time=60)
    r = fleet.machine("cloud").policy.current
    key = {"run": r.plan.run, "round": r.plan.round, "attempt": r.plan.attempt}
    declared = fleet.status("dev3")["samples"]
    for reports, delta in (({"dev1": Report(samples=5)}, full_delta(0.0)),  # dev1 trains at edge1
                           ({"dev3": Report(samples=declared + 1)}, full_delta(0.0)),
                           ({"dev3": Report(samples=declared)}, full_delta(1e3)),
                           ({"intruder": Report(samples=1)}, full_delta(0.0))):
        send(fleet, "edge2", "cloud", EdgeUpdate(reports=reports, missing=(), delta=delta, **key), reliable=True)
    fleet.run_to_end(max_time=600)
    assert [e["participants"] for e in round_entries(fleet)] == [3, 3]
    assert_reference(fleet, s, rounds=2)
    reasons = [d["reason"] for d in fleet.drops(node="cloud")]
    for reason in ("not_in_round", "implausible_samples", "implausible_update"):
        assert reason in reasons, reasons


def test_a_device_cannot_weigh_more_than_it_trained_on_nor_send_an_implausible_update() -> None:
    """A compromised device (in the round, its own id): a report of more samples than passed through its edge
    is refused, the device counts as missing, and the round goes on without it."""
    s, fleet = fleet3({"quorum": 0.5})
    fleet.run_until(lambda: training(fleet, "dev2", 2), max_time=60)
    r = fleet.machine("dev2").round
    forged = DeviceUpdate(run=r.plan.run, round=r.plan.round, report=Report(samples=150, attempt=r.plan.attempt),
                          delta={k: np.zeros_like(v) for k, v in r.base.items()})
    send(fleet, "dev2", "edge1", forged, reliable=True)
    fleet.run_to_end(max_time=600)
    entries = round_entries(fleet)
    assert entries[0]["missing"] == ["dev2"] and entries[1]["participants"] == 3
    assert_reference(fleet, s, rounds=[["dev1", "dev3"], ["dev1", "dev2", "dev3"]])
    assert fleet.drops(node="edge1", reason="implausible_samples")
    assert fleet.events("update_refused", node="edge1", device="dev2")


# ------------------------------------------------------------------------------------------------ finding 3


def test_malformed_retained_statuses_are_refused_whole_and_no_round_starts_that_cannot() -> None:
    """Finding 3: ``"cut": "x"`` raised after the round was marked started; ``"edge": ["x"]`` raised in every
    timer. Statuses are typed at the boundary: refused whole, reported, and the run goes on."""
    s, fleet = fleet3()
    for body in ({"role": "device", "state": "idle", "edge": "edge1", "cut": "x", "samples": 10},
                 {"role": "device", "state": "idle", "edge": ["x"], "samples": 10},
                 {"role": "device", "state": "idle", "edge": "edge1", "samples": -3},
                 {"role": "device", "state": "idle", "edge": "edge1", "labels": "xyz", "samples": 10},
                 {"role": ["edge"], "state": "idle"}):
        status(fleet, "mallory", body)
    fleet.run_to_end(max_time=600)
    assert [(e["attempt"], e["participants"]) for e in round_entries(fleet)] == [(0, 3), (0, 3)]
    assert_reference(fleet, s, rounds=2)
    assert len(fleet.drops(node="cloud", reason="bad_field")) == 5


def test_a_device_declaring_more_samples_than_allowed_is_left_out_and_reported() -> None:
    s, fleet = fleet3({"max_samples": 1000})
    status(fleet, "greedy", {"role": "device", "state": "idle", "edge": "edge1", "samples": 10**9})
    fleet.run_to_end(max_time=600)
    assert fleet.events("role_refused", node="cloud", sender="greedy")
    assert all(set(e["edges"].get("edge1", [])) <= {"dev1", "dev2"} for e in fleet.events("round_started"))
    assert [(e["attempt"], e["participants"]) for e in round_entries(fleet)] == [(0, 3), (0, 3)]
    assert_reference(fleet, s, rounds=2)


# ------------------------------------------------------------------------------------------------ finding 5


def test_an_ack_counts_only_from_the_node_the_message_was_sent_to() -> None:
    """Finding 5: acknowledgements were accepted for any outbox entry from any sender, so a node that learnt an
    id could make an edge give up its delta. Here the edge's delta is lost on the wire and another node acks it:
    the edge keeps re-sending until the cloud has it."""
    s, fleet = fleet3()
    fleet.drop(match("delta", msg_type=EdgeUpdate, src="edge1"), times=1)
    seen = fleet.watch(match("delta", msg_type=EdgeUpdate, src="edge1"))
    fleet.run_until(lambda: seen.hits, max_time=120)
    env = seen.hits[0].env
    assert env is not None
    fleet.send_raw(Envelope(kind="ack", src="mallory", dst="edge1", body={"ids": [env.id.hex()], "of": "delta"},
                            run=env.run, round=env.round))
    fleet.run_to_end(max_time=600)
    assert [e["participants"] for e in round_entries(fleet)] == [3, 3]
    assert_reference(fleet, s, rounds=2)
    assert fleet.drops(node="edge1", reason="ack_not_from_receiver")


# ------------------------------------------------------------------------------------------------ finding 6


def test_a_device_whose_link_returns_after_its_edge_closed_the_round_stops_at_once_and_joins_the_next() -> None:
    s, fleet = fleet3({"deadline_s": 20.0, "quorum": 0.5})
    fleet.run_until(lambda: training(fleet, "dev1"), max_time=60)
    cut = fleet.drop(lambda p: "dev1" in (p.src, p.dst) and p.kind != "status", times=None)
    fleet.run_until(lambda: fleet.events("devices_missing", node="edge1"), max_time=60)
    cut.times = len(cut.hits)  # the link is back
    fleet.inject("dev1", LinkChanged(up=True))
    fleet.run_until(lambda: fleet.events("round_aborted", node="dev1"), max_time=5)
    (aborted,) = fleet.events("round_aborted", node="dev1")
    assert "closed" in aborted["reason"]
    fleet.run_to_end(max_time=600)
    entries = round_entries(fleet)
    assert entries[0]["missing"] == ["dev1"] and entries[1]["participants"] == 3
    assert_reference(fleet, s, rounds=[["dev2", "dev3"], ["dev1", "dev2", "dev3"]])


# ------------------------------------------------------------------------------------------------ a stream


def raw(fleet: MemoryFleet, src: str, dst: str, kind: str, payload: bytes) -> None:
    """Bytes that are no message of their kind, as the broker delivers them."""
    fleet._transmit(Packet(src, dst, kind, payload=payload), fleet.now)


def hostile_stream(fleet: MemoryFleet, rng: random.Random, targets: list[str]) -> Iterator[str]:
    """Endless hostile messages over every topic kind to every node, from nodes nobody should listen to: forged
    protocol messages with plausible and implausible fields, acks of unknown ids, commands, statuses, and bytes
    that are no message at all. Yields the kind of each message sent."""
    cut = SPLIT_CUT
    device_state = {k: v for k, v in full_delta(0.01).items() if k in SCHEMA.keys(0, cut)}
    while True:
        kind = rng.choice(sorted(KINDS))
        src, dst = rng.choice(["mallory", "eve", "edge9"]), rng.choice(targets)
        run, rnd = rng.choice(["r1", "r1", "x"]), rng.choice([0, 1, 2, 7])
        if kind in JSON_KINDS:
            data: dict[str, Any] = {"node": src, "role": rng.choice(["edge", "device", "cloud"]), "state": "idle",
                                    "edge": rng.choice(["edge1", "edge9", "x"]), "samples": rng.choice([1, 10**9]),
                                    "id": f"c{rng.random()}", "cmd": rng.choice(["stop", "move", "set", "shutdown"]),
                                    "args": {"rounds": 0, "edge": "edge9"}, "boot": 1}
            if kind == "status":
                dst = fleet.cloud
            if kind in ("status", "ctl"):
                fleet._transmit(Packet(src, dst, kind, data=data, retained=kind == "status"), fleet.now)
            else:
                raw(fleet, src, dst, kind, json.dumps(data).encode())
        elif rng.random() < 0.2:
            raw(fleet, src, dst, kind, rng.randbytes(rng.randrange(1, 300)))
        else:
            p = Plan(run=run, round=rnd, model=MODEL, input_shape=SHAPE, batch_size=20)
            x = np.full((20, *SCHEMA.activation(cut)), rng.choice([0.5, 1e30]), np.float32)
            y = np.zeros(20, np.int64)
            msg: Message = {
                "model": TrainRound(run=run, round=rnd, plan=p, cut=cut, edge="edge1", state=device_state),
                "act": Activations(run=run, round=rnd, step=rng.choice([0, 1]), micro=0, n_micro=1, batch_size=20,
                                   attempt=0, x=x, y=y),
                "grad": Gradients(run=run, round=rnd, step=0, micro=0, loss_sum=1.0, correct=1, g=x),
                "delta": rng.choice([
                    EdgeUpdate(run=run, round=rnd, attempt=0, reports={"dev1": Report(samples=10**9)}, missing=(),
                               delta=full_delta(rng.choice([0.01, 100.0]))),
                    DeviceUpdate(run=run, round=rnd, report=Report(samples=10**9), delta=device_state)]),
                "ckpt": rng.choice([Expect(migration="m", source=src), Freeze(migration="m", to="edge9",
                                                                               path="relay", step=0),
                                    Ready(migration="m", step=0), Abort(migration="m"),
                                    Restart(run=run, round=rnd, migration="m", edge="edge9", source="edge1")]),
            }.get(kind, None) or Abort(migration="m")
            if kind == "ack":
                fleet.send_raw(Envelope(kind="ack", src=src, dst=dst, run=run, round=rnd,
                                        body={"ids": [rng.randbytes(16).hex()], "of": "delta"}))
            elif kind in ("model", "act", "grad", "delta", "ckpt"):
                send(fleet, src, dst, msg, reliable=rng.random() < 0.5)
            else:  # profile: reserved, nobody takes it
                fleet.send_raw(Envelope(kind=kind, src=src, dst=dst, body={"op": "x"}, run=run, round=rnd))
        yield kind


def test_a_fleet_under_thousands_of_hostile_messages_on_every_kind_completes_every_round_on_the_reference() -> None:
    s, fleet = fleet3({"rounds": 3})
    stream = hostile_stream(fleet, random.Random(0), [fleet.cloud, "edge1", "edge2", *DEVICES])
    kinds: collections.Counter[str] = collections.Counter()
    while not fleet.events("run_complete") and not fleet.events("run_failed"):
        for _ in range(25):
            kinds[next(stream)] += 1
        fleet.run_for(0.02)
        assert sum(kinds.values()) < 30_000, "the run did not complete"
    assert sum(kinds.values()) >= 3000 and set(kinds) == set(KINDS), kinds
    assert fleet.events("round_aborted") == [] and fleet.events("quorum_not_met") == []
    assert [(e["attempt"], e["participants"]) for e in round_entries(fleet)] == [(0, 3)] * 3
    assert_reference(fleet, s, rounds=3)
    for node in ("cloud", "edge1", "edge2", *DEVICES):
        assert fleet.counts(node)["dropped"] > 100, (node, fleet.counts(node))
