"""Virtual devices over real MQTT (``mqttfl virtual``), end to end: a broker, a cloud and two edges as processes,
and twenty devices in one more process, each its own MQTT client with its own presence. Every round counts every
device exactly once: with replayed updates that differ per device, the global model after the run is the initial
one plus the rounds' exact means, which a lost or twice-applied update would move. One process holds more devices
than paho's select() ever allowed (one network loop, no thread per client), and they ride out a broker restart."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from mqttfl.runtime.replay import ReplayBackend, fixed_update
from mqttfl.runtime.transport import Inbound
from mqttfl.tools import testbed
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec
from tests.helpers import schema
from tests.reference import initial_global
from tests.test_split_e2e import cloud_state, digits

pytestmark = pytest.mark.timeout(300)

N, ROUNDS = 20, 2


@pytest.mark.parametrize("mode", ["replay", "train"])
def test_twenty_virtual_devices_in_one_process_complete_rounds(tmp_path: Path, broker: Broker, fleet: str,
                                                               mode: str) -> None:
    n_blocks = schema("mlp", (64,)).n_blocks
    spec = FleetSpec(devices={}, extra_edges=("edge1", "edge2"), model="mlp", input_shape=(64,), fleet=fleet,
                     cloud={"rounds": ROUNDS, "batch_size": 10, "lr": 0.05, "seed": 3, "min_devices": N})
    with testbed.Testbed(tmp_path, spec, broker=broker, data=digits((64,))) as tb:
        tb.prepare()
        tb.start(["cloud", "edge1", "edge2"])
        tb.start_virtual(N, mode=mode, section={"cut": n_blocks})
        statuses = tb.wait_online([f"vdev{i}" for i in range(1, N + 1)], timeout=120)
        tb.wait_event("run_complete", 180)
        entries = tb.round_metrics()
    # Each its own client, with its own retained presence, on the edge it was given.
    assert {s["edge"] for s in statuses.values()} == {"edge1", "edge2"}
    assert sorted(e["round"] for e in entries) == list(range(ROUNDS))
    for e in entries:
        assert e["participants"] == N and e["missing"] == []
        assert {d: v["samples"] for d, v in e["devices"].items()} == {f"vdev{i}": 10 for i in range(1, N + 1)}
    final = cloud_state(tmp_path)["global"]
    g0 = initial_global(spec)
    if mode == "replay":
        scale = np.mean([ReplayBackend(f"vdev{i}", 10).scale for i in range(1, N + 1)])
        for k, v in g0.items():
            want = v.astype(np.float64) + ROUNDS * scale * fixed_update(k, v.shape).astype(np.float64)
            assert np.max(np.abs(final[k] - want)) <= 1e-5, k
    else:
        assert max(float(np.max(np.abs(final[k] - g0[k]))) for k in g0) > 1e-3, "the run did not train"


def _assert_exact_replay_mean(tmp_path: Path, spec: FleetSpec, n: int, rounds: int) -> None:
    final = cloud_state(tmp_path)["global"]
    scale = np.mean([ReplayBackend(f"vdev{i}", 10).scale for i in range(1, n + 1)])
    for k, v in initial_global(spec).items():
        want = v.astype(np.float64) + rounds * scale * fixed_update(k, v.shape).astype(np.float64)
        assert np.max(np.abs(final[k] - want)) <= 1e-5, k


def test_three_hundred_virtual_devices_in_one_process_share_one_network_thread(tmp_path: Path, broker: Broker,
                                                                              fleet: str) -> None:
    n = 300  # more than the 200 a process held while every client had paho's select() loop
    spec = FleetSpec(devices={}, extra_edges=("edge1", "edge2"), model="mlp", input_shape=(64,), fleet=fleet,
                     cloud={"rounds": 1, "batch_size": 10, "lr": 0.05, "seed": 3, "min_devices": n})
    with testbed.Testbed(tmp_path, spec, broker=broker, data=digits((64,))) as tb:
        tb.prepare()
        tb.start(["cloud", "edge1", "edge2"])
        p = tb.start_virtual(n, mode="replay", section={"cut": schema("mlp", (64,)).n_blocks}, log_level="warning")
        tb.wait_online([f"vdev{i}" for i in range(1, n + 1)], timeout=120)
        threads = int(re.findall(r"Threads:\s+(\d+)", Path(f"/proc/{p.pid}/status").read_text())[0])
        workers = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        tb.wait_event("run_complete", 120)
        entries = tb.round_metrics()
    assert workers == [], "the devices were spread over worker processes"
    assert threads < 10, f"{threads} threads for {n} clients"  # was one network thread per client
    assert [e["participants"] for e in entries] == [n]
    state = tmp_path / "state"
    assert [p.name for p in state.glob("virtual-*.journal")] == [f"virtual-vdev1-vdev{n}.journal"]
    assert not list(state.glob("vdev*/journal.log")), "one journal for the process, not one per device"
    _assert_exact_replay_mean(tmp_path, spec, n, 1)


def test_virtual_devices_come_back_after_a_broker_restart_and_finish_a_round(tmp_path: Path, fleet: str) -> None:
    spec = FleetSpec(devices={}, extra_edges=("edge1", "edge2"), model="mlp", input_shape=(64,), fleet=fleet,
                     cloud={"rounds": 1, "batch_size": 10, "lr": 0.05, "seed": 3, "min_devices": N})
    names = {f"vdev{i}" for i in range(1, N + 1)}
    with testbed.Testbed(tmp_path, spec, data=digits((64,))) as tb:  # its own broker, with persistence
        tb.prepare()
        tb.start(["edge1", "edge2"])
        # Two worker processes of ten, each with its own network loop.
        p = tb.start_virtual(N, mode="replay", section={"cut": schema("mlp", (64,)).n_blocks}, per_process=N // 2)
        tb.wait_online(sorted(names), timeout=120)
        assert len(Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()) == 2
        restarted = time.time()
        tb.broker.restart()
        back: set[str] = set()

        def announced(m: Inbound) -> bool:
            # A live status published after the restart: the device reconnected (its retained one is older).
            if m.kind == "status" and m.src in names and m.data and m.data.get("ts", 0) > restarted \
                    and m.data.get("state") not in ("starting", "offline"):
                back.add(m.src)
            return back == names

        tb.wait(announced, 90)
        tb.start(["cloud"])
        tb.wait_event("run_complete", 120)
        entries = tb.round_metrics()
    assert [e["participants"] for e in entries] == [N] and entries[0]["missing"] == []
    _assert_exact_replay_mean(tmp_path, spec, N, 1)
