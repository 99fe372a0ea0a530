"""The protocol machines under hostile input, driven event by event (docs/design.md, "Trust").

Property tests feed each machine, in the middle of a round, sequences of events a hostile or broken peer can
cause (random, reordered, duplicated, forged, oversized, malformed at the boundary) and check that the machine
never raises and never changes model state from a message it should refuse: the device's and the edge's
stage weights stay bit for bit what they were, no training job is asked for, and the cloud's global model and
its round's accepted reports stay untouched.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.data import load_digits
from mqttfl.ml.models import schema_of
from mqttfl.protocol import stage
from mqttfl.protocol.cloud.machine import CloudMachine
from mqttfl.protocol.edge import EdgeMachine
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.events import (
    Ack,
    Drop,
    Event,
    LinkChanged,
    Received,
    ReconnectWithin,
    Run,
    Send,
    StatusSeen,
    TimerFired,
)
from mqttfl.protocol.messages import (
    Abort,
    Activations,
    Ckpt,
    DeviceUpdate,
    EdgeSession,
    EdgeUpdate,
    Expect,
    Freeze,
    Gradients,
    Message,
    OpenRound,
    Ready,
    Refused,
    Report,
    Restart,
    Resume,
    TrainRound,
    parse,
)
from mqttfl.protocol.status import parse_status
from mqttfl.wire.codec import CodecError, Envelope, decode, encode
from tests.pair.common import N_BLOCKS, SCHEMA
from tests.pair.test_decisions import (
    CUT,
    Driver,
    cloud_machine,
    device_machine,
    device_part,
    global_state,
    open_round,
    plan,
    received,
    see,
    train_round,
)
from tests.pair.test_hostile import fleet3, training

TRAINING_JOBS = (stage.Open, stage.Forward, stage.Backward, stage.Loss, stage.LocalBatch, stage.Step, stage.Close,
                 stage.Snapshot)
SENDERS = ("mallory", "dev9", "edge9", "operator")  # authenticated, but nobody the machines should listen to


def full(scale: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, scale) for k, v in global_state().items()}


# ------------------------------------------------------------------------------------------------ strategies

values = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=20), st.lists(st.integers(-3, 3), max_size=4), st.dictionaries(
                       st.text(max_size=5), st.integers(), max_size=3))


@st.composite
def tensor(draw: Any, like: tuple[int, ...] | None = None) -> np.ndarray:
    """A tensor that fits, or one of the wrong shape or dtype, with NaN or huge values, or oversized."""
    # Mostly well-formed: a forged message that fits is the one a machine must refuse by its meaning.
    kind = draw(st.sampled_from(["fits"] * 5 + ["shape", "dtype", "nan", "huge", "big"]))
    shape = like or (draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    if kind == "shape":
        shape = (*shape[:-1], shape[-1] + draw(st.integers(1, 3)))
    if kind == "big":
        shape = (64, 4096)  # 1 MiB of float32
    arr = np.full(shape, draw(st.floats(-3, 3)), dtype=np.float64 if kind == "dtype" else np.float32)
    if kind == "nan":
        arr.flat[0] = np.nan
    if kind == "huge":
        arr[...] = 1e30
    return arr


@st.composite
def message(draw: Any, run: str = "r") -> Message:
    """Any message of the protocol, with plausible or forged round keys and tensors."""
    rnd, attempt = draw(st.sampled_from([0, 0, 0, 1, 3])), draw(st.sampled_from([0, 0, 0, 1, 3]))
    key = {"run": draw(st.sampled_from([run, run, "other", ""])), "round": rnd}
    p = replace(plan(attempt=attempt), run=key["run"] or "r", round=rnd)
    act_x = draw(tensor((draw(st.sampled_from([8, 8, 1, 5])), *SCHEMA.activation(CUT))))
    step, micro = draw(st.sampled_from([0, 0, 0, 1, 5])), draw(st.sampled_from([0, 0, 1]))
    choice = draw(st.sampled_from([0, 1, 1, 1, 2, 3, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12, 13]))
    if choice == 0:
        return TrainRound(**key, plan=p, cut=draw(st.integers(1, 9)), edge="edge1",
                          state={k: draw(tensor(v.shape)) for k, v in device_part().items()})
    if choice == 1:
        return Gradients(**key, step=step, micro=micro,
                         loss_sum=draw(st.floats(0, 10)), correct=draw(st.integers(0, 8)), g=act_x,
                         saved=draw(st.integers(0, 9)))
    if choice == 2:
        return Resume(**key, attempt=attempt, step=draw(st.integers(0, 9)),
                      session=draw(st.sampled_from(list(EdgeSession))), token=draw(st.text("abc", max_size=4)))
    if choice == 3:
        return Activations(**key, step=step, micro=0, n_micro=1, batch_size=act_x.shape[0],
                           attempt=attempt, x=act_x, y=np.zeros(act_x.shape[0], np.int64))
    if choice == 4:
        return DeviceUpdate(**key, report=Report(samples=draw(st.sampled_from([8, 40, 10**12])), attempt=attempt),
                            delta={k: draw(tensor(v.shape)) for k, v in device_part().items()})
    if choice == 5:
        return EdgeUpdate(**key, attempt=attempt, missing=(),
                          reports={draw(st.sampled_from(["dev1", "dev2", "dev9"])): Report(
                              samples=draw(st.integers(1, 10**12)), attempt=attempt)},
                          delta={k: draw(tensor(v.shape)) for k, v in global_state().items()})
    if choice == 6:
        return OpenRound(**key, plan=p, cuts={"dev1": CUT, "dev9": 1}, state=global_state())
    if choice == 7:
        return Restart(**key, migration="m", edge=draw(st.sampled_from(["edge1", "edge9"])), source="edge1")
    mid = draw(st.sampled_from(["m1", "m2"]))
    return [Expect(migration=mid, source="mallory"), Freeze(**key, migration=mid, to="edge9", path="direct", step=0),
            Ready(migration=mid, step=3), Refused(migration=mid, reason="x"), Abort(migration=mid),
            Refused(migration=mid)][choice - 8]


@st.composite
def wire_event(draw: Any, dst: str, senders: tuple[str, ...] = SENDERS, run: str = "r",
               exclude: tuple[type, ...] = ()) -> Received | None:
    """A message from ``senders``, perhaps damaged in its body, through the codec and the typed parser as the
    runtime does it; None when the boundary refuses it (the runtime drops it there)."""
    msg = draw(message(run).filter(lambda m: not isinstance(m, exclude)))
    body, tensors = msg.to_wire()
    if draw(st.booleans()):
        body = dict(body)
        body[draw(st.sampled_from([*body, "junk"]))] = draw(values)
    src = draw(st.sampled_from(senders))
    try:
        env = decode(encode(Envelope(kind=msg.kind, src=src, dst=dst, body=body, tensors=tensors, run=msg.run,
                                     round=msg.round)))
        typed = parse(env.kind, env.run, env.round, env.body, env.tensors)
    except (CodecError, ProtocolError):
        return None  # cannot be sent, or refused at the boundary
    return Received(src, typed, env.id, reliable=draw(st.booleans()))


@st.composite
def hostile_sequence(draw: Any, dst: str, extra: Any = None) -> list[Event]:
    """Hostile messages and the events around them, then reordered and partly duplicated (redeliveries)."""
    base = [draw(wire_event(dst)) for _ in range(draw(st.integers(1, 12)))]
    others: list[Event] = [TimerFired(draw(st.sampled_from(["act", "migrate", ("round", ("r", 0, 0)), "x"]))),
                           LinkChanged(draw(st.booleans()))]
    if extra is not None:
        others += [draw(extra) for _ in range(draw(st.integers(0, 6)))]
    events = [e for e in base + others if e is not None]
    events = draw(st.permutations(events))
    return events + [draw(st.sampled_from(events)) for _ in range(draw(st.integers(0, 3)))]


# ------------------------------------------------------------------------------------------------ device


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=hostile_sequence("dev1", wire_event("dev1", ("edge1",), run="other",
                                                  exclude=(TrainRound, Resume, Ckpt))))
def test_a_device_in_a_round_never_raises_and_never_trains_on_what_it_must_refuse(events: list[Event]) -> None:
    train, _ = load_digits((64,))
    backend = TorchBackend("dev1", data=train.subset(np.arange(40)))
    dev = Driver(device_machine(), backend)
    dev(received("edge1", "dev1", train_round(plan(resume_every=1))))
    r = dev.machine.round
    weights = {k: v.copy() for k, v in backend.sessions[r.session].stage.part.state().items()}
    key, session, step = r.plan.key, r.session, r.step
    for ev in events:
        fx = dev(ev)
        assert not any(isinstance(e, Run) and isinstance(e.job, TRAINING_JOBS) for e in fx), ev
    r = dev.machine.round
    assert r is not None and (r.plan.key, r.session, r.step) == (key, session, step)
    now = backend.sessions[session].stage.part.state()
    assert all(np.array_equal(now[k], v) for k, v in weights.items())


# ------------------------------------------------------------------------------------------------ edge


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=hostile_sequence("edge1", wire_event("edge1", ("dev1", "dev2"), run="other", exclude=(Ckpt,))))
def test_an_edge_in_a_round_never_raises_and_never_trains_or_reports_on_what_it_must_refuse(
        events: list[Event]) -> None:
    backend = TorchBackend("edge1")
    edge = Driver(EdgeMachine("edge1", schemas=schema_of, cloud="cloud"), backend)
    edge(received("cloud", "edge1", open_round(plan(), {"dev1": CUT, "dev2": N_BLOCKS})))
    _, s = edge.machine.session_of("dev1")
    assert s is not None and s.sid is not None
    weights = {k: v.copy() for k, v in backend.sessions[s.sid].stage.part.state().items()}
    for ev in events:
        fx = edge(ev)
        assert not any(isinstance(e, Run) and isinstance(e.job, (stage.Loss, stage.Step)) for e in fx), ev
        assert not any(isinstance(e, Send) and isinstance(e.msg, EdgeUpdate) for e in fx), ev
    r, same = edge.machine.session_of("dev1")
    assert same is s and s.up.expected == (0, 0) and s.steps == 0 and s.delta is None
    assert set(r.sessions) == {"dev1", "dev2"} and r.sessions["dev2"].delta is None
    now = backend.sessions[s.sid].stage.part.state()
    assert all(np.array_equal(now[k], v) for k, v in weights.items())


# ------------------------------------------------------------------------------------------------ cloud


@st.composite
def status_event(draw: Any) -> StatusSeen | None:
    """Any JSON object as a retained status, through the typed parser."""
    data = draw(st.dictionaries(st.sampled_from(["role", "state", "edge", "cut", "samples", "labels", "boot"]),
                                st.one_of(values, st.sampled_from(["edge", "device", "idle", "edge1", "mallory"])),
                                max_size=7))
    try:
        return StatusSeen(parse_status(draw(st.sampled_from([*SENDERS, "dev1"])), data), draw(st.booleans()))
    except ProtocolError:
        return None


@st.composite
def forged_edge_update(draw: Any) -> Received:
    """A delta from a configured edge that breaks one rule: another attempt, a device outside the round, more
    samples than declared, or a norm that would swamp the model."""
    bad = draw(st.sampled_from(["attempt", "device", "samples", "norm"]))
    reports = {"dev9" if bad == "device" else "dev1": Report(samples=41 if bad == "samples" else 10)}
    update = EdgeUpdate(run="r", round=0, attempt=1 if bad == "attempt" else 0, reports=reports, missing=(),
                        delta=full(1e4 if bad == "norm" else 0.001))
    return received(draw(st.sampled_from(["edge1", "edge2"])), "cloud", update, reliable=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=hostile_sequence("cloud", st.one_of(status_event(), forged_edge_update())))
def test_the_cloud_never_raises_never_accepts_a_refused_update_and_never_announces_to_a_self_declared_edge(
        events: list[Event]) -> None:
    cloud = Driver(cloud_machine())
    see(cloud, "edge1", "edge")
    see(cloud, "edge2", "edge")
    see(cloud, "dev1", "device", edge="edge1")
    c: CloudMachine = cloud.machine
    r = c.policy.current
    assert r is not None and r.expected == {"dev1"}
    model = {k: v.copy() for k, v in c.global_state.items()}
    for ev in events:
        if ev is None:
            continue
        fx = cloud(ev)
        assert all(f.dst in ("edge1", "edge2") for f in fx if isinstance(f, Send) and isinstance(f.msg, OpenRound))
        assert not any(isinstance(f, ReconnectWithin) for f in fx)
    assert c.policy.current is r and r.reports == [], "nothing was accepted"
    assert all(np.array_equal(c.global_state[k], v) for k, v in model.items()) and c.history == []


def test_the_cloud_refuses_each_forged_update_with_its_reason_and_acknowledges_a_configured_edge() -> None:
    cloud = Driver(cloud_machine())
    see(cloud, "edge1", "edge")
    see(cloud, "dev1", "device", edge="edge1")
    cases = {"not_an_edge": ("mallory", {"dev1": Report(samples=10)}, 0.001),
             "not_in_round": ("edge1", {"dev9": Report(samples=10)}, 0.001),
             "implausible_samples": ("edge1", {"dev1": Report(samples=41)}, 0.001),
             "implausible_update": ("edge1", {"dev1": Report(samples=40)}, 1e4)}
    for reason, (src, reports, scale) in cases.items():
        ev = received(src, "cloud", EdgeUpdate(run="r", round=0, attempt=0, reports=reports, missing=(),
                                               delta=full(scale)), reliable=True)
        fx = cloud(ev)
        assert [d.reason for d in fx if isinstance(d, Drop)] == [reason]
        assert [a.received for a in fx if isinstance(a, Ack)] == ([] if src == "mallory" else [ev])
    assert cloud.machine.policy.current.reports == []
# ------------------------------------------------------------------------------------------------ decisions


def test_an_edge_refuses_a_device_update_whose_norm_would_swamp_the_model() -> None:
    edge = Driver(EdgeMachine("edge1", schemas=schema_of, cloud="cloud"), TorchBackend("edge1"))
    p = plan()
    local = SCHEMA.n_blocks  # a device training the whole model locally: its delta is all the edge sees
    edge(received("cloud", "edge1", open_round(p, {"dev1": local, "dev2": local})))
    huge = received("dev1", "edge1", DeviceUpdate(run="r", round=0, report=Report(samples=10), delta=full(1e3)),
                    reliable=True)
    fx = edge(huge)
    assert [d.reason for d in fx if isinstance(d, Drop)] == ["implausible_update"]
    assert [a.received for a in fx if isinstance(a, Ack)] == [huge], "refused for good: the device stops"
    fine = DeviceUpdate(run="r", round=0, report=Report(samples=10), delta=full(1e-3))
    fx = edge(received("dev2", "edge1", fine, reliable=True))
    (up,) = [f.msg for f in fx if isinstance(f, Send) and isinstance(f.msg, EdgeUpdate)]
    assert set(up.reports) == {"dev2"} and up.missing == ("dev1",)
    assert all(np.allclose(up.delta[k], 1e-3) for k in up.delta), "the refused delta is in no average"




def test_nodes_in_a_round_reconnect_within_a_twentieth_of_its_deadline() -> None:
    """Finding 6: after a 17 s link cut the reconnect backoff (up to 30 s) put a device's return past its edge's
    deadline. A node taking part in a round now retries at least every deadline_s / 20."""
    dev = Driver(device_machine())
    fx = dev(received("edge1", "dev1", train_round(plan(deadline_s=60.0))))
    assert [e.seconds for e in fx if isinstance(e, ReconnectWithin)] == [3.0]
    _, fleet = fleet3({"deadline_s": 40.0})
    fleet.run_until(lambda: training(fleet, "dev1"), max_time=60)
    assert fleet.nodes["dev1"].reconnect_cap == 2.0 and fleet.nodes["edge1"].reconnect_cap == 2.0
    fleet.run_to_end(max_time=600)
    assert fleet.nodes["dev1"].reconnect_cap is None and fleet.nodes["edge1"].reconnect_cap is None




def test_a_stale_or_foreign_resume_never_rewinds_a_device() -> None:
    train, _ = load_digits((64,))
    dev = Driver(device_machine(), TorchBackend("dev1", data=train.subset(np.arange(40))))
    p = plan(resume_every=1)
    dev(received("edge1", "dev1", train_round(p)))
    before = dev.machine.round.session
    for src, msg in (("mallory", Resume(run="r", round=0, attempt=0, step=0, session=EdgeSession.RESTORED,
                                        token="t1")),
                     ("edge1", Resume(run="r", round=0, attempt=5, step=0, session=EdgeSession.RESTORED,
                                      token="t2")),
                     ("edge1", Resume(run="r", round=0, attempt=0, step=7, session=EdgeSession.CLOSED,
                                      token="t3"))):
        fx = dev(received(src, "dev1", msg))
        if src == "edge1" and msg.session == EdgeSession.CLOSED:
            assert dev.machine.round is None, "its own edge may say the round is over"
            break
        assert dev.machine.round.session == before
        assert not any(isinstance(e, Run) and isinstance(e.job, (stage.Open, stage.Close)) for e in fx)
