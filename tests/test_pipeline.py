"""1F1B schedules: warm-up depths, validation with a readable grid, timing, and exact pipelined gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mqttfl.ml.models import build_model, model_state
from mqttfl.ml.stage import LocalTrainer, make_optimizer
from mqttfl.protocol.schedule import (
    Action,
    ScheduleError,
    format_grid,
    lockstep,
    one_f_one_b,
    run_pipeline,
    schedules,
    simulate,
    validate,
    warmup,
)


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
def test_generated_schedules_validate_for_all_small_shapes(hop_aware: bool) -> None:
    for s in range(1, 6):
        for m in range(1, 10):
            validate(schedules(s, m, hop_aware=hop_aware), s, m, hop_aware=hop_aware)


def test_stash_never_exceeds_k_s() -> None:
    for s in range(1, 6):
        for m in range(1, 10):
            for stage, sched in enumerate(schedules(s, m)):
                live, peak = 0, 0
                for a in sched:
                    live += 1 if a.op == "F" else -1
                    peak = max(peak, live)
                assert peak == warmup(s, m, stage)


def _broken(edit) -> list[list[Action]]:
    sched = schedules(3, 5)
    edit(sched)
    return sched


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[1].remove(Action(1, "B", 2)), r"missing B for micro-batch\(es\) \[2\]"),
        (lambda s: s[0].insert(3, Action(0, "F", 1)), "F1 duplicated"),
        (lambda s: s[2].insert(0, s[2].pop(1)), "B0 before its forward"),
        (lambda s: s[2].insert(1, s[2].pop(2)), "more than K_s=1"),
        (lambda s: s[1].append(Action(2, "B", 0)), "lists an action of stage 2"),
        (lambda s: s[0].append(Action(0, "F", 5)), "invalid action"),
    ],
)
def test_validate_rejects_broken_schedules_with_the_grid(edit, message: str) -> None:
    with pytest.raises(ScheduleError, match=message) as info:
        validate(_broken(edit), 3, 5)
    assert "step s0   s1   s2" in str(info.value)


def test_validate_rejects_a_deadlock_that_each_stage_alone_would_accept() -> None:
    # Stage 1 starts with micro-batch 1, which stage 0 only forwards after micro-batch 0's backward,
    # which needs stage 1's backward of micro-batch 0: a cycle no per-stage check can see.
    sched = [
        [Action(0, "F", 0), Action(0, "B", 0), Action(0, "F", 1), Action(0, "B", 1)],
        [Action(1, "F", 1), Action(1, "B", 1), Action(1, "F", 0), Action(1, "B", 0)],
    ]
    with pytest.raises(ScheduleError, match="stage 1 cannot run F1: deadlock") as info:
        validate(sched, 2, 2)
    assert "stage 0 stuck before: B0 F1 B1" in str(info.value)
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(sched, 1.0, 1.0, 0.0)


def test_validate_checks_the_stage_count() -> None:
    with pytest.raises(ScheduleError):
        validate(schedules(2, 3), 3, 3)


def test_format_grid_lays_out_the_lockstep_execution() -> None:
    text = format_grid(schedules(2, 2))
    assert text.splitlines() == [
        "step s0   s1   ",
        "0    F0   .    ",
        "1    F1   F0   ",
        "2    .    B0   ",
        "3    B0   F1   ",
        "4    .    B1   ",
        "5    B1   .    ",
    ]
    grid, left = lockstep(schedules(2, 2))
    assert len(grid) == 6 and left == [[], []]


def _idle(timeline) -> list[float]:
    return [sum(max(0.0, b.start - a.end) for a, b in zip(t, t[1:], strict=False)) for t in timeline]


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_hop_aware_warmup_is_faster_when_hops_cost_as_much_as_compute(num_stages: int) -> None:
    for m in (4, 8, 16):
        hop, _ = simulate(schedules(num_stages, m), 1.0, 1.0, 1.0)
        plain, _ = simulate(schedules(num_stages, m, hop_aware=False), 1.0, 1.0, 1.0)
        assert hop <= plain
    assert hop < plain


def test_hop_aware_schedule_has_no_steady_state_bubbles() -> None:
    # Idle time that does not grow with M is only fill and drain; bubbles would grow with every micro-batch.
    idle = {m: _idle(simulate(schedules(3, m), 1.0, 1.0, 1.0)[1]) for m in (8, 16)}
    assert idle[8] == idle[16]
    plain = {m: _idle(simulate(schedules(3, m, hop_aware=False), 1.0, 1.0, 1.0)[1]) for m in (8, 16)}
    assert sum(plain[16]) > sum(plain[8])


def test_simulation_with_free_hops_gives_both_warmups_the_same_makespan() -> None:
    hop, _ = simulate(schedules(3, 8), 1.0, 2.0, 0.0)
    plain, _ = simulate(schedules(3, 8, hop_aware=False), 1.0, 2.0, 0.0)
    assert hop == plain == 3 * 8 + 2 * (1 + 2)  # M slots of F+B at each stage, plus fill and drain


def test_simulation_honours_dependencies_and_per_stage_times() -> None:
    makespan, timeline = simulate(schedules(2, 2), [1.0, 2.0], [3.0, 4.0], 0.5)
    end = {slot.action: slot.end for t in timeline for slot in t}
    start = {slot.action: slot.start for t in timeline for slot in t}
    assert start[Action(1, "F", 0)] == end[Action(0, "F", 0)] + 0.5
    assert start[Action(0, "B", 0)] == end[Action(1, "B", 0)] + 0.5
    assert makespan == max(end.values())
    assert end[Action(1, "F", 0)] - start[Action(1, "F", 0)] == 2.0


def _stages(model, bounds):
    return [model[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize(
    ("name", "shape", "bounds"), [("mlp", (64,), [0, 2, 4, 5]), ("cnn", (1, 8, 8), [0, 1, 3, 4])]
)
@pytest.mark.parametrize("num_micro", [1, 4, 6])
def test_pipelined_training_equals_unpipelined_accumulation(name, shape, bounds, num_micro: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, *shape, generator=g), torch.randint(0, 10, (12,), generator=g)
    model = build_model(name, input_shape=shape, seed=6)
    reference = copy.deepcopy(model)
    stages = _stages(model, bounds)

    loss, correct = run_pipeline(stages, [None] * 3, x, y, num_micro, step=False)
    trainer = LocalTrainer(reference, make_optimizer(reference.parameters(), lr=0.1))
    opt = trainer.optimizer
    trainer.optimizer = None  # accumulate only, to compare the grads before the step
    ref = trainer.train_batch(x, y, micro_batches=num_micro)
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=key)
    assert loss == pytest.approx(ref.loss_sum, rel=1e-6) and correct == ref.correct

    for p in model.parameters():
        p.grad = None
    for q in reference.parameters():
        q.grad = None
    optimizers = [make_optimizer(s.parameters(), lr=0.1) for s in stages]
    trainer.optimizer = opt
    for _ in range(2):
        run_pipeline(stages, optimizers, x, y, num_micro)
        trainer.train_batch(x, y, micro_batches=num_micro)
    a, b = model_state(model), model_state(reference)
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_run_pipeline_needs_one_optimizer_slot_per_stage() -> None:
    model = build_model("mlp", seed=0)
    with pytest.raises(ValueError):
        run_pipeline(
            _stages(model, [0, 2, 5]), [None], torch.randn(4, 64), torch.zeros(4, dtype=torch.long), 2
        )
