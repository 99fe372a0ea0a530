"""Several sites on one machine (docs/operations.md, "Several sites"): a cloud broker and one broker per site, each
bridged to the cloud broker with the shipped ``broker_config/bridge.conf``, and what crosses each bridge.

On loopback the bridge is the shipped file with only deployment values changed, as the guide does for a second
site: ``site1`` becomes the site's name (connection, client ids), ``address`` the cloud broker's port, and the TLS
and account directives are left out (the benchmarks and tests that use this run anonymous loopback brokers; TLS
and passwords are covered by tests/test_broker_security.py and tests/test_multisite.py). The topic lines are used
as shipped, so what crosses here is what crosses in production.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mqttfl.tools.broker import Broker, BrokerError, BrokerOptions

BRIDGE_CONF = Path(__file__).resolve().parents[2] / "broker_config" / "bridge.conf"
SHIPPED_SITE = "site1"  # the site name bridge.conf is written for
# Directives of the shipped bridge that only make sense with TLS and an account on the remote broker.
TLS_AND_ACCOUNT = ("remote_username", "remote_password", "bridge_cafile", "bridge_insecure", "bridge_tls_version")


def loopback_bridge(cloud_port: int, site: str = SHIPPED_SITE, *, client_id: str | None = None,
                    conf: Path | None = None) -> str:
    """The bridge section ``conf`` (default: the shipped one, written for site1) for ``site``, pointed at a
    loopback cloud broker without TLS or account; ``client_id`` is the bridge's client id on the cloud broker
    (default ``bridge-<site>-<pid>``, so that two test runs sharing nothing but the machine never take over each
    other's session)."""
    conf = conf or BRIDGE_CONF
    if not conf.exists():
        raise BrokerError(f"{conf} not found: the bridge config ships in the source tree's broker_config/")
    out, found = [], set()
    for line in conf.read_text().replace(SHIPPED_SITE, site).splitlines():
        key = line.split(" ", 1)[0]
        if key in TLS_AND_ACCOUNT:
            found.add(key)
            continue
        if key == "address":
            line = f"address 127.0.0.1:{cloud_port}"
        elif key == "remote_clientid":
            line = f"remote_clientid {client_id or f'bridge-{site}-{os.getpid()}'}"
        found.add(key)
        out.append(line)
    missing = {*TLS_AND_ACCOUNT, "address", "remote_clientid", "connection", "topic"} - found
    if missing:
        raise BrokerError(f"{conf} lacks {sorted(missing)}")
    return "\n".join(out)


def wait_bridge_up(site: Broker, timeout: float = 30.0) -> None:
    """Until the site broker publishes ``$SYS/broker/connection/<name>/state`` = 1 (the bridge is connected);
    bridge.conf turns these notifications on."""
    states: queue.Queue[bytes] = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_connect = lambda client, *a: client.subscribe("$SYS/broker/connection/+/state", qos=1)
    c.on_message = lambda client, userdata, m: states.put(bytes(m.payload))
    c.connect(site.host, site.port)
    c.loop_start()
    try:
        while True:
            try:
                if states.get(timeout=timeout) == b"1":
                    return
            except queue.Empty:
                raise BrokerError(f"the bridge of {site.host}:{site.port} did not connect within {timeout:.0f}s: "
                                  f"{site.tail_log()}") from None
    finally:
        c.disconnect()
        c.loop_stop()


@contextlib.contextmanager
def bridged_sites(root: Path, sites: list[str], opts: BrokerOptions | None = None, bridge_conf: Path | None = None
                  ) -> Iterator[tuple[Broker, dict[str, Broker]]]:
    """A cloud broker and one broker per site bridged to it with ``bridge_conf`` (default the shipped one), the
    bridges connected; all stopped on exit."""
    opts = opts or BrokerOptions()
    cloud = Broker(opts, workdir=root / "cloud-broker")
    brokers: dict[str, Broker] = {}
    try:
        cloud.start()
        for s in sites:
            extra = "\n".join(x for x in (opts.extra, loopback_bridge(cloud.port, s, conf=bridge_conf)) if x)
            brokers[s] = Broker(BrokerOptions(**{**opts.__dict__, "extra": extra}), workdir=root / f"{s}-broker")
            brokers[s].start()
            wait_bridge_up(brokers[s])
        yield cloud, brokers
    finally:
        for b in brokers.values():
            b.stop()
        cloud.stop()


_SOCKET_RE = re.compile(r"pid=(\d+),")
_COUNTER_RE = re.compile(r"\b(bytes_sent|bytes_acked|bytes_received):(\d+)")


def bridge_bytes(site: Broker, cloud: Broker) -> tuple[int, int] | None:
    """Bytes the site broker's bridge connection sent to the cloud broker and received from it so far (the
    kernel's counters of that TCP connection, from ``ss``; Mosquitto's own $SYS byte counters add up every
    client and cannot tell the bridge apart); None without ``ss`` (iproute2)."""
    pid = site.proc.pid if site.proc else -1
    try:
        text = subprocess.run(["ss", "-tinpH", "state", "established", "dst", f"{cloud.host}:{cloud.port}"],
                              capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sent = received = 0
    owner = None
    for line in text.splitlines():
        m = _SOCKET_RE.search(line)
        if m:  # a socket's first line names its process; its counters follow on the next line
            owner = int(m.group(1))
            continue
        if owner == pid:
            counters = {k: int(v) for k, v in _COUNTER_RE.findall(line)}
            sent += counters.get("bytes_sent", counters.get("bytes_acked", 0))
            received += counters.get("bytes_received", 0)
    return sent, received
