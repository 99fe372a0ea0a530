"""A device's subscription to its edge's group announcements, against the real broker: the persistent session
keeps a followed broadcast for an offline device, and a filter no longer followed is dropped, also across a
restart."""

from __future__ import annotations

from pathlib import Path

from mqttfl.runtime.transport import Inbound, Transport
from mqttfl.tools.broker import Broker
from mqttfl.wire.topics import BROADCAST, filter_for
from tests.helpers import agent_config, wait_for


def _device(broker: Broker, fleet: str, state: Path, *edges: str) -> Transport:
    t = Transport(agent_config(broker, fleet, "dev1", state_dir=state), inbox=False,
                  subscriptions=[filter_for(fleet, dst="dev1")])
    t.follow(filter_for(fleet, "model", src=e, dst=BROADCAST) for e in edges)
    return t.start()


def _settled(dev: Transport, edge: Transport) -> None:
    """The broker handles a client's packets in order: once the edge has this ping, it applied the device's
    (un)subscriptions sent before it."""
    dev.send("act", edge.node, body={})
    wait_for(lambda: _take(edge, "act"), what="the device's ping")


def _take(t: Transport, kind: str, timeout: float = 0.2) -> list[Inbound]:
    out = []
    while (m := t.get(timeout)) is not None:
        if m.kind == kind:
            out.append(m)
    return out


def _models(t: Transport) -> list[tuple[str, int]]:
    return [(m.src, m.env.round) for m in _take(t, "model", 1.0) if m.env is not None]


def test_a_followed_broadcast_waits_in_the_session_and_an_old_edge_is_dropped(broker: Broker, fleet: str,
                                                                              tmp_path: Path) -> None:
    edges = {e: Transport(agent_config(broker, fleet, e), inbox=False, subscriptions=[filter_for(fleet, dst=e)]).start()
             for e in ("edge1", "edge2")}
    dev = _device(broker, fleet, tmp_path / "dev1", "edge1")
    try:
        for e in edges.values():
            _settled(dev, e)
        edges["edge1"].send("model", BROADCAST, body={}, round=1)
        edges["edge2"].send("model", BROADCAST, body={}, round=1)
        assert _models(dev) == [("edge1", 1)]  # its edge's broadcast, no other edge's
        dev.stop()
        edges["edge1"].send("model", BROADCAST, body={}, round=2)  # offline: kept in its session (QoS 1)
        dev = _device(broker, fleet, tmp_path / "dev1", "edge1")
        assert _models(dev) == [("edge1", 2)]
        dev.follow([filter_for(fleet, "model", src="edge2", dst=BROADCAST)])  # moved to edge2
        _settled(dev, edges["edge2"])
        edges["edge1"].send("model", BROADCAST, body={}, round=3)
        edges["edge2"].send("model", BROADCAST, body={}, round=3)
        assert _models(dev) == [("edge2", 3)]
        dev.stop()
        # Restarted with edge1 configured again (a move is not kept): edge2's filter, still in the persistent
        # session, is dropped on connecting, so edge2's broadcasts no longer come.
        dev = _device(broker, fleet, tmp_path / "dev1", "edge1")
        for e in edges.values():
            _settled(dev, e)
        edges["edge2"].send("model", BROADCAST, body={}, round=4)
        edges["edge1"].send("model", BROADCAST, body={}, round=4)
        assert _models(dev) == [("edge1", 4)]
    finally:
        dev.stop()
        for e in edges.values():
            e.stop()
