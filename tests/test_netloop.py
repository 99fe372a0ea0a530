"""Transports without a network thread (``driver=SocketLoop()``) against the real broker: many clients served by
one thread, flow control of a large message, presence and will, reconnect after a broker restart with the
session kept, and a move between brokers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from mqttfl.runtime.netloop import SocketLoop
from mqttfl.runtime.transport import Inbound, Transport
from mqttfl.tools.broker import Broker, BrokerOptions
from mqttfl.wire.codec import Envelope, encode
from tests.helpers import agent_config, wait_for


def _paho_threads() -> int:
    return sum(t.name.startswith("paho-mqtt-client") for t in threading.enumerate())


def _next(loop: SocketLoop, t: Transport, kind: str, timeout: float = 10.0) -> Inbound:
    """Serve the loop until ``t`` has a message of ``kind``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loop.poll(0.02)
        while (msg := t.get(0.0)) is not None:
            if msg.kind == kind:
                return msg
    raise AssertionError(f"no {kind} message within {timeout}s")


def test_many_driven_transports_share_one_thread_and_exchange_messages(broker, fleet, tmp_path):
    loop = SocketLoop()
    before = _paho_threads()
    nodes = [Transport(agent_config(broker, fleet, f"n{i}", state_dir=tmp_path / f"n{i}"), driver=loop)
             for i in range(30)]
    try:
        for t in nodes:
            t.start(timeout=None)
        for t in nodes:
            assert t.wait_ready(10.0)
        assert _paho_threads() == before, "a driven transport started a network thread"
        for i, t in enumerate(nodes):
            t.send("delta", nodes[(i + 1) % len(nodes)].node, body={"from": i})
        for i, t in enumerate(nodes):
            msg = _next(loop, t, "delta")
            assert msg.src == nodes[i - 1].node and msg.env.body == {"from": (i - 1) % len(nodes)}
        # A message much larger than a socket buffer: written as the socket drains (EVENT_WRITE), in chunks.
        x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
        nodes[0].send("delta", nodes[1].node, tensors={"x": x})
        np.testing.assert_array_equal(_next(loop, nodes[1], "delta").env.tensors["x"], x)
    finally:
        for t in nodes:
            t.stop()
    assert not loop.selector.get_map(), "a stopped transport left its socket in the loop"


def test_driven_presence_clean_stop_and_will(broker, fleet, tmp_path):
    loop = SocketLoop()
    mon = Transport(agent_config(broker, fleet, "monitor"), subscriptions=[f"mqttfl/v1/{fleet}/status/+/all"],
                    presence=False, inbox=False, client_suffix="mon").start()
    a = Transport(agent_config(broker, fleet, "alice", state_dir=tmp_path / "a"), driver=loop).start()
    b = Transport(agent_config(broker, fleet, "bob", state_dir=tmp_path / "b"), driver=loop).start()
    try:
        a.set_status("idle", edge="edge1")

        def state_of(node: str, state: str) -> bool:
            loop.poll(0.01)
            m = mon.get(0.05)
            return m is not None and m.src == node and m.data.get("state") == state

        wait_for(lambda: state_of("alice", "idle"), what="alice's presence")
        a.stop()  # clean: offline published by alice itself
        wait_for(lambda: state_of("alice", "offline"), what="alice's clean offline")
        # An unclean end (the socket closed without DISCONNECT): the broker publishes bob's will.
        b._closing = True
        loop.remove(b)
        b.client._reset_sockets()
        wait_for(lambda: state_of("bob", "offline"), what="bob's will")
    finally:
        a.stop()
        mon.stop()


def test_driven_transport_reconnects_after_broker_restart_with_its_session(fleet, tmp_path):
    b = Broker(BrokerOptions(persistence=True), workdir=tmp_path / "broker").start()
    loop = SocketLoop()
    try:
        mqtt = {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
        bob = Transport(agent_config(b, fleet, "bob", state_dir=tmp_path / "bob", **mqtt), driver=loop).start()
        alice = Transport(agent_config(b, fleet, "alice", **mqtt)).start()  # a threaded peer
        bob.link_changes()
        b.stop()
        changes: list = []
        deadline = time.monotonic() + 5
        while bob.connected and time.monotonic() < deadline:
            loop.poll(0.05)
        assert not bob.connected, "the broker's end went unnoticed"
        # A message for bob while it is away: the broker keeps it in bob's session, across its own restart.
        time.sleep(0.5)  # bob's backoff tries (and fails) at least once meanwhile
        loop.poll(0.0)
        b.start()
        assert alice.wait_ready(15)
        env = Envelope(kind="delta", src="alice", dst="bob", body={"after": "restart"})
        alice.publish("delta", "bob", encode(env))
        deadline = time.monotonic() + 20
        while not any(c.up for c in changes) and time.monotonic() < deadline:
            loop.poll(0.05)
            changes += bob.link_changes()
        assert [c.up for c in changes] == [False, True] and changes[1].session_present, changes
        assert _next(loop, bob, "delta").env.body == {"after": "restart"}
        alice.stop()
        bob.stop()
    finally:
        b.cleanup()


def test_driven_transport_moves_to_another_broker(broker, fleet, tmp_path):
    other = Broker(BrokerOptions(), workdir=tmp_path / "other").start()
    loop = SocketLoop()
    try:
        t = Transport(agent_config(broker, fleet, "dev", state_dir=tmp_path / "dev"), driver=loop).start()
        assert t.visit(other.host, other.port), "visit through the same loop"
        peer = Transport(agent_config(other, fleet, "edge2")).start()
        peer.send("delta", "dev", body={"kept": True})  # queued in dev's session there before it arrives
        assert t.move_to(other.host, other.port)
        assert (t.cfg.mqtt.host, t.cfg.mqtt.port) == (other.host, other.port)
        assert _next(loop, t, "delta").env.body == {"kept": True}
        peer.stop()
        t.stop()
        assert not loop.selector.get_map()
    finally:
        other.cleanup()


def test_broker_down_at_start_backs_off_then_connects(fleet, tmp_path: Path):
    b = Broker(BrokerOptions(), workdir=tmp_path / "broker")  # its port chosen, nothing listening yet
    loop = SocketLoop()
    t = Transport(agent_config(b, fleet, "late", reconnect_min_s=0.2, reconnect_max_s=0.5), driver=loop)
    try:
        t.start(timeout=None)
        assert not t.wait_ready(0.5)
        assert t.stats_snapshot().get("connect_failed", 0) >= 1
        b.start()
        assert t.wait_ready(15), "no connection once the broker came up"
    finally:
        t.stop()
        b.cleanup()
