"""Several sites (docs/operations.md, "Several sites"), end to end: a cloud broker (production.conf: TLS, passwords,
the shipped ACL with one block per site's bridge account) and two edge-site brokers, each bridged to it with the
shipped bridge.conf and its own account; a cloud, two edges and four devices as processes, each with its own
state directory. Rounds run; a device moves mid-round from site 1's edge to site 2's (its checkpoint crosses
both bridges, the device reconnects to site 2's broker) and the round counts it; then site 1's edge dies and a
device moving away from it falls back to a restart of its round at site 2 through the cloud."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqttfl.tools.broker import Broker, BrokerOptions
from mqttfl.tools.sites import wait_bridge_up
from mqttfl.tools.testbed import FleetSpec, Testbed
from tests.test_broker_security import CONF, production_config, render
from tests.test_broker_security import Pki as SecurityPki

pytestmark = pytest.mark.timeout(300)

SITES = ("site1", "site2")
# dev1 and dev2 may roam to site 2; dev3 and dev4 live there.
DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2", "dev4": "edge2"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SecurityPki:
    d = tmp_path_factory.mktemp("pki")
    auth = d / "auth"

    def sh(*args: str) -> None:
        subprocess.run(["sh", *args], check=True, capture_output=True, timeout=60)

    sh(str(CONF / "gen-ca.sh"), "-d", str(d))
    sh(str(CONF / "gen-node-cert.sh"), "-d", str(d), "-s", "IP:127.0.0.1,DNS:localhost", "broker")
    for node in ("cloud", "operator", "bridge-site1", "bridge-site2"):  # the cloud broker's accounts
        sh(str(CONF / "add-node.sh"), "-d", str(auth), node)
    return SecurityPki(dir=d, passwd=auth / "passwd", creds=auth / "credentials")


def site_acl(path: Path) -> Path:
    """The shipped ACL with the bridge-site1 block copied for site 2, as the guide says."""
    text = (CONF / "acl").read_text()
    block = text[text.index("user bridge-site1"):].split("\n\n")[0]
    path.write_text(text + "\n" + block.replace("bridge-site1", "bridge-site2") + "\n")
    return path


def site_bridge(site: str, cloud: Broker, pki: SecurityPki) -> str:
    """bridge.conf for one site: its own connection name, client ids and account; the cloud broker's address."""
    conf = (CONF / "bridge.conf").read_text().replace("site1", site)
    return render(conf, {
        "address": f"address 127.0.0.1:{cloud.port}",
        "remote_password": f"remote_password {pki.password(f'bridge-{site}')}",
        "bridge_cafile": f"bridge_cafile {pki.ca}",
        "remote_clientid": f"remote_clientid bridge-{site}-{os.getpid()}",
    })


@pytest.fixture
def brokers(pki: SecurityPki, tmp_path: Path) -> Iterator[tuple[Broker, dict[str, Broker]]]:
    conf = production_config(pki).replace(f"acl_file {CONF / 'acl'}", f"acl_file {site_acl(tmp_path / 'acl')}")
    cloud = Broker(BrokerOptions(), workdir=tmp_path / "cloud-broker", config_text=conf).start()
    sites: dict[str, Broker] = {}
    try:
        for s in SITES:
            sites[s] = Broker(BrokerOptions(persistence=True, extra=site_bridge(s, cloud, pki)),
                              workdir=tmp_path / f"{s}-broker").start()
            wait_bridge_up(sites[s])
        yield cloud, sites
    finally:
        for b in sites.values():
            b.cleanup()
        cloud.cleanup()


def test_a_device_moves_between_two_bridged_sites_and_a_restart_reaches_the_cloud(
    brokers: tuple[Broker, dict[str, Broker]], pki: SecurityPki, tmp_path: Path
) -> None:
    cloud_broker, sites = brokers
    roam = {"edge1": f"127.0.0.1:{sites['site1'].port}", "edge2": f"127.0.0.1:{sites['site2'].port}"}
    spec = FleetSpec(devices=dict(DEVICES), model="mlp", input_shape=(64,), fleet="sites",
                     cloud={"rounds": 4, "batch_size": 40, "lr": 0.3, "seed": 3, "deadline_s": 60.0},
                     device_extra={
                         # Slow boards, so that commands land mid-round; short timeouts for the fallback.
                         "dev1": {"edge_brokers": roam, "step_delay_s": 0.3},
                         "dev2": {"edge_brokers": roam, "step_delay_s": 0.3, "act_timeout_s": 1.0,
                                  "migrate_timeout_s": 2.0}})
    # The cloud and the operator on the cloud broker: TLS and their own passwords.
    auth = {n: {"tls": True, "ca_file": str(pki.ca), "username": n, "password_file": str(pki.creds / f"{n}.password")}
            for n in ("cloud", "operator")}
    on_site = {**{d: sites["site1" if e == "edge1" else "site2"] for d, e in DEVICES.items()},
               "edge1": sites["site1"], "edge2": sites["site2"]}
    tb = Testbed(tmp_path / "fleet", spec, broker=sites["site1"], cloud_broker=cloud_broker, site_brokers=on_site,
                 auth=auth)
    try:
        tb.prepare()
        tb.start()
        started = tb.wait_event("round_started", 120, round=1)
        assert sorted(started["sampled"]) == sorted(DEVICES)
        # Mid-round: once dev1 trains round 1 (a move that reaches an idle device is a move between rounds).
        tb.wait(lambda m: m.kind == "status" and m.src == "dev1" and (m.data or {}).get("state") == "training"
                and m.data.get("round") == 1, 60)
        moved = tb.ctl("dev1", "move", edge="edge2", at_step=2)
        assert moved["ok"], moved
        done = tb.wait_event("migration_done", 60, device="dev1")
        assert (done["source"], done["destination"], done["path"]) == ("edge1", "edge2", "direct")
        # At boundary 2 when the command came in time (0.6 s of training after the status), else at the next one.
        assert done["step"] == 2 if moved["result"]["when"] == "mini-batch boundary 2" else done["step"] > 2
        r1 = tb.wait(lambda m: m.kind == "metrics" and (m.data or {}).get("kind") == "round"
                     and m.data.get("round") == 1, 60).data
        assert r1 is not None and r1["participants"] == 4 and r1["devices"]["dev1"]["edge"] == "edge2"

        # Round 2: site 1's edge dies while dev2 trains there; dev2 moves away, its source is gone: the
        # restart request crosses the bridge to the cloud, which restarts dev2's round at edge2.
        tb.wait(lambda m: m.kind == "status" and m.src == "dev2" and (m.data or {}).get("state") == "training"
                and m.data.get("round") == 2, 60)
        tb.kill("edge1")
        assert tb.ctl("dev2", "move", edge="edge2")["ok"]
        fallback = tb.wait_event("migration_fallback", 60, device="dev2")
        assert fallback["destination"] == "edge2" and fallback["source"] == "edge1"
        again = tb.wait_event("round_restarted_for_device", 60, device="dev2")
        assert again["edge"] == "edge2" and again["round"] == 2
        end = tb.wait_event("run_complete", 120)
        assert end["rounds"] == 4 and end["accuracy"] is not None
        rounds = {m["round"]: m for m in tb.round_metrics()}
        assert rounds[2]["devices"]["dev2"]["edge"] == "edge2" and rounds[2]["participants"] == 4
        assert {d: v["edge"] for d, v in rounds[3]["devices"].items()} == dict.fromkeys(DEVICES, "edge2")
        # Each node kept its own state directory; the roaming devices said where they went.
        assert all((tmp_path / "fleet" / "state" / n / "boot").exists() for n in (*DEVICES, "edge1", "edge2"))
        for d in ("dev1", "dev2"):
            stats = tb.ctl(d, "status")["result"]
            assert stats["edge"] == "edge2" and stats["transport"]["broker_moves"] >= 1
    finally:
        tb.stop()


def test_the_cloud_broker_gives_each_site_bridge_only_its_kinds() -> None:
    acl = (CONF / "acl").read_text()
    block = acl[acl.index("user bridge-site1"):].split("\n\n")[0]
    assert "topic write mqttfl/v1/+/ckpt/#" in block and "topic read mqttfl/v1/+/ckpt/#" in block
    assert "act" not in block and "grad" not in block
    bridge = (CONF / "bridge.conf").read_text()
    assert "topic mqttfl/v1/+/ckpt/+/+ both 1" in bridge and "/act/" not in bridge and "/grad/" not in bridge
