"""Failures with the real broker and real agent processes (docs/design.md, "Trust"): nothing learned is lost or
applied twice.

- the cloud is killed with SIGKILL mid-run and restarted: it resumes the same round from the same model;
- a device's TCP link is cut mid-transfer (through mqttfl/tools/linkproxy.py) and restored: exactly-once effect;
- malformed and foreign activations/deltas are dropped and counted without touching any state.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mqttfl.ml.data import BatchOrder
from mqttfl.ml.models import Part, build_model
from mqttfl.ml.shard import load_shard
from mqttfl.ml.stage import Stage, make_optimizer
from mqttfl.protocol.messages import Activations, DeviceUpdate, Message, Report, TrainRound, parse
from mqttfl.protocol.plan import Plan, data_seed
from mqttfl.runtime.config import load_config
from mqttfl.runtime.outbox import Outbox
from mqttfl.runtime.transport import Inbound, Transport
from mqttfl.tools import testbed
from mqttfl.tools.broker import Broker
from mqttfl.tools.linkproxy import LinkProxy
from mqttfl.tools.testbed import FleetSpec
from mqttfl.wire.topics import filter_for
from tests.helpers import schema, wait_for
from tests.reference import TOL, max_abs_diff, reference_global
from tests.test_split_e2e import cloud_state, digits


def _client(broker: Broker, fleet: str, node: str, role: str, root: Path | None = None, **kw: Any) -> Transport:
    cfg = load_config(None, role, environ={}, node=node, fleet=fleet, state_dir=str(root) if root else "",
                      mqtt={"host": broker.host, "port": broker.port})
    return Transport(cfg, **kw).start()


def test_cloud_killed_mid_run_resumes_the_same_round_from_the_same_model(tmp_path: Path, broker: Broker,
                                                                         fleet: str) -> None:
    n_blocks = schema("mlp", (64,)).n_blocks
    # A fixed board time per mini-batch (0.1 s, a second or so a round) keeps the devices busy in round 1 when the
    # cloud dies, however fast the machine.
    spec = FleetSpec(devices={"dev1": "edge1", "dev2": "edge1"}, model="mlp", input_shape=(64,), fleet=fleet,
                     device_extra={d: {"cut": n_blocks, "step_delay_s": 0.1} for d in ("dev1", "dev2")},
                     cloud={"rounds": 3, "batch_size": 64, "lr": 0.05, "seed": 2, "deadline_s": 30.0})
    data = digits((64,))
    spy = _client(broker, fleet, "spy", "test", subscriptions=[filter_for(fleet, "model", "cloud", "edge1")])
    try:
        with testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
            tb.prepare()
            tb.start()
            tb.wait_event("round_started", 120, round=1)
            tb.kill("cloud", signal.SIGKILL)
            before = cloud_state(tmp_path)
            assert before["round"] == 1 and len(before["history"]) == 1
            while spy.get(0.0) is not None:
                pass  # announcements of the dead cloud
            tb.start_node("cloud")
            resumed = tb.wait_event("resumed", 60)
            assert resumed["round"] == 1 and resumed["run"] == before["settings"]["run"]
            announced = _next_model(spy, 60)
            tb.wait_event("run_complete", 180)
    finally:
        spy.stop()
    assert announced.env is not None and announced.env.round == 1
    # The restarted cloud announced exactly the model it had persisted before the kill.
    assert max_abs_diff(dict(announced.env.tensors), before["global"]) == 0.0
    after = cloud_state(tmp_path)
    assert after["round"] == 3 and after["state"] == "done"
    assert [h["round"] for h in after["history"]] == [0, 1, 2]  # no round lost or applied twice
    diff = max_abs_diff(after["global"], reference_global(spec, data[0], rounds=3))
    assert diff <= TOL, f"run interrupted by a cloud crash differs from an uninterrupted one by {diff:.3g}"


def _next_model(spy: Transport, timeout: float) -> Inbound:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = spy.get(0.1)
        if msg is not None and msg.kind == "model":
            return msg
    raise AssertionError("the restarted cloud announced no round")


def test_device_link_cut_mid_transfer_has_exactly_once_effect(tmp_path: Path, broker: Broker, fleet: str) -> None:
    spec = FleetSpec(devices={"dev1": "edge1"}, model="mlp", input_shape=(64,), fleet=fleet,
                     device_extra={"dev1": {"act_timeout_s": 3.0}},
                     cloud={"rounds": 1, "batch_size": 32, "micro_batches": 2, "lr": 0.05, "seed": 4})
    data = digits((64,))
    with LinkProxy(broker.host, broker.port) as proxy, \
            testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start(["cloud", "edge1"])
        # Only dev1 goes through the proxy. Each act is ~4 KB; 30 KB in, the cut lands inside the act stream.
        proxy.sever_after(30_000)
        tb.start_node("dev1", env={"MQTTFL_MQTT__PORT": str(proxy.port)})
        assert proxy.severed_event.wait(120), "the device never sent 30 KB"
        # Offline until at least one reconnect attempt has been refused, then the link comes back.
        wait_for(lambda: proxy.refused >= 1, timeout=30, what="a refused reconnect")
        proxy.restore()
        tb.wait_event("run_complete", 120)
        [m] = tb.round_metrics()
        edge_stats = tb.ctl("edge1", "status")["result"]["transport"]
        severs, accepted = proxy.severs, proxy.accepted
    assert severs == 1 and accepted >= 2  # one cut, and the device came back through the proxy
    assert m["participants"] == 1 and m["missing"] == []
    assert m["devices"]["dev1"]["resends"] >= 1, m["devices"]["dev1"]
    # The edge answered a re-sent act from its cache instead of training on it a second time.
    assert edge_stats.get("grad_resent", 0) >= 1, edge_stats
    diff = max_abs_diff(cloud_state(tmp_path)["global"], reference_global(spec, data[0], rounds=1))
    assert diff <= TOL, f"a cut link changed the result by {diff:.3g}: something was lost or trained twice"


class FakeDevice:
    """Device dev2 played by the test: trains honestly, but before each honest act it sends broken ones."""

    def __init__(self, transport: Transport, shard_path: Path, intruder: Transport) -> None:
        self.t = transport
        self.shard = load_shard(shard_path)
        self.intruder = intruder

    def recv(self, kind: str, timeout: float = 60.0, **match: Any) -> Inbound:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.t.get(0.1)
            if msg is not None and msg.kind == kind and msg.env is not None and \
                    all(msg.env.body.get(k) == v for k, v in match.items()):
                return msg
        raise AssertionError(f"dev2 got no {kind} {match}")

    def send(self, msg: Message, via: Transport | None = None, reliable: bool = False) -> None:
        body, tensors = msg.to_wire()
        (via or self.t).send(msg.kind, "edge1", body=body, tensors=tensors, run=msg.run, round=msg.round,
                             reliable=reliable)

    def run_round(self) -> None:
        env = self.recv("model").env
        assert env is not None
        msg = parse(env.kind, env.run, env.round, env.body, env.tensors)
        assert isinstance(msg, TrainRound)
        plan, cut = msg.plan, msg.cut
        model = build_model(plan.model, input_shape=plan.input_shape)
        dev = Part(model, 0, cut)
        dev.load_state(msg.state)
        base = dev.state()
        stage = Stage(dev, make_optimizer(dev.module.parameters(), lr=plan.lr, momentum=plan.momentum))
        order = BatchOrder(len(self.shard), plan.batch_size, seed=data_seed(plan.seed, "dev2"))
        for step, idx in enumerate(order.epoch_batches(plan.round)):
            x, y = torch.from_numpy(self.shard.x[idx]), torch.from_numpy(self.shard.y[idx])
            act = Activations(run=plan.run, round=plan.round, step=step, micro=0, n_micro=1, batch_size=len(idx),
                              attempt=plan.attempt, x=stage.forward((step, 0), x).numpy(),
                              y=y.numpy().astype(np.int64))
            if step in (0, 3):
                self.send_broken_acts(plan, act)
            self.send(act)
            grad = self.recv("grad", step=step, micro=0)
            assert grad.env is not None
            stage.backward((step, 0), torch.from_numpy(np.array(grad.env.tensors["g"])))
            stage.step()
        d = {k: (v - base[k]).astype(np.float32) for k, v in dev.state().items()}
        report = Report(samples=len(self.shard), steps=step + 1, cut=cut, attempt=plan.attempt)
        upd = DeviceUpdate(run=plan.run, round=plan.round, report=report, delta=d)
        poisoned = {k: np.full_like(v, np.nan) for k, v in d.items()}
        self.send(replace(upd, delta=poisoned))
        self.send(replace(upd, delta={k: np.zeros((*v.shape, 2), np.float32) for k, v in d.items()}))
        self.send(upd, reliable=True)
        wait_for(lambda: self.t.get(0.05) is None and self.t.stats_snapshot().get("acked", 0) >= 1, timeout=60,
                 what="the edge to acknowledge dev2's delta")

    def send_broken_acts(self, plan: Plan, act: Activations) -> None:
        x, y = act.x, act.y
        nan = x.copy()
        nan[0, 0] = np.nan
        self.send(replace(act, x=x[:, : x.shape[1] // 2].copy()))        # bad_shape
        self.send(replace(act, x=nan))                                     # non_finite
        self.send(replace(act, x=x.astype(np.float64)))                    # bad_dtype
        self.send(replace(act, y=np.full_like(y, 99)))                     # bad_labels
        self.send(replace(act, round=plan.round + 1))                      # wrong_round
        self.send(replace(act, step=act.step + 5))                         # out_of_order
        self.send(act, via=self.intruder)                                  # unknown_sender


def test_malformed_and_foreign_messages_are_dropped_without_touching_state(tmp_path: Path, broker: Broker,
                                                                           fleet: str) -> None:
    spec = FleetSpec(devices={"dev1": "edge1", "dev2": "edge1"}, model="mlp", input_shape=(64,), fleet=fleet,
                     cloud={"rounds": 1, "batch_size": 64, "lr": 0.05, "seed": 9, "autostart": False})
    data = digits((64,))
    reasons: set[str] = set()

    def on_message(m: Inbound) -> None:
        if m.kind == "event" and m.data and m.data.get("event") == "dropped" and m.src == "edge1":
            reasons.add(str(m.data.get("reason")))

    with testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start(["cloud", "edge1", "dev1"])  # dev2 is not a process: the test plays it
        shard = tmp_path / "data" / "dev2.npz"
        fake_t = _client(broker, fleet, "dev2", "device", tmp_path / "fake", outbox=Outbox(tmp_path / "fake" / "ob"),
                         status_fields={"state": "idle", "edge": "edge1", "samples": len(load_shard(shard)),
                                        "cut": -1})
        intruder = _client(broker, fleet, "intruder", "device")
        try:
            tb.wait_online(["cloud", "edge1", "dev1", "dev2"])
            assert tb.ctl("cloud", "start")["ok"]
            FakeDevice(fake_t, shard, intruder).run_round()
            tb.wait(lambda m: m.kind == "event" and bool(m.data) and m.data.get("event") == "run_complete", 120,
                    on_message=on_message)
            edge_stats = tb.ctl("edge1", "status")["result"]["transport"]
        finally:
            fake_t.stop()
            intruder.stop()
        for m in tb.inbox:
            on_message(m)
        [metrics] = tb.round_metrics()
    expected_reasons = {"bad_shape", "non_finite", "bad_dtype", "bad_labels", "wrong_round", "out_of_order",
                        "unknown_sender"}
    for r in expected_reasons:
        assert edge_stats.get(f"drop_{r}", 0) >= 1, (r, edge_stats)
    assert expected_reasons <= reasons, reasons
    assert metrics["participants"] == 2 and metrics["missing"] == []
    diff = max_abs_diff(cloud_state(tmp_path)["global"], reference_global(spec, data[0], rounds=1))
    assert diff <= TOL, f"malformed input changed the result by {diff:.3g}"
