"""Faults on the wire and at the nodes, in memory: duplicates, reordering, losses, deadlines, restarts.

Every recovery is checked where it matters: the global model still equals unsplit FedAvg over the devices
that took part, so a message applied twice, a step trained twice or a lost update cannot go unnoticed.
"""

from __future__ import annotations

from typing import Any

from mqttfl.protocol.events import LinkChanged
from mqttfl.protocol.messages import Activations, DeviceUpdate, EdgeUpdate, Gradients
from mqttfl.runtime.memory import MemoryFleet, match
from tests.pair.common import assert_reference, fleet_of, initial_global, max_abs_diff, round_entries, spec

DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}
QUICK = {"act_timeout_s": 1.0}


def fleet3(cloud: dict[str, Any] | None = None, **kw: Any) -> tuple[Any, MemoryFleet]:
    s = spec(DEVICES, cloud=cloud, device_extra={d: dict(QUICK) for d in DEVICES})
    return s, fleet_of(s, **kw)


def act(step: int, micro: int = 0, src: str = "dev1") -> Any:
    return match("act", src=src, where=lambda p: p.msg.round == 0 and (p.msg.step, p.msg.micro) == (step, micro))


# ------------------------------------------------------------------------------------------------ duplicates


def test_redelivered_messages_are_dropped_by_id_and_nothing_is_applied_twice() -> None:
    s, fleet = fleet3()
    dup = fleet.duplicate(lambda p: p.kind != "status", times=None)  # QoS 1 redelivery: the same message id
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)
    assert len(dup.hits) > 100
    for node in ("cloud", "edge1", "edge2", "dev1", "dev3"):
        assert fleet.counts(node)["duplicate"] > 0, node
    assert fleet.counts("edge1")["grad_resent"] == 0, "a redelivery never reaches the machine"


def test_resent_activations_are_answered_from_the_gradient_cache_and_trained_once() -> None:
    s, fleet = fleet3({"micro_batches": 2})
    # A sender-side re-send carries a fresh id, so only the machines can recognise it.
    acts = fleet.duplicate(match("act"), times=None, fresh_id=True)
    deltas = fleet.duplicate(match("delta"), times=None, fresh_id=True)
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)
    edge1_acts = sum(1 for p in acts.hits if p.dst == "edge1")
    assert fleet.counts("edge1")["grad_resent"] == edge1_acts > 0, "every copy answered from the cache"
    assert {type(p.msg) for p in deltas.hits} == {DeviceUpdate, EdgeUpdate}
    for e in round_entries(fleet):
        for d, v in e["devices"].items():
            assert v["edge_steps"] == v["steps"], f"{d} trained a mini-batch twice at its edge"
        assert e["participants"] == 3


# ------------------------------------------------------------------------------------------------ losses


def test_a_reordered_activation_is_dropped_and_recovered_by_the_device_resend_timer() -> None:
    s, fleet = fleet3({"micro_batches": 3})
    swap = fleet.reorder(act(1, 0))  # (1, 0) arrives after (1, 1)
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)
    assert len(swap.hits) == 1
    out_of_order = fleet.drops(node="edge1", reason="out_of_order")
    assert out_of_order and "act (1, 1)" in out_of_order[0]["detail"]
    assert round_entries(fleet)[0]["devices"]["dev1"]["resends"] > 0


def test_a_lost_activation_and_a_lost_gradient_are_recovered_by_the_device_resend_timer() -> None:
    s, fleet = fleet3()
    lost_act = fleet.drop(act(1))
    lost_grad = fleet.drop(match("grad", dst="dev1", where=lambda p: (p.msg.round, p.msg.step) == (0, 3)))
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)
    assert isinstance(lost_act.hits[0].msg, Activations) and isinstance(lost_grad.hits[0].msg, Gradients)
    # The lost act is trained when it comes again; the act whose gradient was lost is answered from cache.
    assert fleet.counts("edge1")["grad_resent"] == 1
    dev1 = round_entries(fleet)[0]["devices"]["dev1"]
    assert dev1["resends"] == 2 and dev1["edge_steps"] == dev1["steps"]
    assert dev1["T_local"] >= 2 * QUICK["act_timeout_s"], "each loss cost one re-send timeout"


def test_a_link_coming_back_makes_the_device_resend_at_once() -> None:
    s = spec({"dev1": "edge1"}, cloud={"rounds": 1})  # the default 10 s re-send timeout
    fleet = fleet_of(s)
    lost = fleet.drop(match("grad", dst="dev1", where=lambda p: p.msg.step == 2))
    fleet.run_until(lambda: lost.hits, max_time=60)
    fleet.run_for(0.5)  # the device waits for the gradient; its timer is far away
    fleet.inject("dev1", LinkChanged(up=True))  # the runtime reports the link back up
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=1)
    assert fleet.counts("edge1")["grad_resent"] == 1
    dev1 = round_entries(fleet)[0]["devices"]["dev1"]
    assert dev1["resends"] == 1 and dev1["T_local"] < 10.0, "recovered without waiting for the timer"


def test_a_lost_edge_delta_and_a_lost_ack_are_recovered_by_the_reliable_resend() -> None:
    s, fleet = fleet3()
    lost = fleet.drop(match("delta", msg_type=EdgeUpdate, src="edge1"))
    lost_ack = fleet.drop(match("ack", src="cloud", dst="edge2"))
    sent = fleet.watch(match("delta", msg_type=EdgeUpdate))
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)
    assert len(lost.hits) == len(lost_ack.hits) == 1
    resent = [p for p in sent.hits if p.resend]
    assert {p.src for p in resent} == {"edge1", "edge2"}
    first_id = lost.hits[0].env.id if lost.hits[0].env else None
    assert all(p.env and p.env.id == first_id for p in resent if p.src == "edge1"), "re-sent with the same id"
    # The cloud applied edge2's first copy and answered the second (same id) with another ack only.
    assert fleet.counts("cloud")["duplicate"] >= 1
    assert round_entries(fleet)[0]["round_s"] >= fleet.resend_after_s
    fleet.run_for(1.0)  # the last acks are on their way when the run completes
    assert all(not fleet.nodes[e].outbox for e in ("edge1", "edge2", "dev1", "dev2", "dev3"))


def test_a_lost_device_delta_is_resent_and_acknowledged_once_applied() -> None:
    s, fleet = fleet3()
    lost = fleet.drop(match("delta", msg_type=DeviceUpdate, src="dev3"))
    fleet.run_to_end(max_time=600)
    assert_reference(fleet, s, rounds=2)
    assert len(lost.hits) == 1 and not fleet.nodes["dev3"].outbox
    assert fleet.counts("edge2")["acked"] >= 2  # the cloud acked edge2's deltas; dev3 got its acks
    assert fleet.counts("dev3")["acked"] == 2


# ------------------------------------------------------------------------------------------------ timers


def test_a_silent_device_is_reported_missing_at_the_deadline_and_the_round_counts_with_quorum() -> None:
    s, fleet = fleet3({"deadline_s": 20.0, "quorum": 0.5})
    fleet.run_until(lambda: fleet.machine("dev2").round is not None, max_time=60)
    fleet.kill("dev2")
    assert fleet.command("cloud", "set", min_devices=2)["ok"]  # round 1 goes ahead without it
    fleet.run_to_end(max_time=600)

    (missing,) = fleet.events("devices_missing")
    assert missing["node"] == "edge1" and missing["devices"] == ["dev2"] and missing["timed_out"] is True
    assert missing["ts"] >= 0.85 * 20.0  # the edge's deadline fraction of the cloud's
    e0, e1 = round_entries(fleet)
    assert (e0["participants"], e0["missing"]) == (2, ["dev2"]) and e0["round_s"] >= 0.85 * 20.0
    assert (e1["participants"], sorted(e1["devices"])) == (2, ["dev1", "dev3"]), "offline: not in round 1"
    assert fleet.status("dev2")["state"] == "offline"
    assert fleet.machine("cloud").fleet["dev2"].online is False
    assert_reference(fleet, s, rounds=[["dev1", "dev3"], ["dev1", "dev3"]])


def test_below_quorum_a_round_is_retried_then_the_run_fails() -> None:
    s, fleet = fleet3({"deadline_s": 10.0, "quorum": 1.0, "max_attempts": 2})
    silenced = fleet.drop(match(src="dev2", where=lambda p: p.kind != "status"), times=None)
    failed = fleet.run_to_end(max_time=600)

    assert failed["event"] == "run_failed" and "quorum not met in 2 attempts" in failed["reason"]
    assert silenced.hits
    assert [(e["round"], e["attempt"]) for e in fleet.events("round_started")] == [(0, 0), (0, 1)]
    misses = fleet.events("quorum_not_met")
    assert [(m["attempt"], m["reported"], m["needed"], m["action"]) for m in misses] == \
        [(0, 2, 3, "retry"), (1, 2, 3, "fail")]
    assert fleet.status("cloud")["state"] == "failed" and round_entries(fleet) == []
    assert max_abs_diff(fleet.global_state(), initial_global(s)) == 0.0, "nothing below quorum was applied"
    saved = fleet.persisted("cloud")
    assert saved is not None and saved["state"] == "failed"


# ------------------------------------------------------------------------------------------------ restarts


def test_a_cloud_restarted_mid_round_resumes_from_its_persisted_state_with_a_new_attempt() -> None:
    s, fleet = fleet3({"rounds": 3})
    fleet.run_until(lambda: len(round_entries(fleet)) == 1 and (r := fleet.machine("dev1").round) is not None
                    and r.plan.round == 1 and r.step >= 2, max_time=600)
    fleet.kill("cloud")
    fleet.run_for(2.0)  # the edges finish the round; their deltas wait in the broker's session
    fleet.restart("cloud")
    fleet.run_to_end(max_time=600)

    (resumed,) = fleet.events("resumed")
    assert resumed["round"] == 1
    assert [(e["round"], e["attempt"]) for e in round_entries(fleet)] == [(0, 0), (1, 1), (2, 0)]
    # The old attempt's deltas were acknowledged (the edges stop re-sending) and not applied.
    assert fleet.drops(node="cloud", reason="wrong_round")
    fleet.run_for(1.0)
    assert all(not fleet.nodes[e].outbox for e in ("edge1", "edge2"))
    assert_reference(fleet, s, rounds=3)


def test_a_cloud_restarted_after_acknowledging_a_delta_never_reannounces_that_attempt() -> None:
    """The first round of a run has nothing persisted until it commits. A cloud killed after it acknowledged an
    edge's delta must not open the same (run, round, attempt) again: the devices that finished it would ignore
    the announcement, and their edge would report them missing. Twice, to cover a restart after a restart."""
    s = spec({"dev1": "edge1", "dev2": "edge2"}, cloud={"deadline_s": 20.0},
             device_extra={"dev2": {"slowdown": 20.0}})  # edge1 reports long before edge2
    fleet = fleet_of(s)
    ups = fleet.watch(match("delta", msg_type=EdgeUpdate, src="edge1"))
    for attempt in (0, 1):
        def acknowledged(a: int = attempt) -> bool:  # edge1's delta of this attempt was applied and acked
            return any(p.msg.attempt == a for p in ups.hits) and not fleet.nodes["edge1"].outbox

        fleet.run_until(acknowledged, max_time=60)
        fleet.restart("cloud")
    fleet.run_to_end(max_time=600)
    assert [(e["round"], e["attempt"]) for e in fleet.events("round_started")][-3:] == [(0, 1), (0, 2), (1, 0)]
    assert fleet.events("devices_missing") == []
    assert [(e["round"], e["participants"]) for e in round_entries(fleet)] == [(0, 2), (1, 2)]
    assert_reference(fleet, s, rounds=2)


def test_an_edge_killed_mid_round_resumes_its_sessions_and_the_round_keeps_every_device() -> None:
    """Finding 6: an edge killed mid-round lost its devices' work; the round closed at the deadline or was retried.
    With the defaults (a round here is shorter than resume_every) the edge saved its sessions when the round
    opened: restarted, it reads them back, its devices replay from there, and the round completes at its
    first attempt with every device, on exactly the weights of a run without a crash."""
    s, fleet = fleet3({"deadline_s": 20.0, "quorum": 0.5})
    fleet.run_until(lambda: (r := fleet.machine("dev1").round) is not None and r.step >= 3, max_time=60)
    fleet.restart("edge1")
    fleet.run_to_end(max_time=600)
    assert fleet.events("quorum_not_met") == [] and fleet.events("devices_missing") == []
    assert [(e["round"], e["attempt"], e["participants"]) for e in round_entries(fleet)] == [(0, 0, 3), (1, 0, 3)]
    assert_reference(fleet, s, rounds=2)
    resumed = {e["device"]: e for e in fleet.events("round_resumed")}
    assert set(resumed) == {"dev1", "dev2"} and resumed["dev1"]["step"] == 0 and resumed["dev1"]["replayed"] >= 3


def test_an_edge_killed_mid_round_resumes_from_the_last_boundary_it_saved_and_loses_no_work() -> None:
    s, fleet = fleet3({"deadline_s": 20.0, "quorum": 0.5, "resume_every": 2})
    fleet.run_until(lambda: (r := fleet.machine("dev1").round) is not None and r.step >= 3, max_time=60)
    assert fleet.nodes["edge1"].keyed, "the edge saved its sessions"
    fleet.restart("edge1")
    fleet.run_to_end(max_time=600)
    resumed = fleet.events("round_resumed")
    assert {e["device"] for e in resumed} == {"dev1", "dev2"} and all(e["step"] % 2 == 0 for e in resumed)
    assert fleet.events("edge_resumed", node="edge1")
    assert fleet.events("quorum_not_met") == [] and fleet.events("devices_missing") == []
    assert [(e["round"], e["attempt"], e["participants"]) for e in round_entries(fleet)] == [(0, 0, 3), (1, 0, 3)]
    assert_reference(fleet, s, rounds=2)
    assert not fleet.nodes["edge1"].keyed, "a reported round leaves nothing saved behind"


def test_an_edge_killed_after_saving_a_boundary_but_before_its_last_gradient_arrived_answers_it_from_disk() -> None:
    """The race: the edge steps and saves boundary 4, but dies before the device gets the gradient that ends
    mini-batch 3. The device cannot go forward to 4 by itself nor back (the edge is past 3): the saved session
    carries that mini-batch's gradients, and the restored edge answers the device's re-sent activation."""
    s, fleet = fleet3({"deadline_s": 20.0, "resume_every": 2})
    lost = fleet.drop(match("grad", dst="dev1", where=lambda p: p.msg.round == 0 and p.msg.step == 3))
    fleet.run_until(lambda: lost.hits, max_time=60)
    fleet.restart("edge1")
    fleet.run_to_end(max_time=600)
    assert fleet.events("round_rejoin") == []
    (dev1,) = fleet.events("round_resumed", device="dev1")
    assert (dev1["step"], dev1["replayed"]) == (4, 0)
    assert [(e["round"], e["attempt"], e["participants"]) for e in round_entries(fleet)] == [(0, 0, 3), (1, 0, 3)]
    assert_reference(fleet, s, rounds=2)


def test_an_edge_restarted_without_saved_sessions_has_its_devices_rejoin_the_round_through_the_cloud() -> None:
    """Without saved sessions (resume_every = 0) the restarted edge tells each device it lost its session; the
    device asks the cloud to restart its part there, and the round still completes with every device."""
    s, fleet = fleet3({"deadline_s": 20.0, "quorum": 0.5, "resume_every": 0})
    fleet.run_until(lambda: (r := fleet.machine("dev1").round) is not None and r.step >= 2, max_time=60)
    assert not fleet.nodes["edge1"].keyed
    fleet.restart("edge1")
    fleet.run_to_end(max_time=600)
    assert {e["device"] for e in fleet.events("round_rejoin")} == {"dev1", "dev2"}
    assert fleet.events("quorum_not_met") == []
    assert [(e["round"], e["attempt"], e["participants"]) for e in round_entries(fleet)] == [(0, 0, 3), (1, 0, 3)]
    assert_reference(fleet, s, rounds=2)
