"""Budgets per sender against the real broker (docs/design.md, "Trust"; docs/operations.md, "Budgets"): one
node that floods another, fills its reassembly table, or acknowledges what it was never sent exhausts only its
own budget, and everything it is refused is counted and reported.

"Never arrives" is proven as in tests/test_broker_security.py: Mosquitto keeps one publisher's order, so once
a later message from the same sender is in, the earlier ones can no longer come.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mqttfl.runtime.config import ConfigError, load_config
from mqttfl.runtime.outbox import Outbox
from mqttfl.runtime.transport import Transport
from mqttfl.tools.broker import Broker
from mqttfl.wire.chunking import make_chunks
from mqttfl.wire.codec import Envelope, encode
from mqttfl.wire.topics import topic
from tests.helpers import wait_for

MIB = 1024 * 1024


def node(broker: Broker, fleet: str, name: str, tmp_path: Path | None = None, **limits: float) -> Transport:
    cfg = load_config(None, "cloud", environ={}, node=name, fleet=fleet, limits=limits,
                      state_dir=str(tmp_path / name) if tmp_path else "",
                      mqtt={"host": broker.host, "port": broker.port})
    outbox = Outbox(tmp_path / name / "outbox") if tmp_path else None
    return Transport(cfg, outbox=outbox).start()


class Raw:
    """A client publishing whatever it likes, but only as itself (the topic's sender level)."""

    def __init__(self, broker: Broker, fleet: str, name: str) -> None:
        self.fleet, self.name = fleet, name
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{name}-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, kind: str, dst: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic(self.fleet, kind, self.name, dst), payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drain(t: Transport, until: float) -> list:
    out = []
    while time.monotonic() < until:
        m = t.get(0.05)
        if m is not None and m.kind != "status":
            out.append(m)
    return out


def test_a_sender_filling_the_reassembly_table_blocks_only_itself(
        broker: Broker, fleet: str) -> None:
    """Finding 4: 64 tiny never-completed transfers, re-sent every 20 s, made the cloud refuse the edges' deltas
    until the run failed. The cap is per sender now (16 open transfers by default), so the edge's delta gets
    through; that duplicates never keep a transfer alive is tests/test_chunking.py's."""
    cloud = node(broker, fleet, "cloud")
    edge = node(broker, fleet, "edge1")
    mallory = Raw(broker, fleet, "mallory")
    try:
        firsts = [make_chunks(os.urandom(4096), 1024)[0] for _ in range(64)]
        for f in firsts:
            mallory.publish("delta", "cloud", f)
        x = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)  # 1.2 MB: two 1 MiB chunks
        edge.send("delta", "cloud", tensors={"w": x})
        got = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # mallory re-sends its frames twice a second: duplicates
            for f in firsts:
                mallory.publish("delta", "cloud", f)
            got += drain(cloud, time.monotonic() + 0.5)
        assert [m.src for m in got] == ["edge1"]
        np.testing.assert_array_equal(got[0].env.tensors["w"], x)
        stats = cloud.stats_snapshot()
        assert stats["drop_sender_budget"] == 48, stats  # 64 transfers, 16 admitted
        assert cloud._reassembler.reserved_by("mallory") == 16 * 4096
    finally:
        mallory.close()
        cloud.stop()
        edge.stop()


def test_a_flooding_sender_loses_only_its_own_messages_and_the_drops_are_reported(broker: Broker, fleet: str) -> None:
    cloud = node(broker, fleet, "cloud", sender_queue=64, sender_rate=200.0)
    edge = node(broker, fleet, "edge1")
    mallory = Raw(broker, fleet, "mallory")
    junk = encode(Envelope(kind="act", src="mallory", dst="cloud", body={"op": "micro"}))
    try:
        for i in range(3000):
            mallory.publish("act", "cloud", junk)
            if i % 300 == 0:
                edge.send("delta", "cloud", body={"n": i // 300})
        info = mallory.publish("act", "cloud", b"last")
        info.wait_for_publish(10)
        edge.send("delta", "cloud", body={"n": "last"})
        got = []
        wait_for(lambda: (got.extend(m for m in drain(cloud, time.monotonic() + 0.2) if m.src == "edge1"),
                          any(m.env.body.get("n") == "last" for m in got))[1], timeout=30)
        assert [m.env.body["n"] for m in got] == [*range(10), "last"], "every legitimate message, in order"
        cloud.housekeeping(time.monotonic())
        stats = cloud.stats_snapshot()
        refused = stats.get("drop_rate_limited", 0) + stats.get("drop_sender_queue_full", 0)
        assert refused > 1000, stats
        assert stats.get("drop_inbox_full", 0) == 0, "the flood never filled the shared inbox"
    finally:
        mallory.close()
        cloud.stop()
        edge.stop()


def test_an_ack_counts_only_from_the_node_the_message_was_sent_to(broker: Broker, fleet: str, tmp_path: Path) -> None:
    """Finding 5: acknowledgements were accepted for any outbox entry from any sender."""
    alice = node(broker, fleet, "alice", tmp_path)
    bob = node(broker, fleet, "bob")
    mallory = Raw(broker, fleet, "mallory")
    try:
        env = alice.send("delta", "bob", body={"x": 1}, reliable=True)
        key = env.id.hex()
        forged = encode(Envelope(kind="ack", src="mallory", dst="alice", body={"ids": [key], "of": "delta"}))
        mallory.publish("ack", "alice", forged)
        wait_for(lambda: (alice.get(0.05), alice.stats_snapshot().get("drop_ack_not_from_receiver"))[1], timeout=10)
        assert key in alice.outbox, "another node's ack clears nothing"
        msg = wait_for(lambda: next((m for m in drain(bob, time.monotonic() + 0.1) if m.kind == "delta"), None))
        bob.ack(msg)
        wait_for(lambda: (alice.get(0.05), key not in alice.outbox)[1], timeout=10)
    finally:
        mallory.close()
        alice.stop()
        bob.stop()


def test_memory_held_by_never_completed_transfers_is_released_when_they_expire(broker: Broker, fleet: str) -> None:
    cloud = node(broker, fleet, "cloud", transfer_idle_s=1.0)
    mallory = Raw(broker, fleet, "mallory")
    try:
        for _ in range(3):
            frames = make_chunks(os.urandom(8 * MIB), MIB)
            for f in frames[:-2]:  # never completes
                mallory.publish("delta", "cloud", f)
        wait_for(lambda: (cloud.get(0.05), cloud._reassembler.transfers == 3 and
                          cloud._reassembler.bytes_held > 15 * MIB)[1], timeout=20)
        wait_for(lambda: (cloud.get(0.05), cloud.housekeeping(time.monotonic()),
                          cloud._reassembler.transfers == 0)[2], timeout=20)
        stats = cloud.stats_snapshot()
        assert stats["drop_expired"] == 3 and cloud._reassembler.bytes_held == 0
        assert stats.get("memory_released", 0) >= 1
    finally:
        mallory.close()
        cloud.stop()


def test_a_node_taking_part_in_a_round_retries_its_link_within_the_cap() -> None:
    """Finding 6: the backoff grew to reconnect_max_s (30 s) and a device came back after its edge's deadline."""
    cfg = load_config(None, "device", environ={}, node="dev1", mqtt={"reconnect_min_s": 0.5, "reconnect_max_s": 30.0})
    t = Transport(cfg)
    delays = []
    for t._attempt in range(1, 12):
        delays.append(t.backoff_delay())
    assert max(delays) > 10.0, "without a round the configured backoff applies"
    t.set_reconnect_cap(2.0)  # what ReconnectWithin(deadline_s / 20) sets for a 40 s round
    for t._attempt in range(1, 30):
        assert t.backoff_delay() <= 2.0
    t.set_reconnect_cap(None)
    assert t.backoff_delay() > 2.0


def test_budgets_default_by_role_small_for_devices_and_are_configured_in_limits(tmp_path: Path) -> None:
    dev = load_config(None, "device", environ={}, node="dev1")
    edge = load_config(None, "edge", environ={}, node="edge1")
    assert dev.budget.memory_bytes == 64 * MIB and dev.budget.sender_bytes == 32 * MIB
    assert edge.budget.memory_bytes == 512 * MIB
    cfg = load_config(None, "device", environ={}, node="dev1", limits={"memory_bytes": 16 * MIB,
                                                                      "sender_bytes": 8 * MIB})
    assert cfg.budget.memory_bytes == 16 * MIB and cfg.budget.sender_bytes == 8 * MIB
    cfg = load_config(None, "device", environ={"MQTTFL_LIMITS__SENDER_RATE": "50"}, node="dev1")
    assert cfg.budget.sender_rate == 50.0
    with pytest.raises(ConfigError, match="sender_bytes"):
        load_config(None, "device", environ={}, node="dev1", limits={"memory_bytes": MIB})
    with pytest.raises(ConfigError, match="sender_rate"):
        load_config(None, "device", environ={}, node="dev1", limits={"sender_rate": "fast"})
