"""The split-point planner (docs/algorithms.md, "Split-point planning"): brute force agrees, a faster link never
moves the cut towards the device, cut = end is local training, the memory limit holds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttfl.fl.split_plan import Link, NodeProfile, batch_time, candidates, plan_cut

times = st.lists(st.floats(0.0, 2.0), min_size=2, max_size=8)


@st.composite
def problems(draw: st.DrawFn) -> tuple[NodeProfile, list[float], list[float], float, int]:
    dev = draw(times)
    n = len(dev)
    edge = draw(st.lists(st.floats(0.0, 2.0), min_size=n, max_size=n))
    acts = draw(st.lists(st.floats(1.0, 1e7), min_size=n - 1, max_size=n - 1))
    mem = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n))
    rho = draw(st.floats(0.5, 16.0))
    limit = draw(st.integers(0, 6000))
    return NodeProfile(tuple(dev), tuple(mem), 32), edge, acts, rho, limit


@settings(max_examples=300, deadline=None)
@given(problems(), st.floats(1e3, 1e9), st.floats(0.0, 0.05))
def test_brute_force_over_the_candidates_agrees(p: tuple[NodeProfile, list[float], list[float], float, int],
                                                bandwidth: float, latency: float) -> None:
    device, edge, acts, rho, limit = p
    link = Link(bandwidth, latency)
    got = plan_cut(device, edge, acts, link, rho=rho, memory_limit=limit)
    feasible = [batch_time(c, device, edge, acts, link, rho) for c in candidates(acts)]
    feasible = [c for c in feasible if not limit or c.memory <= limit]
    if not feasible:
        assert got is None
        return
    assert got is not None
    best = min(c.batch_s for c in feasible)
    assert got.batch_s == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert got.cut == min(c.cut for c in feasible if c.batch_s == pytest.approx(best, rel=1e-9, abs=1e-12))
    ref = batch_time(got.cut, device, edge, acts, link, rho)
    assert (got.device_s, got.link_s, got.edge_s, got.memory) == pytest.approx(
        (ref.device_s, ref.link_s, ref.edge_s, ref.memory))


@settings(max_examples=300, deadline=None)
@given(problems(), st.floats(1e3, 1e8), st.floats(1.0, 1000.0), st.floats(0.0, 0.05))
def test_a_faster_link_never_moves_the_cut_towards_the_device(
        p: tuple[NodeProfile, list[float], list[float], float, int], bandwidth: float, factor: float,
        latency: float) -> None:
    device, edge, acts, rho, limit = p
    slow = plan_cut(device, edge, acts, Link(bandwidth, latency), rho=rho, memory_limit=limit)
    fast = plan_cut(device, edge, acts, Link(bandwidth * factor, latency), rho=rho, memory_limit=limit)
    assert (slow is None) == (fast is None)
    if slow is not None and fast is not None:
        assert fast.cut <= slow.cut


def test_when_activations_shrink_every_cut_is_a_candidate_and_brute_force_over_all_cuts_agrees() -> None:
    assert candidates([8192.0, 4096.0, 4096.0, 128.0]) == [1, 2, 3, 4, 5]  # VGG-5's cuts
    assert candidates([512.0, 256.0, 512.0]) == [1, 2, 4]  # the CNN's cut 3 sends more than cut 2
    device = NodeProfile((0.12, 0.16, 0.04, 0.004, 0.0001))
    edge = [0.03, 0.04, 0.01, 0.001, 0.0001]
    acts = [3.2e6, 1.6e6, 1.6e6, 5.1e4]
    for bw in (1e4, 1e6, 1.6e8, 1e10):
        for rho in (1.0, 4.0):
            got = plan_cut(device, edge, acts, Link(bw), rho=rho)
            assert got is not None
            brute = min(range(1, 6), key=lambda c: (batch_time(c, device, edge, acts, Link(bw), rho).batch_s, c))
            assert got.cut == brute


def test_cut_at_the_end_is_local_training_and_wins_on_a_slow_link() -> None:
    device = NodeProfile((0.01, 0.01, 0.01))
    local = batch_time(3, device, [0.001] * 3, [1e5, 1e5], Link(1.0), 1.0)
    assert (local.batch_s, local.link_s, local.edge_s) == (pytest.approx(0.03), 0.0, 0.0)
    assert plan_cut(device, [0.001] * 3, [1e5, 1e5], Link(1e3)) == local  # 200 s per batch on the link
    # A slow device with a fast link offloads, more so while the edge is not shared.
    slow = NodeProfile((0.5, 0.5, 0.5))
    alone = plan_cut(slow, [0.01] * 3, [1e5, 1e5], Link(1e9), rho=1.0)
    assert alone is not None and alone.cut == 1


def test_the_memory_limit_holds_and_nothing_fits_gives_none() -> None:
    device = NodeProfile((0.5, 0.5, 0.5), (100, 200, 300))
    fast_link = Link(1e9)
    assert plan_cut(device, [0.0] * 3, [10.0, 10.0], fast_link).cut == 1  # type: ignore[union-attr]
    slow_link = Link(1e-3)
    assert plan_cut(device, [0.0] * 3, [10.0, 10.0], slow_link).cut == 3  # type: ignore[union-attr]
    capped = plan_cut(device, [0.0] * 3, [20.0, 10.0], slow_link, memory_limit=350)
    assert capped is not None and capped.cut == 2 and capped.memory == 300
    assert plan_cut(device, [0.0] * 3, [20.0, 10.0], slow_link, memory_limit=50) is None


def test_the_edges_devices_share_it() -> None:
    device = NodeProfile((0.2, 0.2, 0.2))
    edge = [0.05, 0.05, 0.05]
    one = plan_cut(device, edge, [1.0, 1.0], Link(1e9))
    many = plan_cut(device, edge, [1.0, 1.0], Link(1e9), rho=8)
    assert one is not None and one.cut == 1
    assert many is not None and many.cut == 3 and many.batch_s == pytest.approx(0.6)
    local = plan_cut(device, edge, [1.0, 1.0], Link(1e9), allowed=[3])
    assert local is not None and local.cut == 3


def test_devices_that_train_locally_leave_the_edge_to_the_others() -> None:
    from mqttfl.ml.models import schema_of
    from mqttfl.protocol.cloud.cutplan import CutPlanner
    from mqttfl.protocol.messages import DeviceProfile, EdgeProfile
    from mqttfl.protocol.plan import Plan, Training
    from mqttfl.protocol.schema import ModelRef

    schema = schema_of(ModelRef("mlp", (64,), 10))
    n = schema.n_blocks
    plan = Plan.of(Training(model="mlp", input_shape=(64,), batch_size=32), run="r", round=1, profile=True)
    planner = CutPlanner()
    fp = schema.fingerprint
    assert planner.on_profile("edge1", EdgeProfile(fingerprint=fp, batch_size=32, block_s=(0.1,) * n,
                                                   block_bytes=(0,) * n), schema) is None
    devices = ["fast1", "fast2", "fast3", "slow"]
    for d in devices:
        t = 0.2 if d == "slow" else 0.01
        msg = DeviceProfile(fingerprint=fp, batch_size=32, block_s=(t,) * n, block_bytes=(0,) * n, edge="edge1",
                            bandwidth=1e12, latency_s=0.0)
        assert planner.on_profile(d, msg, schema) is None
    cuts, report = planner.plan(plan, {"edge1": devices}, schema, {d: n for d in devices}, set(), set(),
                                {d: 64 for d in devices}, {})
    # With all four at the edge, the slow device would wait for everyone's edge blocks: 0.2 + 4 x 0.1 x (n - 1)
    # per mini-batch against 0.2 n locally. The fast ones train locally, so it has the edge to itself.
    assert 0.2 + 4 * 0.1 * (n - 1) > 0.2 * n > 0.2 + 0.1 * (n - 1)
    assert cuts == {"fast1": n, "fast2": n, "fast3": n, "slow": 1}
    assert report["devices"]["slow"]["rho"] == 1.0 and report["devices"]["slow"]["why"] == "planned"
    assert report["predicted_round_s"] == pytest.approx(2 * (0.2 + 0.1 * (n - 1)))


def test_profiles_that_disagree_are_refused() -> None:
    with pytest.raises(ValueError, match="blocks"):
        plan_cut(NodeProfile((1.0, 1.0)), [1.0], [1.0], Link(1.0))
    with pytest.raises(ValueError, match="bandwidth"):
        plan_cut(NodeProfile((1.0, 1.0)), [1.0, 1.0], [1.0], Link(0.0))
