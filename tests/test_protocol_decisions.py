"""Protocol decisions of the edge and cloud agents, driven message by message without a broker.

The agents' handlers are fed envelopes exactly as their transport would deliver them (decoded, sender
from the topic); what they publish is captured instead of sent. These are the orderings that are hard to
force through real processes: late deltas of an earlier attempt, a device added to a round that a
migration opened, malformed reports, an abandoned move, a stale 'missing' report.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from cloud_agent.agent import CloudAgent
from edge_agent.agent import EdgeAgent
from mqttfl.ml.models import build_model, model_state, split_model
from mqttfl.protocol.messages import Plan, ProtocolError, clean_report
from mqttfl.runtime.config import load_config
from mqttfl.runtime.outbox import Outbox
from mqttfl.runtime.transport import Inbound
from mqttfl.wire.codec import Envelope
from mqttfl.wire.topics import Topic

CUT = 2


def _inbound(kind: str, src: str, dst: str, body: dict[str, Any], tensors: dict | None = None, *,
             run: str = "r", round: int = 0) -> Inbound:
    env = Envelope(kind=kind, src=src, dst=dst, body=body, tensors=tensors or {}, run=run, round=round,
                   ts=time.time())
    return Inbound(Topic("f", kind, src, dst), env, None, False, time.monotonic())


class Sent(list):
    def __call__(self, kind: str, dst: str, **kw: Any) -> None:
        self.append((kind, dst, kw))

    def of(self, kind: str, dst: str | None = None) -> list[dict[str, Any]]:
        return [kw for k, d, kw in self if k == kind and (dst is None or d == dst)]


@pytest.fixture
def edge(tmp_path):
    cfg = load_config(None, "edge", environ={}, node="edge2", fleet="f", state_dir=str(tmp_path / "edge"))
    agent = EdgeAgent(cfg)
    sent = Sent()
    agent.transport.send = sent  # type: ignore[method-assign]
    agent.transport.event = lambda *a, **k: None  # type: ignore[method-assign]
    agent.transport.set_status = lambda *a, **k: None  # type: ignore[method-assign]
    agent.transport.ack = lambda msg: sent.append(("ack", msg.src, {"id": msg.env.id}))  # type: ignore
    return agent, sent


def _plan(attempt: int = 0) -> Plan:
    return Plan(run="r", round=0, attempt=attempt, model="mlp", input_shape=(64,), batch_size=8)


def _global() -> dict[str, np.ndarray]:
    return model_state(build_model("mlp", seed=0))


def _announce(agent: EdgeAgent, plan: Plan, devices: dict[str, int]) -> None:
    agent.on_global_model(_inbound("model", "cloud", agent.node, {"plan": plan.to_body(),
                                   "devices": {d: {"cut": c} for d, c in devices.items()}}, _global(),
                                   round=plan.round))


def _device_delta(attempt: int, **report: Any) -> Inbound:
    dev_keys = {k: np.zeros_like(v) for k, v in _global().items() if int(k.split(".")[0]) < CUT}
    return _inbound("delta", "dev1", "edge2", {"samples": 10, "attempt": attempt, **report}, dev_keys)


def test_a_delta_of_an_earlier_attempt_is_acknowledged_but_never_applied(edge):
    agent, sent = edge
    _announce(agent, _plan(attempt=1), {"dev1": CUT})
    agent.on_device_delta(_device_delta(attempt=0))
    _, s = agent.session_of("dev1")
    assert s is not None and s.delta is None, "attempt 0's delta must not stand in for attempt 1's"
    assert sent.of("ack", "dev1"), "acknowledged, so the device's outbox stops re-sending it"
    agent.on_device_delta(_device_delta(attempt=1))
    assert s.delta is not None


def test_a_device_report_with_a_non_numeric_field_is_refused(edge):
    agent, sent = edge
    _announce(agent, _plan(), {"dev1": CUT})
    agent.on_device_delta(_device_delta(attempt=0, t_local="x"))
    assert agent.session_of("dev1")[1].delta is None
    with pytest.raises(ProtocolError):
        clean_report({"samples": float("nan")})
    assert clean_report({"samples": 5.0, "t_local": 1, "evil": "x"}) == {"samples": 5, "t_local": 1.0}


def _checkpoint_message(device: str, mid: str, src: str | None = None) -> Inbound:
    model = build_model("mlp", seed=0)
    _, part = split_model(model, CUT)
    from mqttfl.protocol.checkpoint import EdgeCheckpoint

    ck = EdgeCheckpoint(device=device, migration=mid, plan=_plan(), cut=CUT, weights=part.state(), momentum={},
                        base=part.state(), expected=(3, 0), steps=3, loss_sum=1.0, seen=24, n_micro=1,
                        smashed_shape=(64,), rng=np.zeros(8, dtype=np.uint8))
    body, tensors = ck.to_message()
    body.update(op="transfer", path="relay")
    # Relayed (src = the device itself carries it) unless an edge sends it directly.
    return _inbound("ckpt", src or device, "edge2", body, tensors)


def test_a_device_added_to_a_round_that_a_migration_opened_gets_the_full_device_part(edge):
    agent, sent = edge
    agent.on_transfer(_checkpoint_message("dev1", "m1"))  # edge2 was not in the round: only base weights
    assert sent.of("ckpt", "dev1")[-1]["body"]["op"] == "ready"
    _announce(agent, _plan(), {"dev2": CUT})  # the cloud restarts dev2's round here
    (model_msg,) = sent.of("model", "dev2")
    expected = {k for k in _global() if int(k.split(".")[0]) < CUT}
    assert set(model_msg["tensors"]) == expected


def test_an_abandoned_move_is_undone_at_the_destination_and_a_late_checkpoint_cannot_replace_a_restart(edge):
    agent, sent = edge
    agent.on_transfer(_checkpoint_message("dev1", "m1"))
    agent.on_abort(_inbound("ckpt", "dev1", "edge2", {"op": "abort", "migration": "m1"}))
    assert agent.session_of("dev1") == (None, None), "the session installed for the failed move is gone"
    _announce(agent, _plan(), {"dev1": CUT})  # the device restarted its round here from the global model
    agent.on_transfer(_checkpoint_message("dev1", "m2"))  # a checkpoint arriving late
    assert sent.of("ckpt", "dev1")[-1]["body"]["op"] == "refused"
    assert agent.session_of("dev1")[1].expected == (0, 0), "the fresh session was kept"


def test_only_the_edge_a_device_is_assigned_to_can_report_it_missing(tmp_path):
    cfg = load_config(None, "cloud", environ={}, node="cloud", fleet="f", state_dir=str(tmp_path / "cloud"),
                      cloud={"model": "mlp", "input_shape": [64], "run": "r", "deadline_s": 60.0})
    cloud = CloudAgent(cfg)
    for name in ("send", "event", "set_status", "metrics", "ack"):
        setattr(cloud.transport, name, lambda *a, **k: None)
    for node, status in {"edge1": {"role": "edge"}, "edge2": {"role": "edge"},
                         "dev1": {"role": "device", "edge": "edge1"}}.items():
        cloud.fleet[node] = {**status, "state": "idle"}
    cloud.start_round({"dev1": cloud.fleet["dev1"]}, time.monotonic())
    r = cloud.current
    assert r is not None
    r.move("dev1", "edge2")  # the device restarted its round at edge2
    cloud.on_edge_delta(_inbound("delta", "edge1", "cloud", {"attempt": r.plan.attempt, "samples": 0,
                                                              "devices": {}, "missing": ["dev1"]},
                                 round=r.plan.round))
    assert not cloud.accounted(r), "edge1's timed-out session must not close the round"


def test_outbox_reads_a_payload_only_when_due_and_gives_up_after_max_age(tmp_path):
    box = Outbox(tmp_path / "ob", max_age_s=100.0)
    box.put("aa", "t", b"x" * 10, now=0.0)
    assert box.due(now=1.0, resend_after=5.0) == []
    (e,) = box.due(now=6.0, resend_after=5.0)
    assert e.payload == b"x" * 10
    box.mark_sent("aa", 6.0)
    assert Outbox(tmp_path / "ob").keys() == ["aa"], "pending entries survive a restart"
    assert box.due(now=200.0, resend_after=5.0) == [] and box.expired == 1 and len(box) == 0


def test_a_direct_checkpoint_is_accepted_only_from_the_source_the_device_named(edge):
    agent, sent = edge
    agent.on_transfer(_checkpoint_message("dev1", "m1", src="dev9"))  # a node posing as an edge
    assert agent.session_of("dev1") == (None, None) and not sent.of("ckpt", "dev1")
    agent.on_ckpt(_inbound("ckpt", "dev1", "edge2", {"op": "expect", "migration": "m1", "source": "edge1"}))
    agent.on_transfer(_checkpoint_message("dev1", "m1", src="dev9"))
    assert agent.session_of("dev1") == (None, None), "still not the source the device named"
    agent.on_transfer(_checkpoint_message("dev1", "m1", src="edge1"))
    assert sent.of("ckpt", "dev1")[-1]["body"]["op"] == "ready"
    assert agent.session_of("dev1")[1].expected == (3, 0)


def test_an_idle_move_overtaken_by_a_round_at_the_old_edge_keeps_its_path_and_step(tmp_path):
    from device_agent.agent import DeviceAgent
    from mqttfl.ml.data import load_digits, save_shard

    train, _ = load_digits((64,))
    save_shard(tmp_path / "shard.npz", train.subset(np.arange(40)))
    cfg = load_config(None, "device", environ={}, node="dev1", fleet="f", state_dir=str(tmp_path / "dev"),
                      device={"edge": "edge1", "data": str(tmp_path / "shard.npz")})
    dev = DeviceAgent(cfg)
    for name in ("send", "event", "set_status", "send_json"):
        setattr(dev.transport, name, lambda *a, **k: None)
    ctl = Inbound(Topic("f", "ctl", "operator", "dev1"), None, {}, False, time.monotonic())
    assert dev.cmd_move(ctl, {"edge": "edge2", "path": "relay", "at_step": 3})["when"] == "now (idle)"
    dev_part = {k: v for k, v in _global().items() if int(k.split(".")[0]) < CUT}
    accepted = dev._accept_model(_inbound("model", "edge1", "dev1", {"plan": _plan().to_body(), "cut": CUT},
                                          dev_part))
    assert accepted is not None, "the round announced at the old edge is trained there"
    assert dev.edge == "edge1" and dev.pending_move == ("edge2", "relay") and dev.move_at_step == 3
