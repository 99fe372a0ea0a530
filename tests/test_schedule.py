"""1F1B schedules: warm-up depths, alternation, every micro-batch forwarded and back-propagated once,
and the stash bound K_s (Eco-FL; docs/design.md, "Stages")."""

from __future__ import annotations

import pytest

from mqttfl.protocol.schedule import one_f_one_b, warmup


def test_warmup_is_twice_the_depth_minus_one_with_hops_and_the_depth_without() -> None:
    assert [warmup(2, 8, s) for s in range(2)] == [3, 1]
    assert [warmup(2, 2, s) for s in range(2)] == [2, 1]
    assert [warmup(4, 9, s) for s in range(4)] == [7, 5, 3, 1]
    assert [warmup(4, 4, s) for s in range(4)] == [4, 4, 3, 1]
    assert [warmup(4, 9, s, hop_aware=False) for s in range(4)] == [4, 3, 2, 1]
    with pytest.raises(ValueError):
        warmup(2, 4, 2)


def test_stage_runs_k_forwards_then_alternates_then_drains() -> None:
    ops = [str(a) for a in one_f_one_b(2, 5, 0)]
    assert ops == ["F0", "F1", "F2", "B0", "F3", "B1", "F4", "B2", "B3", "B4"]
    assert [str(a) for a in one_f_one_b(2, 3, 1)] == ["F0", "B0", "F1", "B1", "F2", "B2"]
    assert all(a.stage == 1 for a in one_f_one_b(2, 3, 1))


@pytest.mark.parametrize("hop_aware", [True, False])
def test_every_micro_batch_is_forwarded_then_back_propagated_once_within_the_stash_bound(hop_aware: bool) -> None:
    for s in range(1, 6):
        for m in range(1, 10):
            for stage in range(s):
                sched = one_f_one_b(s, m, stage, hop_aware=hop_aware)
                assert sorted((a.op, a.micro) for a in sched) == sorted(
                    [("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                live, peak, forwarded = 0, 0, set()
                for a in sched:
                    if a.op == "F":
                        forwarded.add(a.micro)
                    else:
                        assert a.micro in forwarded, f"B{a.micro} before its forward"
                    live += 1 if a.op == "F" else -1
                    peak = max(peak, live)
                assert peak == warmup(s, m, stage, hop_aware)


def test_gpipe_forwards_everything_first_and_stashes_the_whole_mini_batch() -> None:
    from mqttfl.protocol.schedule import actions, stash_bound

    assert [str(a) for a in actions(3, 3, 1, "gpipe")] == ["F0", "F1", "F2", "B0", "B1", "B2"]
    assert actions(3, 5, 0) == one_f_one_b(3, 5, 0)
    assert [stash_bound(3, 8, s) for s in range(3)] == [5, 3, 1]
    assert [stash_bound(3, 8, s, "gpipe") for s in range(3)] == [8, 8, 8]
    with pytest.raises(ValueError):
        actions(2, 2, 0, "zigzag")
