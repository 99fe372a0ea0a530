"""The shipped broker configs against a real Mosquitto: TLS, per-node passwords, the ACL, the bridge.

Everything is generated with the shipped scripts (gen-ca.sh, gen-node-cert.sh, add-node.sh) and the
brokers run broker_config/production.conf, dev.conf and bridge.conf with only deployment values (paths,
ports, the bridge address) substituted, so a broken directive in a shipped file fails here.

"Never arrives" is proven without sleeping: after the forbidden message the same sender publishes a
permitted one to the same receiver. Mosquitto handles one connection's packets in order and queues them to
a subscriber in order, so once the permitted one has arrived the forbidden one can no longer come.
"""

from __future__ import annotations

import os
import queue
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from mqttfl.tools.broker import Broker, BrokerOptions, find_mosquitto

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "broker_config"
TIMEOUT = 5.0
NODES = ("dev1", "dev2", "edge1", "cloud", "operator", "monitor", "bridge-site1")

pytestmark = pytest.mark.timeout(60)


def _have_mosquitto_tools() -> bool:
    try:
        find_mosquitto()
    except RuntimeError:
        return False
    return os.access("/usr/bin/mosquitto_passwd", os.X_OK)


if not _have_mosquitto_tools():
    pytest.skip("mosquitto and mosquitto_passwd are needed", allow_module_level=True)


@dataclass(frozen=True)
class Pki:
    dir: Path
    passwd: Path
    creds: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def password(self, node: str) -> str:
        return (self.creds / f"{node}.password").read_text()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    auth = d / "auth"

    def sh(*args: str) -> None:
        subprocess.run(["sh", *args], check=True, capture_output=True, timeout=30)

    sh(str(CONF / "gen-ca.sh"), "-d", str(d))
    sh(str(CONF / "gen-node-cert.sh"), "-d", str(d), "-s", "IP:127.0.0.1,DNS:localhost", "broker")
    sh(str(CONF / "gen-node-cert.sh"), "-d", str(d), "dev1")
    for node in NODES:
        sh(str(CONF / "add-node.sh"), "-d", str(auth), node)
    return Pki(dir=d, passwd=auth / "passwd", creds=auth / "credentials")


def render(conf: str, overrides: dict[str, str]) -> str:
    """Replace whole directive lines (keyed by their leading words) and insist every override matched."""
    used: set[str] = set()
    out = []
    for line in conf.splitlines():
        for key, value in overrides.items():
            if line == key or line.startswith(key + " "):
                line = value
                used.add(key)
                break
        out.append(line)
    missing = set(overrides) - used
    assert not missing, f"directives not found in the shipped config: {sorted(missing)}"
    return "\n".join(out) + "\n"


def _user_line() -> str:
    # Mosquitto started as root drops to the `mosquitto` user before reading the password and ACL files,
    # which then cannot read pytest's 0700 temp directories.
    return "user root" if os.geteuid() == 0 else "#user"


def production_config(pki: Pki) -> str:
    return render(
        (CONF / "production.conf").read_text(),
        {
            "password_file": f"password_file {pki.passwd}",
            "acl_file": f"acl_file {CONF / 'acl'}",
            "user mosquitto": _user_line(),
            "listener 8883": "listener {port} 127.0.0.1",
            "cafile": f"cafile {pki.ca}",
            "certfile": f"certfile {pki.dir / 'broker.crt'}",
            "keyfile": f"keyfile {pki.dir / 'broker.key'}",
            "persistence_location": "persistence_location {dir}/",
            "log_dest syslog": "log_dest stderr",
        },
    )


@pytest.fixture(scope="module")
def secure_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(BrokerOptions(), workdir=tmp_path_factory.mktemp("secure"), config_text=production_config(pki))
    b.start()
    yield b
    b.cleanup()


class Node:
    """A paho 2.x MQTT v5 client whose callbacks only feed queues, so the test thread waits on events."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None = None,
        *,
        ca: Path | None = None,
        client_id: str | None = None,
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{username or 'anon'}-{id(self)}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.outcome: queue.Queue[ReasonCode | str] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self._acked: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client.on_connect = lambda c, u, f, rc, p: self.outcome.put(rc)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.outcome.put(f"disconnected: {rc}")
        self.client.on_connect_fail = lambda c, u: self.outcome.put("connect failed")
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(list(rcs))
        self.client.on_publish = self._on_publish

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode, props: object
    ) -> None:
        with self._lock:
            self._acked.setdefault(mid, threading.Event()).set()

    def connect(self) -> ReasonCode | str:
        """The broker's verdict: the CONNACK reason code, or why no CONNACK came."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=10)
        except (OSError, ssl.SSLError) as e:
            return f"connect raised {e!r}"
        self.client.loop_start()
        try:
            return self.outcome.get(timeout=TIMEOUT)
        except queue.Empty:
            return "no answer"

    def subscribe(self, topic: str) -> list[ReasonCode]:
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1 publish that returns once the broker has PUBACKed it (denied publishes are PUBACKed too)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            ev = self._acked.setdefault(info.mid, threading.Event())
        assert ev.wait(TIMEOUT), f"no PUBACK for {topic}"

    def receive(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def nodes(secure_broker: Broker, pki: Pki) -> Iterator[dict[str, Node]]:
    """Connected, authenticated TLS clients for every node, one client id each."""
    made: dict[str, Node] = {}
    for name in ("dev1", "dev2", "edge1", "operator", "monitor"):
        n = Node(secure_broker.port, name, pki.password(name), ca=pki.ca)
        rc = n.connect()
        assert isinstance(rc, ReasonCode) and rc == 0, f"{name} could not connect: {rc}"
        made[name] = n
    yield made
    for n in made.values():
        n.close()


def _refused(outcome: ReasonCode | str) -> bool:
    return isinstance(outcome, str) or outcome.is_failure


# --- connection -------------------------------------------------------------------------------------------


def test_anonymous_connection_is_refused(secure_broker: Broker, pki: Pki) -> None:
    n = Node(secure_broker.port, None, ca=pki.ca)
    try:
        outcome = n.connect()
    finally:
        n.close()
    assert _refused(outcome), outcome


def test_wrong_password_is_refused(secure_broker: Broker, pki: Pki) -> None:
    n = Node(secure_broker.port, "dev1", "not-" + pki.password("dev1"), ca=pki.ca)
    try:
        outcome = n.connect()
    finally:
        n.close()
    assert _refused(outcome), outcome


def test_another_nodes_password_is_refused(secure_broker: Broker, pki: Pki) -> None:
    n = Node(secure_broker.port, "dev1", pki.password("dev2"), ca=pki.ca)
    try:
        outcome = n.connect()
    finally:
        n.close()
    assert _refused(outcome), outcome


def test_tls_with_the_generated_ca_and_node_password_connects(secure_broker: Broker, pki: Pki) -> None:
    n = Node(secure_broker.port, "dev1", pki.password("dev1"), ca=pki.ca)
    try:
        outcome = n.connect()
    finally:
        n.close()
    assert isinstance(outcome, ReasonCode) and outcome == 0, outcome


def test_plain_tcp_to_the_tls_listener_never_gets_a_connack(secure_broker: Broker, pki: Pki) -> None:
    n = Node(secure_broker.port, "dev1", pki.password("dev1"))
    try:
        outcome = n.connect()
    finally:
        n.close()
    assert not isinstance(outcome, ReasonCode), outcome


def test_a_certificate_from_another_ca_is_rejected_by_the_client(
    secure_broker: Broker, pki: Pki, tmp_path: Path
) -> None:
    # The client must pin the fleet's CA, not trust whatever certificate the listener presents.
    subprocess.run(["sh", str(CONF / "gen-ca.sh"), "-d", str(tmp_path)], check=True, capture_output=True)
    n = Node(secure_broker.port, "dev1", pki.password("dev1"), ca=tmp_path / "ca.crt")
    try:
        outcome = n.connect()
    finally:
        n.close()
    assert isinstance(outcome, str) and "CERTIFICATE_VERIFY_FAILED" in outcome, outcome


# --- ACL --------------------------------------------------------------------------------------------------


def test_a_device_cannot_publish_as_another_device(nodes: dict[str, Node]) -> None:
    edge = nodes["edge1"]
    assert edge.subscribe("mqttfl/v1/f1/act/+/edge1") == [1]
    nodes["dev1"].publish("mqttfl/v1/f1/act/dev2/edge1", b"forged")
    nodes["dev1"].publish("mqttfl/v1/f1/act/dev1/edge1", b"legit")
    got = edge.receive()
    assert (got.topic, got.payload) == ("mqttfl/v1/f1/act/dev1/edge1", b"legit")


def test_a_device_cannot_read_another_devices_gradients(nodes: dict[str, Node]) -> None:
    dev1, dev2 = nodes["dev1"], nodes["dev2"]
    # Mosquitto 2.0 grants the subscription and filters on delivery; either way nothing may arrive.
    dev1.subscribe("mqttfl/v1/f2/grad/edge1/dev2")
    assert dev1.subscribe("mqttfl/v1/f2/grad/edge1/dev1") == [1]
    assert dev2.subscribe("mqttfl/v1/f2/grad/edge1/dev2") == [1]
    nodes["edge1"].publish("mqttfl/v1/f2/grad/edge1/dev2", b"for dev2")
    nodes["edge1"].publish("mqttfl/v1/f2/grad/edge1/dev1", b"for dev1")
    assert dev2.receive().payload == b"for dev2"
    got = dev1.receive()
    assert (got.topic, got.payload) == ("mqttfl/v1/f2/grad/edge1/dev1", b"for dev1")


def test_a_device_cannot_read_everything_with_a_wildcard(nodes: dict[str, Node]) -> None:
    dev1 = nodes["dev1"]
    dev1.subscribe("mqttfl/v1/#")
    nodes["edge1"].publish("mqttfl/v1/f3/grad/edge1/dev2", b"private")
    nodes["edge1"].publish("mqttfl/v1/f3/model/edge1/all", b"broadcast")
    got = dev1.receive()
    assert (got.topic, got.payload) == ("mqttfl/v1/f3/model/edge1/all", b"broadcast")


def test_legitimate_split_learning_paths_work(nodes: dict[str, Node]) -> None:
    dev1, edge = nodes["dev1"], nodes["edge1"]
    assert edge.subscribe("mqttfl/v1/f4/+/+/edge1") == [1]
    assert dev1.subscribe("mqttfl/v1/f4/+/+/dev1") == [1]
    assert dev1.subscribe("mqttfl/v1/f4/+/+/all") == [1]
    dev1.publish("mqttfl/v1/f4/act/dev1/edge1", b"smashed")
    assert edge.receive().payload == b"smashed"
    edge.publish("mqttfl/v1/f4/grad/edge1/dev1", b"grad")
    assert dev1.receive().payload == b"grad"
    edge.publish("mqttfl/v1/f4/model/edge1/all", b"model")
    assert dev1.receive().payload == b"model"


def test_operator_commands_any_node_but_a_device_cannot_pose_as_operator(nodes: dict[str, Node]) -> None:
    dev1, dev2 = nodes["dev1"], nodes["dev2"]
    assert dev2.subscribe("mqttfl/v1/f5/+/+/dev2") == [1]
    nodes["operator"].publish("mqttfl/v1/f5/ctl/operator/dev2", b'{"cmd":"stop"}')
    got = dev2.receive()
    assert (got.topic, got.payload) == ("mqttfl/v1/f5/ctl/operator/dev2", b'{"cmd":"stop"}')
    dev1.publish("mqttfl/v1/f5/ctl/operator/dev2", b'{"cmd":"forged"}')
    dev1.publish("mqttfl/v1/f5/event/dev1/dev2", b"sentinel")
    got = dev2.receive()
    assert (got.topic, got.payload) == ("mqttfl/v1/f5/event/dev1/dev2", b"sentinel")


def test_operator_reads_all_traffic(nodes: dict[str, Node]) -> None:
    op = nodes["operator"]
    assert op.subscribe("mqttfl/v1/f6/#") == [1]
    nodes["edge1"].publish("mqttfl/v1/f6/grad/edge1/dev1", b"g")
    assert op.receive().topic == "mqttfl/v1/f6/grad/edge1/dev1"


def test_monitor_reads_status_but_not_tensors_and_cannot_publish(nodes: dict[str, Node]) -> None:
    mon = nodes["monitor"]
    mon.subscribe("mqttfl/v1/f7/#")
    nodes["edge1"].publish("mqttfl/v1/f7/grad/edge1/dev1", b"tensor")
    nodes["monitor"].publish("mqttfl/v1/f7/ctl/monitor/dev1", b"forged")
    nodes["monitor"].publish("mqttfl/v1/f7/ctl/operator/dev1", b"forged")
    nodes["edge1"].publish("mqttfl/v1/f7/status/edge1/all", b"online")
    got = mon.receive()
    assert (got.topic, got.payload) == ("mqttfl/v1/f7/status/edge1/all", b"online")


# --- bridge -----------------------------------------------------------------------------------------------


def _bridge_topic_lines() -> list[str]:
    return [ln for ln in (CONF / "bridge.conf").read_text().splitlines() if ln.startswith("topic ")]


def test_every_bridge_topic_line_states_qos_1() -> None:
    # A bare `topic` line bridges at QoS 0 (Mosquitto's default): a delta lost on the WAN is lost for good.
    lines = _bridge_topic_lines()
    assert lines
    for line in lines:
        words = line.split()
        assert len(words) >= 4 and words[2] in ("in", "out", "both") and words[3] == "1", line


@pytest.fixture
def bridged(pki: Pki, secure_broker: Broker, tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    """A site broker (dev.conf + bridge.conf) bridged over TLS with a password to the production broker."""
    site_conf = render(
        (CONF / "dev.conf").read_text(),
        {"listener 1883": "listener {port} 127.0.0.1", "log_type notice": "log_type notice\n" + _user_line()},
    ) + render(
        (CONF / "bridge.conf").read_text(),
        {
            "address": f"address 127.0.0.1:{secure_broker.port}",
            "remote_password": f"remote_password {pki.password('bridge-site1')}",
            "bridge_cafile": f"bridge_cafile {pki.ca}",
            # A fresh session per test: the cloud broker is shared by the module.
            "remote_clientid": f"remote_clientid bridge-site1-{tmp_path.name}",
        },
    )
    site = Broker(BrokerOptions(), workdir=tmp_path / "site", config_text=site_conf)
    site.start()
    try:
        yield site, secure_broker
    finally:
        site.cleanup()


def _wait_bridge_up(site: Broker) -> None:
    watcher = Node(site.port, None)
    try:
        assert watcher.connect() == 0
        watcher.subscribe("$SYS/broker/connection/+/state")
        while True:
            msg = watcher.receive(timeout=10)
            if msg.payload == b"1":
                return
    finally:
        watcher.close()


def test_bridge_carries_deltas_to_the_cloud_and_models_to_the_site(
    bridged: tuple[Broker, Broker], pki: Pki
) -> None:
    site, cloud_broker = bridged
    _wait_bridge_up(site)
    cloud = Node(cloud_broker.port, "cloud", pki.password("cloud"), ca=pki.ca)
    edge = Node(site.port, None, client_id="edge1")
    try:
        assert cloud.connect() == 0 and edge.connect() == 0
        assert cloud.subscribe("mqttfl/v1/fb/+/+/cloud") == [1]
        assert edge.subscribe("mqttfl/v1/fb/+/+/all") == [1]
        edge.publish("mqttfl/v1/fb/delta/edge1/cloud", b"delta")
        got = cloud.receive()
        assert (got.topic, got.payload, got.qos) == ("mqttfl/v1/fb/delta/edge1/cloud", b"delta", 1)
        cloud.publish("mqttfl/v1/fb/model/cloud/all", b"model v1")
        got = edge.receive()
        assert (got.topic, got.payload, got.qos) == ("mqttfl/v1/fb/model/cloud/all", b"model v1", 1)
    finally:
        cloud.close()
        edge.close()


def test_bridge_keeps_split_learning_traffic_on_the_site(bridged: tuple[Broker, Broker], pki: Pki) -> None:
    site, cloud_broker = bridged
    _wait_bridge_up(site)
    op = Node(cloud_broker.port, "operator", pki.password("operator"), ca=pki.ca)
    edge = Node(site.port, None, client_id="edge1")
    try:
        assert op.connect() == 0 and edge.connect() == 0
        assert op.subscribe("mqttfl/v1/fc/#") == [1]
        edge.publish("mqttfl/v1/fc/grad/edge1/dev1", b"grad")
        edge.publish("mqttfl/v1/fc/metrics/edge1/all", b"sentinel")
        got = op.receive()
        assert (got.topic, got.payload) == ("mqttfl/v1/fc/metrics/edge1/all", b"sentinel")
    finally:
        op.close()
        edge.close()


def test_acks_bridged_both_ways_are_not_echoed(bridged: tuple[Broker, Broker], pki: Pki) -> None:
    site, cloud_broker = bridged
    _wait_bridge_up(site)
    cloud = Node(cloud_broker.port, "cloud", pki.password("cloud"), ca=pki.ca)
    edge = Node(site.port, None, client_id="edge1")
    try:
        assert cloud.connect() == 0 and edge.connect() == 0
        assert cloud.subscribe("mqttfl/v1/fd/ack/+/cloud") == [1]
        assert edge.subscribe("mqttfl/v1/fd/ack/+/edge1") == [1]
        edge.publish("mqttfl/v1/fd/ack/edge1/cloud", b"a1")
        cloud.publish("mqttfl/v1/fd/ack/cloud/edge1", b"a2")
        assert cloud.receive().payload == b"a1"
        assert edge.receive().payload == b"a2"
        # An echo would loop site -> cloud -> site within a few milliseconds on loopback; proving absence
        # needs a bounded wait, which here is not used for synchronisation.
        with pytest.raises(queue.Empty):
            cloud.receive(timeout=0.5)
        with pytest.raises(queue.Empty):
            edge.receive(timeout=0.1)
    finally:
        cloud.close()
        edge.close()
