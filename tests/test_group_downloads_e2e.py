"""Group downloads with real agent processes and the real broker: the edge publishes each round's model once
on its broadcast topic for its three devices, and the run ends on the unsplit reference, as the run with one
announcement per device does (tests/test_split_e2e.py)."""

from __future__ import annotations

from pathlib import Path

from mqttfl.tools import testbed
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec
from tests.reference import TOL, initial_global, max_abs_diff, reference_global
from tests.test_split_e2e import cloud_state, digits

DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge1"}


def test_a_round_on_group_downloads_trains_the_reference_with_one_model_message(tmp_path: Path, broker: Broker,
                                                                               fleet: str) -> None:
    data = digits((64,))
    spec = FleetSpec(devices=dict(DEVICES), model="mlp", input_shape=(64,), fleet=fleet,
                     cloud={"rounds": 2, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "seed": 11})
    with testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_event("run_complete", 180)
        metrics = tb.round_metrics()
        edge = tb.ctl("edge1", "status")["result"]["transport"]
        devices = {d: tb.ctl(d, "status")["result"]["transport"] for d in DEVICES}
    assert [sorted(m["devices"]) for m in metrics] == [sorted(DEVICES)] * 2
    # One model publish per round, not one per device; each device received it.
    assert edge.get("tx_model") == 2 and edge.get("group_downloads") == 2, edge
    assert edge.get("group_download_devices") == 6, edge
    assert all(t.get("rx_model") == 2 for t in devices.values()), devices
    state = cloud_state(tmp_path)
    diff = max_abs_diff(state["global"], reference_global(spec, data[0], rounds=2))
    assert diff <= TOL, f"group downloads changed the result by {diff:.3g}"
    assert max_abs_diff(state["global"], initial_global(spec)) > 1e-2
