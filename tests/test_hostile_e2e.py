"""One bad node must not stop a fleet, end to end (docs/design.md, "Trust"): a fleet of real agent processes
trains on the production broker (TLS, one password per node, the shipped ACL) while a second authenticated
node, ``mallory``, using only its own id as the ACL allows, runs every attack found against a training fleet
and a stream of thousands of hostile messages over every topic kind to every node:

1. ``model`` messages with a valid newer plan to every device (they aborted rounds);
2. a retained status saying it is an edge, and deltas claiming 1e9 samples (they were aggregated);
3. retained statuses with ``"cut": "x"`` and ``"edge": ["x"]`` (they raised in the cloud's timers);
4. 64 never-completed chunked transfers to the cloud, their frames re-sent as duplicates (they filled the
   reassembly table for everyone);
5. acknowledgements of ids it was never sent.

The run must complete every round with every device, on exactly the model of the run without mallory (the
unsplit reference, so the accuracy is the clean run's), with no agent restarted, and every refusal counted
and reported on ``event``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mqttfl.ml.models import initial_state
from mqttfl.protocol.messages import (
    Abort,
    Activations,
    DeviceUpdate,
    EdgeUpdate,
    Expect,
    Gradients,
    Message,
    Ready,
    Report,
    Restart,
    TrainRound,
)
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import ModelRef
from mqttfl.runtime.config import load_config
from mqttfl.runtime.transport import Inbound, Transport
from mqttfl.tools import testbed
from mqttfl.tools.broker import Broker, BrokerOptions
from mqttfl.wire.chunking import make_chunks
from mqttfl.wire.codec import Envelope, encode, encode_json
from mqttfl.wire.topics import JSON_KINDS, KINDS, topic
from tests.helpers import schema
from tests.reference import TOL, max_abs_diff, reference_global
from tests.test_broker_security import CONF, Pki, production_config
from tests.test_split_e2e import cloud_state, digits

pytestmark = pytest.mark.timeout(300)

NODES = ("cloud", "edge1", "edge2", "dev1", "dev2", "dev3", "dev4", "operator", "mallory")
SHAPE = (64,)
STREAM = 3000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    auth = d / "auth"

    def sh(*args: str) -> None:
        subprocess.run(["sh", *args], check=True, capture_output=True, timeout=60)

    sh(str(CONF / "gen-ca.sh"), "-d", str(d))
    sh(str(CONF / "gen-node-cert.sh"), "-d", str(d), "-s", "IP:127.0.0.1,DNS:localhost", "broker")
    for node in NODES:
        sh(str(CONF / "add-node.sh"), "-d", str(auth), node)
    return Pki(dir=d, passwd=auth / "passwd", creds=auth / "credentials")


@pytest.fixture(scope="module")
def acl_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(BrokerOptions(), workdir=tmp_path_factory.mktemp("acl"), config_text=production_config(pki))
    b.start()
    yield b
    b.cleanup()


class Mallory:
    """An authenticated node that publishes whatever it likes, but only as itself (the ACL allows no more)."""

    def __init__(self, broker: Broker, pki: Pki, fleet: str, victims: list[str]) -> None:
        cfg = load_config(None, "edge", environ={}, node="mallory", fleet=fleet,
                          mqtt={"host": broker.host, "port": broker.port, "tls": True, "ca_file": str(pki.ca),
                                "password_file": str(pki.creds / "mallory.password")})
        # Its status says it is an edge: the cloud must not believe it.
        self.t = Transport(cfg, status_fields={"state": "idle"}).start()
        self.fleet, self.victims = fleet, victims
        self.rng = random.Random(0)
        self.sent: Counter[str] = Counter()
        self.stop = threading.Event()
        self.model = initial_state(ModelRef("mlp", SHAPE, 10), 0)
        self.cut = schema("mlp", SHAPE).default_cut
        self.chunks = [make_chunks(os.urandom(4096), 1024)[0] for _ in range(64)]
        self.round = 0

    def raw(self, kind: str, dst: str, payload: bytes, retain: bool = False) -> None:
        self.t.client.publish(topic(self.fleet, kind, "mallory", dst), payload, qos=1, retain=retain)
        self.sent[kind] += 1

    def send(self, dst: str, msg: Message, **body: Any) -> None:
        b, tensors = msg.to_wire()
        self.raw(msg.kind, dst, encode(Envelope(kind=msg.kind, src="mallory", dst=dst, body={**b, **body},
                                                tensors=tensors, run=msg.run, round=msg.round)))

    def status(self, body: dict[str, Any]) -> None:
        self.raw("status", "all", encode_json({"node": "mallory", "boot": 1, **body}), retain=True)

    def attacks(self, run: str) -> None:
        """The four single-node attacks, and forged acknowledgements, once."""
        newer = Plan(run=run, round=self.round + 1, attempt=9, model="mlp", input_shape=SHAPE, batch_size=32)
        part = {k: v for k, v in self.model.items() if k in schema("mlp", SHAPE).keys(0, self.cut)}
        for dev in ("dev1", "dev2", "dev3", "dev4"):
            self.send(dev, TrainRound(run=run, round=newer.round, plan=newer, cut=self.cut, edge="edge1", state=part))
        huge = {k: np.full_like(v, 0.5) for k, v in self.model.items()}
        for attempt in range(3):
            self.send("cloud", EdgeUpdate(run=run, round=self.round, attempt=attempt, missing=(),
                                          reports={"dev1": Report(samples=10**9)}, delta=huge), reliable=True)
        for f in self.chunks:
            self.raw("delta", "cloud", f)
        for dst in ("edge1", "edge2", "dev1", "cloud"):
            self.raw("ack", dst, encode(Envelope(kind="ack", src="mallory", dst=dst,
                                                 body={"ids": [os.urandom(16).hex()], "of": "delta"})))

    def stream_one(self, run: str) -> None:
        """One hostile message of any kind to any node."""
        rng = self.rng
        kind, dst = rng.choice(sorted(KINDS - {"status"})), rng.choice(self.victims)
        rnd = rng.choice([self.round, self.round + 1, 99])
        if kind in JSON_KINDS:
            body = {"id": f"c{rng.random()}", "cmd": rng.choice(["stop", "shutdown", "set", "move"]),
                    "args": {"rounds": 0, "edge": "mallory"}, "event": "run_complete", "node": dst}
            self.raw(kind, dst, encode_json(body) if rng.random() < 0.8 else rng.randbytes(50))
            return
        if rng.random() < 0.2:
            self.raw(kind, dst, rng.randbytes(rng.randrange(1, 400)))
            return
        x = np.full((32, *schema("mlp", SHAPE).activation(self.cut)), rng.choice([0.1, 1e30]), np.float32)
        p = Plan(run=run, round=rnd, model="mlp", input_shape=SHAPE, batch_size=32)
        part = {k: v for k, v in self.model.items() if k in schema("mlp", SHAPE).keys(0, self.cut)}
        msg: Message = {
            "model": TrainRound(run=run, round=rnd, plan=p, cut=self.cut, edge="edge1", state=part),
            "act": Activations(run=run, round=rnd, step=0, micro=0, n_micro=1, batch_size=32, attempt=0, x=x,
                               y=np.zeros(32, np.int64)),
            "grad": Gradients(run=run, round=rnd, step=0, micro=0, loss_sum=1.0, correct=0, g=x),
            "delta": rng.choice([DeviceUpdate(run=run, round=rnd, report=Report(samples=10**6), delta=part),
                                 EdgeUpdate(run=run, round=rnd, attempt=0, reports={"dev2": Report(samples=5)},
                                            missing=("dev1",), delta={k: v * 100 for k, v in self.model.items()})]),
            "ckpt": rng.choice([Expect(migration="m", source="mallory"), Ready(migration="m"), Abort(migration="m"),
                                Restart(run=run, round=rnd, migration="m", edge="mallory", source="edge1")]),
        }.get(kind) or Abort(migration="m")
        if kind in ("ack", "profile"):
            self.raw(kind, dst, encode(Envelope(kind=kind, src="mallory", dst=dst, round=rnd,
                                                body={"ids": [os.urandom(16).hex()], "op": "x"})))
        else:
            self.send(dst, msg, reliable=rng.random() < 0.5)

    def run(self, run: str) -> None:
        self.status({"role": "edge", "state": "idle"})
        self.status({"role": "device", "state": "idle", "edge": "edge1", "cut": "x", "samples": 10})
        self.status({"role": "device", "state": "idle", "edge": ["x"], "samples": 10})
        self.status({"role": "edge", "state": "idle"})
        for i in itertools.count():
            if self.stop.is_set():
                return
            if i % 100 == 0:
                self.attacks(run)
            if sum(self.sent.values()) < 2 * STREAM:
                self.stream_one(run)
            time.sleep(0.0005)


def test_a_fleet_on_the_production_broker_shrugs_off_an_authenticated_attacker(
        tmp_path: Path, acl_broker: Broker, pki: Pki, fleet: str) -> None:
    n_blocks = schema("mlp", SHAPE).n_blocks
    # Boards of 0.2 s per mini-batch: the run lasts long enough for the whole stream to arrive while it trains.
    slow = {"step_delay_s": 0.2}
    spec = testbed.FleetSpec(devices={"dev1": "edge1", "dev2": "edge1", "dev3": "edge2", "dev4": "edge2"},
                             model="mlp", input_shape=SHAPE, fleet=fleet,
                             device_extra={"dev1": slow, "dev2": slow, "dev3": slow, "dev4": {**slow, "cut": n_blocks}},
                             cloud={"rounds": 3, "batch_size": 32, "lr": 0.05, "seed": 3, "deadline_s": 90.0,
                                    "run": "hostile"})
    data = digits(SHAPE)
    drops: Counter[tuple[str, str]] = Counter()

    def note(m: Inbound) -> None:
        if m.kind == "event" and m.data and m.data.get("event") == "dropped":
            drops[(m.src, str(m.data.get("reason")))] += 1

    tb = testbed.Testbed(tmp_path, spec, broker=acl_broker, data=data, credentials=pki.creds,
                         mqtt={"tls": True, "ca_file": str(pki.ca)})
    mallory = Mallory(acl_broker, pki, fleet, ["cloud", "edge1", "edge2", "dev1", "dev2", "dev3", "dev4"])
    attacker = threading.Thread(target=mallory.run, args=("hostile",), daemon=True)
    try:
        with tb:
            tb.prepare()
            tb.start()
            tb.wait_online(["cloud", "edge1", "edge2", "dev1", "dev2", "dev3", "dev4"], timeout=120)
            attacker.start()
            tb.wait_event("round_started", 120, on_message=note)
            during = sum(mallory.sent.values())
            done = tb.wait_event("run_complete", 240, on_message=note)
            during = sum(mallory.sent.values()) - during
            mallory.stop.set()
            attacker.join(10)
            stats = {n: tb.ctl(n, "status")["result"]["transport"] for n in
                     ("cloud", "edge1", "edge2", "dev1", "dev2", "dev3", "dev4")}
            fleet_view = tb.ctl("cloud", "fleet")["result"]
            alive = {n: p.poll() for n, p in tb.procs.items()}
            for m in tb.inbox:
                note(m)
            rounds = tb.round_metrics()
    finally:
        mallory.stop.set()
        mallory.t.stop()
    assert alive == dict.fromkeys(alive), f"an agent exited: {alive}"
    assert during >= STREAM and set(mallory.sent) == set(KINDS), (during, mallory.sent)
    assert done["rounds"] == 3
    assert [(r["round"], r["attempt"], r["participants"]) for r in rounds] == [(0, 0, 4), (1, 0, 4), (2, 0, 4)]
    # Exactly the run without mallory: the same model, hence the clean run's accuracy.
    diff = max_abs_diff(cloud_state(tmp_path)["global"], reference_global(spec, data[0], rounds=3))
    assert diff <= TOL, f"the attacker changed the model by {diff:.3g}"
    assert fleet_view["mallory"]["authorised"] is None, "a self-declared edge is none"
    expected = {"cloud": {"not_an_edge", "sender_budget", "bad_field"},
                "dev1": {"unknown_sender"}, "dev3": {"unknown_sender"}, "edge1": {"unknown_sender"}}
    for node, reasons in expected.items():
        for reason in reasons:
            assert stats[node].get(f"drop_{reason}", 0) >= 1, (node, reason, stats[node])
            assert drops[(node, reason)] >= 1, (node, reason, "not reported on event")
    for node, s in stats.items():
        assert s.get("dropped", 0) >= 50, (node, s)
    print("\nhostile e2e:", json.dumps({"sent": dict(mallory.sent), "sent_while_training": during,
                                        "dropped": {n: s.get("dropped") for n, s in stats.items()}}))
