"""Protocol decisions of the device, edge and cloud machines, driven event by event without a broker.

Each machine gets events exactly as its runtime would hand them over (messages through the wire codec and the
typed parser, job results fed back before the next event) and its effects are inspected. These are the
orderings that are hard to force through real processes: late deltas of an earlier attempt, a device added
to a round that a migration opened, malformed reports, an abandoned move, a stale 'missing' report, a timer
firing exactly on time, a cloud restarted before its first commit.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any

import numpy as np
import pytest

from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.data import load_digits
from mqttfl.ml.models import build_model, model_state, schema_of
from mqttfl.protocol import stage
from mqttfl.protocol.checkpoint import EdgeCheckpoint
from mqttfl.protocol.cloud.machine import CloudMachine
from mqttfl.protocol.cloud.roles import Roles
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.protocol.device import ACT_TIMER, DeviceMachine
from mqttfl.protocol.edge import EdgeMachine
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import (
    Ack,
    Command,
    Drop,
    Effect,
    Event,
    JobDone,
    Persist,
    Received,
    Reply,
    Run,
    RunLog,
    Send,
    SetTimer,
    StatusSeen,
    TimerFired,
)
from mqttfl.protocol.messages import (
    Abort,
    Activations,
    DeviceUpdate,
    EdgeUpdate,
    Expect,
    Message,
    MovePath,
    OpenRound,
    Ready,
    Report,
    Restart,
    TrainRound,
    Transfer,
    parse,
)
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.status import Presence
from mqttfl.runtime.outbox import Outbox
from mqttfl.wire.codec import Envelope, decode, encode
from tests.pair.common import MODEL, SCHEMA, SHAPE

CUT = 2
ROLES = Roles(edges=("edge1", "edge2"))
_ids = itertools.count(1)


class Driver:
    """Feeds one machine the way ``Node.feed`` does: job results go back before the next event; every effect
    is kept. Jobs run on a real ``TorchBackend`` (``backend=None``: they are left unanswered)."""

    def __init__(self, machine: Any, backend: TorchBackend | None = None) -> None:
        self.machine = machine
        self.backend = backend
        self.effects: list[Effect] = []

    def __call__(self, event: Event, now: float = 0.0) -> list[Effect]:
        out: list[Effect] = []
        queue = collections.deque([event])
        while queue:
            for fx in self.machine.handle(queue.popleft(), now):
                out.append(fx)
                if isinstance(fx, Run) and isinstance(fx.job, stage.Measure):
                    queue.append(JobDone(fx.job, stage.Meters()))  # the runtime's own meters
                elif isinstance(fx, Run) and self.backend is not None:
                    queue.append(JobDone(fx.job, self.backend.run(fx.job)))
        self.effects += out
        return out


def received(src: str, dst: str, msg: Message, *, reliable: bool = False, sent_at: float = 0.0,
             now: float = 0.0) -> Received:
    """The message as the receiver's runtime hands it over: through the codec and the typed parser."""
    body, tensors = msg.to_wire()
    if reliable:
        body["reliable"] = True
    env = decode(encode(Envelope(kind=msg.kind, src=src, dst=dst, body=body, tensors=tensors, run=msg.run,
                                 round=msg.round, seq=next(_ids), ts=sent_at)))
    return Received(src, parse(env.kind, env.run, env.round, env.body, env.tensors), env.id, sent_at=sent_at,
                    received_at=now, reliable=reliable)


def sends(effects: list[Effect], kind: type, dst: str | None = None) -> list[Any]:
    return [fx.msg for fx in effects if isinstance(fx, Send) and isinstance(fx.msg, kind)
            and (dst is None or fx.dst == dst)]


def plan(attempt: int = 0, **kw: Any) -> Plan:
    return Plan(run="r", round=0, attempt=attempt, model=MODEL, input_shape=SHAPE, batch_size=8, **kw)


def global_state() -> dict[str, np.ndarray]:
    return model_state(build_model(MODEL, input_shape=SHAPE, seed=0))


def device_part() -> dict[str, np.ndarray]:
    return {k: v for k, v in global_state().items() if k in SCHEMA.keys(0, CUT)}


def open_round(p: Plan, devices: dict[str, int]) -> OpenRound:
    return OpenRound(run=p.run, round=p.round, plan=p, cuts=devices, state=global_state())


def device_update(attempt: int) -> DeviceUpdate:
    return DeviceUpdate(run="r", round=0, report=Report(samples=10, attempt=attempt),
                        delta={k: np.zeros_like(v) for k, v in device_part().items()})


def acts_for(samples: int, attempt: int = 0) -> list[Activations]:
    """A split device's activations for one epoch of ``samples`` (batches of 8): what the edge must have seen
    before it believes a report of that many samples."""
    rng = np.random.default_rng(samples)
    out = []
    for step, start in enumerate(range(0, samples, 8)):
        n = min(8, samples - start)
        out.append(Activations(run="r", round=0, step=step, micro=0, n_micro=1, batch_size=n, attempt=attempt,
                               x=rng.standard_normal((n, *SCHEMA.activation(CUT))).astype(np.float32),
                               y=np.arange(n, dtype=np.int64) % 10))
    return out


def transfer(device: str, mid: str, *, path: MovePath = MovePath.RELAY, source: str = "edge1") -> Transfer:
    edge_part = {k: v for k, v in global_state().items() if k in SCHEMA.keys(CUT)}
    ck = EdgeCheckpoint(device=device, migration=mid, plan=plan(), cut=CUT, weights=edge_part, optimizer={},
                        base=edge_part, expected=(3, 0), steps=3, loss_sum=1.0, seen=24, n_micro=1,
                        rng=np.zeros(8, dtype=np.uint8))
    body, tensors = ck.to_message()
    return Transfer(run="r", round=0, migration=mid, device=device, path=path, source=source,
                    checkpoint_bytes=ck.nbytes(), checkpoint=body, checkpoint_tensors=tensors)


@pytest.fixture
def edge2() -> Driver:
    return Driver(EdgeMachine("edge2", schemas=schema_of, cloud="cloud"), TorchBackend("edge2"))


def replies_to(effects: list[Effect], device: str) -> list[str]:
    return [type(m).__name__ for m in sends(effects, Message, device) if m.kind == "ckpt"]


# ------------------------------------------------------------------------------------------------ edge


def test_a_delta_of_an_earlier_attempt_is_acknowledged_but_never_applied(edge2: Driver) -> None:
    edge2(received("cloud", "edge2", open_round(plan(attempt=1), {"dev1": CUT})))
    _, s = edge2.machine.session_of("dev1")
    stale = received("dev1", "edge2", device_update(attempt=0), reliable=True)
    fx = edge2(stale)
    assert s is not None and s.delta is None, "attempt 0's delta must not stand in for attempt 1's"
    assert [a.received for a in fx if isinstance(a, Ack)] == [stale], "acknowledged: the device stops re-sending"
    assert [d.reason for d in fx if isinstance(d, Drop)] == ["wrong_round"]
    for act in acts_for(10, attempt=1):
        edge2(received("dev1", "edge2", act))
    fx = edge2(received("dev1", "edge2", device_update(attempt=1), reliable=True))
    assert s.delta is not None
    (up,) = sends(fx, EdgeUpdate, "cloud")
    assert up.attempt == 1 and set(up.reports) == {"dev1"} and up.reports["dev1"].attempt == 1


def test_a_device_report_with_a_non_numeric_field_is_refused_at_the_boundary() -> None:
    body, tensors = device_update(attempt=0).to_wire()
    body["report"]["t_local"] = "x"
    with pytest.raises(ProtocolError):
        parse("delta", "r", 0, body, tensors)  # the runtime drops it: no machine ever sees it
    with pytest.raises(ProtocolError):
        Report.from_body({"samples": float("nan")})
    with pytest.raises(ProtocolError):
        Report.from_body({"t_local": 1.0})  # no sample count: no weight in FedAvg
    assert Report.from_body({"samples": 5, "t_local": 1, "evil": "x"}) == Report(samples=5, t_local=1.0)


def test_a_device_added_to_a_round_that_a_migration_opened_gets_the_full_device_part(edge2: Driver) -> None:
    fx = edge2(received("dev1", "edge2", transfer("dev1", "m1")))  # edge2 was not in the round: base weights only
    assert replies_to(fx, "dev1") == ["Ready"]
    fx = edge2(received("cloud", "edge2", open_round(plan(), {"dev2": CUT})))  # the cloud restarts dev2 here
    (train,) = sends(fx, TrainRound, "dev2")
    assert set(train.state) == set(device_part())
    assert all(np.array_equal(train.state[k], v) for k, v in device_part().items())


def test_an_abandoned_move_is_undone_at_the_destination_and_a_late_checkpoint_cannot_replace_a_restart(
        edge2: Driver) -> None:
    edge2(received("dev1", "edge2", transfer("dev1", "m1")))
    edge2(received("dev1", "edge2", Abort(migration="m1")))
    assert edge2.machine.session_of("dev1") == (None, None), "the session installed for the failed move is gone"
    edge2(received("cloud", "edge2", open_round(plan(), {"dev1": CUT})))  # restarted here from the global model
    fx = edge2(received("dev1", "edge2", transfer("dev1", "m2")))  # a checkpoint arriving late
    assert replies_to(fx, "dev1") == ["Refused"]
    assert edge2.machine.session_of("dev1")[1].up.expected == (0, 0), "the fresh session was kept"


def test_a_direct_checkpoint_is_accepted_only_from_the_source_the_device_named(edge2: Driver) -> None:
    direct = transfer("dev1", "m1", path=MovePath.DIRECT)
    fx = edge2(received("dev9", "edge2", direct))  # a node posing as an edge
    assert edge2.machine.session_of("dev1") == (None, None) and replies_to(fx, "dev1") == []
    assert [d.reason for d in fx if isinstance(d, Drop)] == ["unauthorised"]
    edge2(received("dev1", "edge2", Expect(migration="m1", source="edge1")))
    fx = edge2(received("dev9", "edge2", direct))
    assert edge2.machine.session_of("dev1") == (None, None), "still not the source the device named"
    fx = edge2(received("edge1", "edge2", direct))
    assert replies_to(fx, "dev1") == ["Ready"]
    (ready,) = sends(fx, Ready, "dev1")
    assert ready.step == 3 and edge2.machine.session_of("dev1")[1].up.expected == (3, 0)


def test_a_resent_activation_is_answered_from_the_cache_and_trains_nothing(edge2: Driver) -> None:
    p = plan()
    edge2(received("cloud", "edge2", open_round(p, {"dev1": CUT})))
    x = np.random.default_rng(0).standard_normal((8, *SCHEMA.activation(CUT))).astype(np.float32)
    act = Activations(run="r", round=0, step=0, micro=0, n_micro=1, batch_size=8, attempt=0, x=x,
                      y=np.arange(8, dtype=np.int64))
    first = edge2(received("dev1", "edge2", act))
    again = edge2(received("dev1", "edge2", act))  # a fresh id: the device re-sent it
    assert [type(fx.job).__name__ for fx in first if isinstance(fx, Run)] == ["Loss", "Step"]
    assert not any(isinstance(fx, Run) for fx in again), "nothing trained twice"
    (g1,), (g2,) = sends(first, Message, "dev1"), sends(again, Message, "dev1")
    assert g1 is g2 and edge2.machine.session_of("dev1")[1].steps == 1


# ------------------------------------------------------------------------------------------------ cloud


def cloud_machine(**section: Any) -> CloudMachine:
    settings = CloudSettings.from_section({"model": MODEL, "input_shape": list(SHAPE), "run": "r",
                                           "deadline_s": 60.0, **section})
    return CloudMachine("cloud", settings=settings, initial_state=global_state(), schemas=schema_of,
                        run_ids=lambda: "r-new", roles=ROLES)


def see(cloud: Driver, node: str, role: str, edge: str | None = None) -> None:
    samples = 40 if role == "device" else None
    cloud(StatusSeen(Presence(node=node, role=role, state="idle", boot=1, edge=edge, samples=samples)))


def test_only_the_edge_a_device_is_assigned_to_can_report_it_missing() -> None:
    _, test = load_digits(SHAPE)
    cloud = Driver(cloud_machine(), TorchBackend("cloud", test=test))
    see(cloud, "edge1", "edge")
    see(cloud, "edge2", "edge")
    see(cloud, "dev1", "device", edge="edge1")  # the round starts: one device online with its edge
    r = cloud.machine.policy.current
    assert r is not None and r.expected == {"dev1"}
    fx = cloud(received("dev1", "cloud", Restart(run="r", round=0, migration="m1", edge="edge2", source="edge1")))
    (opened,) = sends(fx, OpenRound, "edge2")
    assert opened.cuts == {"dev1": CUT}, "the device's round restarts at edge2"
    missing = EdgeUpdate(run="r", round=0, attempt=0, reports={}, missing=("dev1",), delta={})
    fx = cloud(received("edge1", "cloud", missing, reliable=True))
    assert any(isinstance(a, Ack) for a in fx)
    assert cloud.machine.policy.current is r and "dev1" not in r.accounted, \
        "edge1's timed-out session must not close the round"
    done = EdgeUpdate(run="r", round=0, attempt=0, reports={"dev1": Report(samples=10)}, missing=(),
                      delta={k: np.full_like(v, 0.01) for k, v in global_state().items()})
    cloud(received("edge2", "cloud", done, reliable=True))
    (entry,) = [fx.entry for fx in cloud.effects if isinstance(fx, RunLog)]  # the whole record: the run log's
    assert entry["participants"] == 1 and entry["missing"] == [] and entry["devices"]["dev1"]["edge"] == "edge2"
    assert cloud.machine.history[0]["missing_count"] == 0


def test_the_cloud_persists_each_attempt_before_announcing_it() -> None:
    """A restart during a round must open a new attempt: the announced one is on disk first, even in the first
    round of a run (before anything was committed)."""
    cloud = Driver(cloud_machine())
    see(cloud, "edge1", "edge")
    fx = cloud(StatusSeen(Presence(node="dev1", role="device", state="idle", boot=1, edge="edge1", samples=40)))
    kinds = [type(e).__name__ for e in fx if isinstance(e, (Persist, Send))]
    assert kinds[:2] == ["Persist", "Send"], kinds
    (saved,) = [e.state for e in fx if isinstance(e, Persist)]
    restarted = CloudMachine("cloud", settings=cloud.machine.config, initial_state=global_state(),
                             schemas=schema_of, run_ids=lambda: "r-new", restored=saved, roles=ROLES)
    again = Driver(restarted)
    again(StatusSeen(Presence(node="edge1", role="edge", state="idle", boot=1)))
    fx = again(StatusSeen(Presence(node="dev1", role="device", state="idle", boot=1, edge="edge1", samples=40)))
    (opened,) = sends(fx, OpenRound, "edge1")
    assert (opened.plan.run, opened.plan.round, opened.plan.attempt) == ("r", 0, 1)


# ------------------------------------------------------------------------------------------------ device


def device_machine(**kw: Any) -> DeviceMachine:
    return DeviceMachine("dev1", edge="edge1", n_samples=40, schemas=schema_of, **kw)


def train_round(p: Plan) -> TrainRound:
    return TrainRound(run=p.run, round=p.round, plan=p, cut=CUT, edge="edge1", state=device_part())


def test_an_idle_move_overtaken_by_a_round_at_the_old_edge_keeps_its_path_and_step() -> None:
    dev = Driver(device_machine())
    fx = dev(Command("operator", "c1", "move", {"edge": "edge2", "path": "relay", "at_step": 3}))
    (reply,) = [r for r in fx if isinstance(r, Reply)]
    assert reply.ok and reply.result["when"] == "now (idle)"
    fx = dev(received("edge1", "dev1", train_round(plan())))
    assert any(isinstance(e, Run) and isinstance(e.job, stage.Measure) for e in fx), "the round is trained there"
    m = dev.machine
    assert m.edge == "edge1" and m.pending_move == ("edge2", MovePath.RELAY) and m.move_at_step == 3


def test_an_activation_timer_firing_exactly_on_time_resends_instead_of_rearming_forever() -> None:
    """The timer is due at last_send + timeout; judged as ``now - last_send < timeout`` float rounding can
    call it early (1.019 - 0.019000000000000003 < 1.0), re-arm it for the same instant, and spin."""
    train, _ = load_digits(SHAPE)
    dev = Driver(device_machine(act_timeout_s=1.0), TorchBackend("dev1", data=train.subset(np.arange(40))))
    sent_at = 0.019000000000000003
    assert (sent_at + 1.0) - sent_at < 1.0
    # The round opens and the first micro-batch goes out at sent_at; then the device waits for its gradient.
    fx = dev(received("edge1", "dev1", train_round(plan())), now=sent_at)
    (timer,) = [e for e in fx if isinstance(e, SetTimer)]
    assert timer.key == ACT_TIMER and timer.at == sent_at + 1.0 and sends(fx, Activations, "edge1")
    fx = dev.machine.handle(TimerFired(ACT_TIMER), timer.at)
    assert sends(fx, Activations, "edge1"), "due: the outstanding activations are re-sent"
    assert all(e.at > timer.at for e in fx if isinstance(e, SetTimer)), "never re-armed for the same instant"


# ------------------------------------------------------------------------------------------------ runtime


def test_outbox_reads_a_payload_only_when_due_and_gives_up_after_max_age(tmp_path) -> None:
    box = Outbox(tmp_path / "ob", max_age_s=100.0)
    box.put("aa", "t", b"x" * 10, now=0.0)
    assert box.due(now=1.0, resend_after=5.0) == []
    (e,) = box.due(now=6.0, resend_after=5.0)
    assert e.payload == b"x" * 10
    box.mark_sent("aa", 6.0)
    assert Outbox(tmp_path / "ob").keys() == ["aa"], "pending entries survive a restart"
    assert box.due(now=200.0, resend_after=5.0) == [] and box.expired == 1 and len(box) == 0
