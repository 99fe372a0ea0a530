"""The in-memory fleet agrees with real processes: the same spec and seed run once as a cloud, two edges and four
devices over a real broker and once in ``MemoryFleet`` end on the same global model (within 1e-5), the same
accuracy every round and the same number of models and deltas sent by every node (split steps: the same, but
for what the real devices report they re-sent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mqttfl.runtime.memory import MemoryFleet
from mqttfl.tools import testbed
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec, make_shards
from tests.helpers import schema
from tests.reference import max_abs_diff
from tests.test_split_e2e import cloud_state, digits

pytestmark = pytest.mark.timeout(300)

KINDS = ("model", "delta", "act", "grad")  # the protocol's messages (acks and presence depend on timing)


def test_a_memory_fleet_matches_a_four_device_real_run(tmp_path: Path, broker: Broker, fleet: str) -> None:
    torch.set_num_threads(1)  # as every agent
    n_blocks = schema("mlp", (64,)).n_blocks
    devices = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2", "dev4": "edge2"}
    # Two split devices and two that train the whole model; non-IID shards of unequal size.
    spec = FleetSpec(devices=devices, model="mlp", input_shape=(64,), partition="imbalanced:0.4", fleet=fleet,
                     device_extra={"dev2": {"cut": n_blocks}, "dev4": {"cut": n_blocks}},
                     cloud={"rounds": 3, "batch_size": 32, "lr": 0.05, "seed": 11})
    data = digits((64,))
    with testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_event("run_complete", 180)
        real_rounds = sorted(tb.round_metrics(), key=lambda e: e["round"])
        real_counts = {n: tb.ctl(n, "status")["result"]["transport"] for n in ("cloud", *spec.edges, *devices)}
    real_global = cloud_state(tmp_path)["global"]

    mem = MemoryFleet.from_spec(spec, make_shards(spec, data[0]), data[1], seed=11)
    mem.start()
    assert mem.run_to_end(max_time=3600)["event"] == "run_complete"
    mem_rounds = mem.metrics("round", node=mem.cloud)

    assert max_abs_diff(mem.global_state(), real_global) <= 1e-5
    assert [e["accuracy"] for e in mem_rounds] == [e["accuracy"] for e in real_rounds]
    assert len(real_rounds) == 3
    # A split step the device timed out on under load is sent again (and answered again) in the real run, which
    # its round report counts; the memory fleet's virtual time has none.
    resends = sum(int(c.get("resends") or 0) for e in real_rounds for c in e["devices"].values())
    for node, stats in real_counts.items():
        for kind in KINDS:
            real, got = int(stats.get(f"tx_{kind}", 0)), mem.counts(node)[f"tx_{kind}"]
            if kind in ("model", "delta"):
                assert got == real, (node, kind)
            else:
                assert 0 <= real - got <= resends, (node, kind, real, got, resends)
    assert sum(mem.counts(d)["tx_act"] for d in devices) > 0  # the split devices did send activations
