"""A real agent process speaks the systemd notify protocol the units rely on (Type=notify, WatchdogSec=).

The test plays systemd: it binds the AF_UNIX datagram socket named by ``NOTIFY_SOCKET``, sets
``WATCHDOG_USEC`` and starts ``python -m edge_agent`` against the session's Mosquitto.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqttfl.runtime.transport import Transport
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import write_toml
from tests.helpers import agent_config

pytestmark = pytest.mark.timeout(120)

WATCHDOG_S = 2.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


def recv(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        raise AssertionError(f"no notify datagram within {timeout}s") from None


def retained_status(broker: Broker, fleet: str, node: str, timeout: float = 10.0) -> dict[str, object]:
    """The retained status of ``node`` as a subscriber that connects now receives it."""
    watcher = Transport(agent_config(broker, fleet, f"w{uuid.uuid4().hex[:8]}")).start()
    try:
        deadline = time.monotonic() + timeout
        while (msg := watcher.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            if msg.kind == "status" and msg.src == node:
                assert msg.retained and msg.data is not None
                return msg.data
        raise AssertionError(f"no retained status of {node}")
    finally:
        watcher.stop(publish_offline=False)


def test_edge_agent_notifies_ready_after_connecting_feeds_the_watchdog_and_says_stopping_on_sigterm(
    broker: Broker, fleet: str, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    config = write_toml(tmp_path / "edge1.toml", {
        "node": "edge1", "fleet": fleet, "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port}, "edge": {},
    })
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1_000_000)),
           "PYTHONUNBUFFERED": "1"}
    env.pop("WATCHDOG_PID", None)
    log = tmp_path / "edge1.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        # Importing torch takes seconds; nothing may be announced before the agent is connected.
        first = recv(sock, 60)
        assert first.split("\n")[0] == "READY=1", first
        # READY=1 came after connect + subscribe: the node's presence is already on the broker.
        online = retained_status(broker, fleet, "edge1")
        assert online["state"] == "idle" and online["role"] == "edge"

        pings = []
        while len(pings) < 3:
            datagram = recv(sock, WATCHDOG_S * 5)
            assert datagram == "WATCHDOG=1", datagram
            pings.append(time.monotonic())
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        # systemd restarts a unit that stays silent for WatchdogSec; the agent pings every half of it.
        assert all(gap < WATCHDOG_S for gap in gaps), gaps

        proc.send_signal(signal.SIGTERM)
        while (datagram := recv(sock, 30)) == "WATCHDOG=1":
            pass
        assert datagram == "STOPPING=1"
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
        assert retained_status(broker, fleet, "edge1")["state"] == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
