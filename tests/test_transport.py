"""Transport against the real broker: round trips, chunking, drops reported, ordering of presence."""

from __future__ import annotations

import os

import numpy as np

from mqttfl.runtime.transport import Transport
from mqttfl.wire.codec import Envelope, encode
from tests.helpers import agent_config, wait_for


def _pair(broker, fleet, tmp_path, **mqtt):
    a = Transport(agent_config(broker, fleet, "alice", state_dir=tmp_path / "a", **mqtt)).start()
    b = Transport(agent_config(broker, fleet, "bob", state_dir=tmp_path / "b", **mqtt)).start()
    return a, b


def _next(t: Transport, timeout: float = 5.0, skip=("status",)):
    """Next message that is not a broadcast of presence (every node sees every node's status)."""
    while True:
        msg = t.get(timeout=timeout)
        assert msg is not None, "no message"
        if msg.kind not in skip:
            return msg


def test_envelope_round_trip_between_two_nodes(broker, fleet, tmp_path):
    a, b = _pair(broker, fleet, tmp_path)
    try:
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        a.send("act", "bob", body={"step": 1}, tensors={"x": x}, round=3)
        msg = _next(b)
        assert msg.src == "alice" and msg.kind == "act" and msg.env.round == 3
        np.testing.assert_array_equal(msg.env.tensors["x"], x)
    finally:
        a.stop()
        b.stop()


def test_large_payload_is_chunked_and_reassembled(broker, fleet, tmp_path):
    a, b = _pair(broker, fleet, tmp_path, chunk_bytes=64 * 1024)
    try:
        x = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)  # 1.2 MB -> ~19 chunks
        a.send("delta", "bob", tensors={"w": x})
        msg = _next(b)
        np.testing.assert_array_equal(msg.env.tensors["w"], x)
        assert b.stats_snapshot().get("rx_delta") == 1
    finally:
        a.stop()
        b.stop()


def test_malformed_payloads_are_dropped_counted_and_reported(broker, fleet, tmp_path):
    a, b = _pair(broker, fleet, tmp_path)
    mon = Transport(agent_config(broker, fleet, "monitor"), subscriptions=[f"mqttfl/v1/{fleet}/event/+/all"]).start()
    try:
        t = a.topic("grad", "bob")
        a.client.publish(t, os.urandom(64), qos=1)
        a.client.publish(t, encode(Envelope(kind="grad", src="alice", dst="bob",
                                            tensors={"g": np.array([np.nan], dtype=np.float32)})), qos=1)
        # A well-formed envelope whose body claims another sender than the broker-checked topic.
        a.client.publish(t, encode(Envelope(kind="grad", src="carol", dst="bob")), qos=1)
        a.send("grad", "bob", body={"ok": True})
        msg = _next(b)
        assert msg.env.body == {"ok": True}, "the valid message after the bad ones still arrives"
        stats = b.stats_snapshot()
        assert stats["dropped"] == 3
        assert stats.get("drop_non_finite") == 1 and stats.get("drop_spoofed") == 1
        events = []

        def collect():
            m = mon.get(0.1)
            if m is not None and m.kind == "event":
                events.append(m.data)
            return len(events) >= 3

        wait_for(collect, what="three drop events")
        assert {e["reason"] for e in events} >= {"non_finite", "spoofed"}, events
        assert all(e["event"] == "dropped" and e["node"] == "bob" for e in events)
    finally:
        a.stop()
        b.stop()
        mon.stop()


def test_duplicate_envelope_delivered_once(broker, fleet, tmp_path):
    a, b = _pair(broker, fleet, tmp_path)
    try:
        payload = encode(Envelope(kind="act", src="alice", dst="bob", body={"n": 1}))
        for _ in range(3):
            a.client.publish(a.topic("act", "bob"), payload, qos=1)
        assert _next(b).env.body == {"n": 1}
        late = b.get(timeout=0.5)
        assert late is None or late.kind == "status"
        assert b.stats_snapshot()["duplicate"] == 2
    finally:
        a.stop()
        b.stop()


def test_retained_status_announces_presence_with_boot_number(broker, fleet, tmp_path):
    a = Transport(agent_config(broker, fleet, "alice", state_dir=tmp_path / "a")).start()
    a.set_status("idle", edge="edge1")
    mon = Transport(agent_config(broker, fleet, "monitor"), subscriptions=[f"mqttfl/v1/{fleet}/status/+/all"]).start()
    try:
        msg = wait_for(lambda: (m := mon.get(0.1)) is not None and m.data.get("state") == "idle" and m,
                       what="retained status")
        assert msg.retained and msg.data["boot"] == 1 and msg.data["edge"] == "edge1"
    finally:
        a.stop()
        mon.stop()
