"""Presence with real processes: retained status, last will on kill -9, offline on a clean stop, boot numbers.

How a reader tells the two offline paths apart: the last will is fixed when the client CONNECTs, so it can only
carry what the node knew then, and its ``ts`` is older than the ``online`` status published after CONNACK. The
clean path builds its offline status at stop time, so it carries every field set since (here ``pid``, set right
after connecting) and a ``ts`` no older than the last online status. Both carry the boot number of the session
they end, so a status whose boot is below the node's current boot is stale, whichever path produced it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from mqttfl.runtime.transport import Transport
from tests.helpers import agent_config, wait_for, write_toml


def is_stale(status: dict[str, Any], current_boot: int) -> bool:
    """A status from an earlier session of the node (e.g. a will delivered late) than the one now running."""
    return int(status.get("boot", -1)) < current_boot


class StatusLog:
    """Every status of one node seen by a monitor subscribed to the fleet's status broadcasts."""

    def __init__(self, mon: Transport, node: str) -> None:
        self.mon, self.node = mon, node
        self.seen: list[dict[str, Any]] = []

    def find(self, **match: Any) -> dict[str, Any] | None:
        while (m := self.mon.get(0.02)) is not None:
            if m.kind == "status" and m.src == self.node:
                self.seen.append(m.data)
        for s in reversed(self.seen):
            if all(s.get(k) == v for k, v in match.items()):
                return s
        return None

    def wait(self, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        return wait_for(lambda: self.find(**match), timeout=timeout, what=f"status {match} of {self.node}")


def _monitor(broker, fleet: str, name: str = "monitor") -> Transport:
    return Transport(agent_config(broker, fleet, name), subscriptions=[f"mqttfl/v1/{fleet}/status/+/all"]).start()


def _node(broker, fleet: str, state_dir: Path, repo_root: Path, node: str = "dev1") -> subprocess.Popen[bytes]:
    with open(state_dir.parent / f"{node}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.procs.node", "--port", str(broker.port), "--fleet", fleet, "--node", node,
             "--state-dir", str(state_dir)],
            cwd=repo_root, stdout=log, stderr=subprocess.STDOUT,
        )


def _reap(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def test_kill_9_leaves_the_last_will_offline_with_the_boot_number(broker, fleet, tmp_path, repo_root):
    mon = _monitor(broker, fleet)
    log = StatusLog(mon, "dev1")
    p = _node(broker, fleet, tmp_path / "dev1", repo_root)
    try:
        online = log.wait(state="online", boot=1, pid=p.pid)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(5)
        will = log.wait(state="offline", boot=1)
        assert "pid" not in will, "the will was fixed at CONNECT, before the node set its pid"
        assert will["ts"] < online["ts"]
        # The will is retained: a monitor that starts only now still learns the node is gone.
        late = StatusLog(_monitor(broker, fleet, "late-monitor"), "dev1")
        try:
            assert late.wait(state="offline")["boot"] == 1
        finally:
            late.mon.stop()
    finally:
        _reap(p)
        mon.stop()


def test_sigterm_publishes_offline_itself_not_through_the_will(broker, fleet, tmp_path, repo_root):
    mon = _monitor(broker, fleet)
    log = StatusLog(mon, "dev1")
    p = _node(broker, fleet, tmp_path / "dev1", repo_root)
    try:
        online = log.wait(state="online", boot=1, pid=p.pid)
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        offline = log.wait(state="offline", boot=1)
        assert offline["pid"] == p.pid and offline["ts"] >= online["ts"], "built at stop time, not the will"
        assert not any(s["state"] == "offline" and "pid" not in s for s in log.seen), "the will fired as well"
    finally:
        _reap(p)
        mon.stop()


def test_status_of_an_earlier_boot_is_recognisably_stale(broker, fleet, tmp_path, repo_root):
    mon = _monitor(broker, fleet)
    log = StatusLog(mon, "dev1")
    state = tmp_path / "dev1"
    first = _node(broker, fleet, state, repo_root)
    second = None
    try:
        log.wait(state="online", boot=1, pid=first.pid)
        first.kill()
        first.wait(5)
        will = log.wait(state="offline", boot=1)
        second = _node(broker, fleet, state, repo_root)
        current = log.wait(state="online", pid=second.pid)
        assert current["boot"] == 2, "the boot counter survives kill -9 in the state dir"
        # The old session's will arrives again after the new session is up (a bridge or a retained copy
        # forwarded late): its boot number, not its arrival order, tells the monitor it is stale.
        replay = Transport(agent_config(broker, fleet, "bridge"))
        replay.start()
        try:
            replay.client.publish(f"mqttfl/v1/{fleet}/status/dev1/all", json.dumps(will), qos=1,
                                  retain=True).wait_for_publish(5)
        finally:
            replay.stop()
        wait_for(lambda: log.find(state="offline", boot=1) and log.seen[-1]["boot"] == 1, what="replayed will")
        assert is_stale(log.seen[-1], current["boot"])
        assert not is_stale(current, current["boot"])
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
        assert not is_stale(log.wait(state="offline", boot=2), current["boot"])
    finally:
        _reap(first, *([second] if second else []))
        mon.stop()


def test_edge_agent_announces_itself_and_goes_offline_on_sigterm(broker, fleet, tmp_path, repo_root):
    cfg = write_toml(tmp_path / "edge1.toml", {
        "node": "edge1", "fleet": fleet, "state_dir": str(tmp_path / "edge1"),
        "mqtt": {"host": broker.host, "port": broker.port},
    })
    mon = _monitor(broker, fleet)
    log = StatusLog(mon, "edge1")
    with open(tmp_path / "edge1.log", "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "edge_agent", "--config", str(cfg)], cwd=repo_root,
                             stdout=out, stderr=subprocess.STDOUT)
    try:
        online = log.wait(timeout=15, state="idle", role="edge")
        assert online["boot"] == 1
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        offline = log.wait(state="offline", boot=1)
        assert offline["ts"] >= online["ts"] and offline["role"] == "edge"
    finally:
        _reap(p)
        mon.stop()
