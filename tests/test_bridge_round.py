"""Scale-out (docs/operations.md, "Several sites"): a training round across two bridged brokers,
with the shipped bridge.conf.

The site broker carries edge1 and dev1 and bridges to the cloud broker, which carries the cloud and the
operator. The bridge section is broker_config/bridge.conf with only deployment values changed
(mqttfl.tools.sites.loopback_bridge): the address becomes the cloud broker's loopback port and, on loopback, TLS
and the remote password are left out (those are covered by tests/test_broker_security.py). Its topic lines are
used as shipped, so a kind missing from them breaks the round here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqttfl.tools.broker import Broker, BrokerOptions
from mqttfl.tools.sites import loopback_bridge, wait_bridge_up
from mqttfl.tools.testbed import FleetSpec
from mqttfl.tools.testbed import Testbed as LocalFleet  # not "Test*": pytest would try to collect it

pytestmark = pytest.mark.timeout(180)

@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    cloud_broker = Broker(BrokerOptions(), workdir=tmp_path / "cloud-broker").start()
    try:
        site = Broker(BrokerOptions(extra=loopback_bridge(cloud_broker.port, client_id=f"site1-{os.getpid()}")),
                      workdir=tmp_path / "site-broker").start()
        try:
            wait_bridge_up(site)
            yield site, cloud_broker
        finally:
            site.cleanup()
    finally:
        cloud_broker.cleanup()


def test_a_round_completes_across_a_site_broker_bridged_to_the_cloud_broker(
    brokers: tuple[Broker, Broker], tmp_path: Path
) -> None:
    site, cloud_broker = brokers
    spec = FleetSpec(devices={"dev1": "edge1"}, model="mlp", input_shape=(64,), cloud={"rounds": 1},
                     fleet="bridged")
    tb = LocalFleet(tmp_path / "fleet", spec, broker=site, cloud_broker=cloud_broker)
    try:
        tb.prepare()
        assert tb.connect_operator().cfg.mqtt.port == cloud_broker.port
        tb.start()
        # The operator is on the cloud broker: the round's metrics, published by the cloud after the
        # edge's delta crossed the bridge, arrive there.
        msg = tb.wait(lambda m: m.kind == "metrics" and m.src == "cloud" and m.data is not None
                      and m.data.get("kind") == "round" and m.data.get("round") == 0, 120)
        assert msg.data is not None
        metrics = msg.data
        assert metrics["participants"] == 1 and metrics["missing"] == []
        assert metrics["devices"]["dev1"]["edge"] == "edge1" and metrics["devices"]["dev1"]["samples"] > 0
        assert isinstance(metrics["accuracy"], float)
        tb.wait_event("run_complete", 60)

        # Operations from the cloud side of the bridge: commands go in, replies and presence come out.
        port = ["--fleet", spec.fleet, "--port", str(cloud_broker.port)]
        r = subprocess.run([sys.executable, "-m", "mqttfl.tools.cli", "ctl", "dev1", "ping", "--json", *port],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["result"]["pong"] is True
        r = subprocess.run([sys.executable, "-m", "mqttfl.tools.cli", "monitor", "--once", "--json", "--interval", "1",
                            *port], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        nodes = json.loads(r.stdout)["nodes"]
        assert {n: nodes[n]["role"] for n in ("cloud", "edge1", "dev1")} == {
            "cloud": "cloud", "edge1": "edge", "dev1": "device"}
        assert nodes["cloud"]["state"] == "done" and nodes["cloud"]["accuracy"] == metrics["accuracy"]
    finally:
        tb.stop()
