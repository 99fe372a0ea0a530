"""State directories: agents of one host may share a configured ``state_dir`` (systemd's StateDirectory=mqttfl);
each keeps its outbox, boot counter and state in ``state_dir/<node>``, and holds a lock on that folder, so a
second agent with the same node id is refused at start instead of corrupting the first one's files."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqttfl.runtime.config import load_config
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec, Testbed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tb(tmp_path: Path, broker: Broker, fleet: str) -> Iterator[Testbed]:
    # Every config the testbed writes names the same state_dir (tmp_path/state), as on one host.
    spec = FleetSpec(devices={"dev1": "edge1"}, extra_edges=("edge2",), model="mlp", input_shape=(64,), fleet=fleet)
    with Testbed(tmp_path, spec, broker=broker) as bed:
        bed.prepare()
        yield bed


def boot(state: Path, node: str) -> int:
    return int((state / node / "boot").read_text())


def test_agents_sharing_a_configured_state_dir_get_a_folder_each(tb: Testbed) -> None:
    state = tb.root / "state"
    dirs = {n: load_config(tb.configs[n], tb.role_of(n), environ={}).state_dir for n in ("edge1", "edge2", "cloud")}
    assert dirs == {n: str(state / n) for n in dirs}
    tb.start(["edge1", "edge2"])
    tb.wait_online(["edge1", "edge2"])
    assert sorted(p.name for p in state.iterdir()) == ["edge1", "edge2"], "nothing shared at the top"
    assert (state / "edge1" / "journal.log").is_file() and (state / "edge2" / "journal.log").is_file()
    assert boot(state, "edge1") == boot(state, "edge2") == 1
    # Each has its own boot counter: a restart of edge1 moves only edge1's.
    tb.kill("edge1", signal.SIGTERM)
    tb.start_node("edge1")
    tb.wait(lambda m: m.kind == "status" and m.src == "edge1" and m.data is not None and m.data.get("boot") == 2
            and m.data.get("state") not in ("starting", "offline"), 60)
    assert (boot(state, "edge1"), boot(state, "edge2")) == (2, 1)


def test_a_second_agent_with_the_same_node_id_and_state_dir_is_refused_and_the_first_keeps_running(
        tb: Testbed) -> None:
    tb.start(["edge1"])
    tb.wait_online(["edge1"])
    second = subprocess.run([sys.executable, "-m", "edge_agent", "--config", str(tb.configs["edge1"])],
                            capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "cannot start" in second.stderr and "already runs as 'edge1'" in second.stderr
    assert str(tb.root / "state" / "edge1") in second.stderr
    # The refused one touched nothing: the first still runs, answers, and keeps its boot counter and session.
    assert tb.procs["edge1"].poll() is None
    assert tb.ctl("edge1", "ping")["ok"]
    assert boot(tb.root / "state", "edge1") == 1
    seen = [m.data for m in tb.inbox if m.kind == "status" and m.src == "edge1" and m.data is not None]
    assert {d.get("boot") for d in seen} == {1} and seen[-1]["state"] not in ("offline", "starting")
