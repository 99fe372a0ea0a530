"""Migration (FedFly) in memory: a device moves to another edge mid-round and training resumes bit-exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mqttfl.protocol.messages import Abort, Ckpt, Freeze, Frozen, Leave, Ready, Release, Restart, Transfer
from mqttfl.runtime.memory import MemoryFleet, match
from tests.pair.common import assert_reference, fleet_of, max_abs_diff, round_entries, spec

MOVER = "dev1"
# dev1 and dev2 at edge1, dev3 at edge2: every edge is in the round, and edge1 keeps a device after the move.
DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}
FAST = {"act_timeout_s": 1.0, "migrate_timeout_s": 2.0}


def moving_fleet(**cloud: Any) -> tuple[Any, MemoryFleet]:
    s = spec(DEVICES, cloud=cloud, device_extra={d: dict(FAST) for d in DEVICES})
    return s, fleet_of(s)


def in_round(fleet: MemoryFleet, device: str, rnd: int) -> bool:
    r = fleet.machine(device).round
    return r is not None and r.plan.round == rnd


def move_mid_round(fleet: MemoryFleet, path: str, at_step: int = 2, rnd: int = 0) -> dict[str, Any]:
    """Ask the cloud to move the device once it trains round ``rnd``; the move happens at ``at_step``."""
    fleet.run_until(lambda: in_round(fleet, MOVER, rnd), max_time=60)
    assert fleet.machine(MOVER).round.step < at_step
    reply = fleet.command("cloud", "move", device=MOVER, edge="edge2", path=path, at_step=at_step)
    assert reply["ok"] and reply["result"]["forwarded"], reply
    return reply


@pytest.fixture
def unmoved() -> dict[str, np.ndarray]:
    """The same run without a move (per test: it runs in milliseconds, under the same torch settings)."""
    s, fleet = moving_fleet()
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)
    return {k: np.array(v) for k, v in fleet.global_state().items()}


@pytest.mark.parametrize("path", ["direct", "relay"])
def test_a_move_mid_round_ends_exactly_where_the_same_run_without_a_move_ends(path: str, unmoved) -> None:
    s, fleet = moving_fleet()
    transfers = fleet.watch(match("ckpt", msg_type=Transfer))
    ckpt = fleet.watch(match("ckpt", where=lambda p: MOVER in (p.src, p.dst)))
    move_mid_round(fleet, path)
    fleet.run_to_end(max_time=600)

    (done,) = fleet.events("migration_done")
    assert (done["source"], done["destination"], done["path"], done["step"], done["round"]) == \
        ("edge1", "edge2", path, 2, 0)
    assert done["checkpoint_bytes"] > 0 and done["pause_ms"] > 0
    # direct: the checkpoint goes edge1 -> edge2; relay: edge1 -> dev1 -> edge2.
    hops = [(p.src, p.dst) for p in transfers.hits]
    assert hops == ([("edge1", "edge2")] if path == "direct" else [("edge1", MOVER), (MOVER, "edge2")])
    ops = [type(p.msg).__name__ for p in ckpt.hits]
    assert ops[:2] == ["Expect", "Freeze"] and "Ready" in ops and ops[-1] == "Release"
    assert ("Frozen" in ops) == (path == "direct")

    # Equal up to float rounding: edge1 and edge2 now average different device sets before the cloud does.
    assert max_abs_diff(fleet.global_state(), unmoved) <= 1e-6
    entries = round_entries(fleet)
    r0, r1 = entries[0]["devices"][MOVER], entries[1]["devices"][MOVER]
    # Reported by the destination, with every mini-batch trained once at one edge or the other.
    assert r0["edge"] == "edge2" and r1["edge"] == "edge2"
    assert r0["edge_steps"] == r0["steps"] == entries[0]["devices"]["dev2"]["steps"]
    assert entries[0]["participants"] == 3 and entries[0]["missing"] == []
    assert fleet.machine(MOVER).edge == "edge2" and fleet.status(MOVER)["edge"] == "edge2"
    # The source forgot the frozen session once released.
    assert fleet.machine("edge1").session_of(MOVER) == (None, None)
    assert fleet.drops(reason="frozen") == [] and fleet.job_errors == []


@pytest.mark.parametrize("path", ["direct", "relay"])
def test_a_lone_device_that_moves_twice_ends_bit_identical_to_not_moving(path: str) -> None:
    """With one device the cloud's model is that device's training alone: no aggregation order to round
    differently, so the moved run must match to the last bit (weights, momentum, data position, RNG)."""
    s = spec({MOVER: "edge1"}, extra_edges=("edge2",))
    still = fleet_of(s)
    still.run_to_end(max_time=600)
    moved = fleet_of(s)
    move_mid_round(moved, path, at_step=1, rnd=0)
    moved.run_until(lambda: moved.events("migration_done"), max_time=60)
    moved.run_until(lambda: in_round(moved, MOVER, 1), max_time=60)
    moved.command(MOVER, "move", edge="edge1", path=path, at_step=4)  # and back, in round 1
    moved.run_to_end(max_time=600)
    assert [(m["source"], m["destination"], m["step"]) for m in moved.events("migration_done")] == \
        [("edge1", "edge2", 1), ("edge2", "edge1", 4)]
    assert max_abs_diff(moved.global_state(), still.global_state()) == 0.0
    assert_reference(moved, s, rounds=2)


def test_a_silent_destination_makes_the_device_abort_and_continue_at_the_source(unmoved) -> None:
    s, fleet = moving_fleet()
    lost = fleet.drop(match("ckpt", dst="edge2"), times=None)
    aborts = fleet.watch(match("ckpt", msg_type=Abort))
    move_mid_round(fleet, "direct")
    fleet.run_to_end(max_time=600)

    (failed,) = fleet.events("migration_failed")
    assert failed["action"] == "continue at source" and "destination" in failed["reason"]
    assert {type(p.msg) for p in lost.hits} >= {Transfer}  # the checkpoint was sent, and lost
    assert {p.dst for p in aborts.hits} == {"edge1", "edge2"}
    assert fleet.events("migration_done") == []
    # Nothing lost: the source unfroze the session and the device finished there.
    assert max_abs_diff(fleet.global_state(), unmoved) <= 1e-6
    assert round_entries(fleet)[0]["devices"][MOVER]["edge"] == "edge1"
    assert fleet.machine(MOVER).edge == "edge1"


@pytest.mark.parametrize("how", ["silent", "gone"])
def test_a_silent_or_dead_source_falls_back_to_a_restart_at_the_destination_through_the_cloud(how: str) -> None:
    s, fleet = moving_fleet()
    restarts = fleet.watch(match("ckpt", msg_type=Restart))
    leaves = fleet.watch(match("ckpt", msg_type=Leave))
    if how == "silent":
        fleet.drop(match("ckpt", msg_type=Freeze), times=None)
        move_mid_round(fleet, "direct")
    else:
        freezes = fleet.watch(match("ckpt", msg_type=Freeze))
        move_mid_round(fleet, "direct")
        fleet.run_until(lambda: freezes.hits, max_time=60)
        fleet.kill("edge1")  # before the freeze arrives: the source is gone with the device's state
        # edge1's other device cannot take part any more: let the next round start without it.
        assert fleet.command("cloud", "set", min_devices=2)["result"] == {"min_devices": 2}
    fleet.run_to_end(max_time=600)

    (fallback,) = fleet.events("migration_fallback")
    assert fallback["destination"] == "edge2" and fallback["source"] == "edge1"
    (restart,) = restarts.hits
    assert (restart.src, restart.dst, restart.msg.edge, restart.msg.source) == (MOVER, "cloud", "edge2", "edge1")
    assert [p.dst for p in leaves.hits] == ["edge1"]
    (again,) = fleet.events("round_restarted_for_device")
    assert again["device"] == MOVER and again["edge"] == "edge2" and again["round"] == 0
    # The device trained round 0 over from the global model at edge2: no step counted twice, nothing lost.
    entries = round_entries(fleet)
    r0 = entries[0]["devices"][MOVER]
    assert r0["edge"] == "edge2" and r0["steps"] == entries[0]["devices"]["dev3"]["steps"]
    if how == "silent":
        assert entries[0]["participants"] == 3
        assert fleet.machine("edge1").session_of(MOVER) == (None, None), "the Leave freed the source's session"
        assert_reference(fleet, s, rounds=2)
    else:
        # edge1 died with dev2's session too: dev2 is missing from round 0 and out of round 1 (edge offline).
        assert entries[0]["missing"] == ["dev2"] and entries[1]["participants"] == 2
        assert_reference(fleet, s, rounds=[["dev1", "dev3"], ["dev1", "dev3"]])
        assert fleet.status("edge1")["state"] == "offline"


def test_a_move_back_before_it_happened_cancels_it(unmoved) -> None:
    s, fleet = moving_fleet()
    ckpt = fleet.watch(match("ckpt"))
    fleet.run_until(lambda: in_round(fleet, MOVER, 0), max_time=60)
    first = fleet.command(MOVER, "move", edge="edge2", path="direct", at_step=3)
    assert first["ok"] and first["result"]["moved"] is False and "3" in first["result"]["when"]
    back = fleet.command(MOVER, "move", edge="edge1")
    assert back["ok"] and back["result"] == {"edge": "edge1", "moved": False, "reason": "already there",
                                             "cancelled": True}
    fleet.run_to_end(max_time=600)
    assert ckpt.hits == [] and fleet.events("migration_done") == [] and fleet.events("moved") == []
    assert max_abs_diff(fleet.global_state(), unmoved) <= 1e-6


def test_an_idle_move_switches_at_once_and_the_next_round_trains_at_the_new_edge(unmoved) -> None:
    s, fleet = moving_fleet()
    fleet.run_until(lambda: in_round(fleet, MOVER, 0), max_time=60)
    assert fleet.command("cloud", "pause")["ok"]  # round 0 completes, round 1 waits
    fleet.run_until(lambda: round_entries(fleet) and fleet.machine(MOVER).round is None, max_time=600)
    reply = fleet.command(MOVER, "move", edge="edge2", path="relay")
    assert reply["ok"] and reply["result"] == {"edge": "edge2", "moved": True, "when": "now (idle)"}
    (moved,) = fleet.events("moved")
    assert moved["destination"] == "edge2" and moved["during_round"] is False
    fleet.run_for(1.0)  # the new status reaches the cloud
    assert fleet.command("cloud", "resume")["ok"]
    fleet.run_to_end(max_time=600)

    entries = round_entries(fleet)
    assert [e["devices"][MOVER]["edge"] for e in entries] == ["edge1", "edge2"]
    assert fleet.events("migration_started") == [], "an idle move carries no state"
    assert max_abs_diff(fleet.global_state(), unmoved) <= 1e-6


def test_the_checkpoint_protocol_messages_all_survive_the_wire() -> None:
    """Both paths use every checkpoint operation, and each one crossed the codec and the typed parser."""
    seen: set[type] = set()
    for path in ("direct", "relay"):
        s, fleet = moving_fleet(rounds=1)
        w = fleet.watch(match("ckpt"))
        move_mid_round(fleet, path)
        fleet.run_to_end(max_time=600)
        seen |= {type(p.msg) for p in w.hits}
        assert all(isinstance(p.msg, Ckpt) for p in w.hits)
        assert fleet.drops() == []
    assert seen >= {Freeze, Frozen, Transfer, Ready, Release}
