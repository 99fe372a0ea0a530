"""Virtual devices over real MQTT (``mqttfl virtual``), end to end: a broker, a cloud and two edges as processes,
and twenty devices in one more process, each its own MQTT client with its own presence. Every round counts every
device exactly once: with replayed updates that differ per device, the global model after the run is the initial
one plus the rounds' exact means, which a lost or twice-applied update would move."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mqttfl.runtime.replay import ReplayBackend, fixed_update
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
