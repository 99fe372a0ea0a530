"""Split step = local step: device and edge stages driven in process reproduce unsplit training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mqttfl.ml.models import build_model, model_info, model_state, split_model
from mqttfl.ml.stage import (
    DeviceStage,
    EdgeStage,
    LocalTrainer,
    evaluate,
    make_optimizer,
    micro_batches,
)

BATCH = {"vgg5": 12, "cnn": 16, "mlp": 32}


def _batches(name: str, n_batches: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = model_info(name).input_shape
    b = BATCH[name]
    return [
        (torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g))
        for _ in range(n_batches)
    ]


def _optimizer(part, lr: float):
    params = list(part.module.parameters())
    return make_optimizer(params, lr=lr) if params else None  # an empty side (cut 0 or end) has no optimizer


def _train_split(model, cut: int, batches, m: int, lr: float = 0.05) -> list[float]:
    device_part, edge_part = split_model(model, cut)
    device = DeviceStage(device_part, _optimizer(device_part, lr))
    edge = EdgeStage(edge_part, _optimizer(edge_part, lr))
    losses = []
    for x, y in batches:
        loss = 0.0
        # All forwards first, then the gradients: the device holds M graphs at once as in a pipeline.
        sent = [(i, device.forward(i, xm), ym) for i, (xm, ym) in enumerate(micro_batches(x, y, m))]
        for i, smashed, ym in sent:
            result = edge.forward_backward(smashed, ym, batch_size=len(x))
            device.backward(i, result.grad)
            loss += result.loss_sum
        device.step()
        edge.step()
        losses.append(loss)
    return losses


def _train_local(model, batches, m: int, lr: float = 0.05) -> list[float]:
    trainer = LocalTrainer(model, make_optimizer(model.parameters(), lr=lr))
    return [trainer.train_batch(x, y, micro_batches=m).loss_sum for x, y in batches]


def _max_diff(a, b) -> float:
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    return max(float(np.max(np.abs(sa[k] - sb[k]))) for k in sa)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("name", ["vgg5", "cnn", "mlp"])
def test_split_training_ends_with_the_weights_of_local_training(name: str, m: int) -> None:
    torch.set_num_threads(1)
    batches = _batches(name, n_batches=3)
    split = build_model(name, seed=1)
    local = copy.deepcopy(split)
    split_losses = _train_split(split, model_info(name).default_cut, batches, m)
    local_losses = _train_local(local, batches, m)
    assert _max_diff(split, local) <= 1e-5
    assert split_losses == pytest.approx(local_losses, rel=1e-5)
    assert _max_diff(split, build_model(name, seed=1)) > 1e-3  # it did train


def test_split_training_at_every_cut_of_the_mlp_equals_local_training() -> None:
    batches = _batches("mlp", n_batches=2)
    for cut in range(6):
        split = build_model("mlp", seed=3)
        local = copy.deepcopy(split)
        _train_split(split, cut, batches, m=2)
        _train_local(local, batches, m=2)
        assert _max_diff(split, local) <= 1e-5, cut


def test_micro_batching_a_model_without_bn_does_not_change_the_result() -> None:
    batches = _batches("mlp", n_batches=3)
    one = build_model("mlp", seed=2)
    four = copy.deepcopy(one)
    _train_split(one, 2, batches, m=1)
    _train_split(four, 2, batches, m=4)
    assert _max_diff(one, four) <= 1e-5


@pytest.mark.parametrize("name", ["vgg5", "mlp"])
def test_gradient_at_the_cut_is_autograds_gradient_of_the_monolithic_loss(name: str) -> None:
    model = build_model(name, seed=4)
    reference = copy.deepcopy(model)
    cut = model_info(name).default_cut
    x, y = _batches(name, 1)[0]
    xm, ym = micro_batches(x, y, 2)[0]

    act = reference[:cut](xm)
    loss = F.cross_entropy(reference[cut:](act), ym, reduction="sum") / len(x)
    (expected,) = torch.autograd.grad(loss, act)

    device_part, edge_part = split_model(model, cut)
    device = DeviceStage(device_part, make_optimizer(device_part.module.parameters()))
    edge = EdgeStage(edge_part, make_optimizer(edge_part.module.parameters()))
    result = edge.forward_backward(device.forward("m0", xm), ym, batch_size=len(x))
    assert result.grad.shape == act.shape
    torch.testing.assert_close(result.grad, expected, rtol=1e-5, atol=1e-7)
    assert result.loss_sum == pytest.approx(float(loss.detach()) * len(x), rel=1e-5)


def test_smashed_activations_are_a_detached_contiguous_float32_copy() -> None:
    device_part, _ = split_model(build_model("vgg5", seed=0), 2)
    device = DeviceStage(device_part, make_optimizer(device_part.module.parameters()))
    smashed = device.forward(0, torch.randn(4, 3, 32, 32))
    assert smashed.shape == (4, 64, 8, 8)
    assert smashed.dtype == torch.float32 and smashed.is_contiguous() and not smashed.requires_grad
    assert device.in_flight == 1


def test_device_stage_refuses_misuse_that_would_train_on_stale_graphs() -> None:
    device_part, _ = split_model(build_model("mlp", seed=0), 2)
    device = DeviceStage(device_part, make_optimizer(device_part.module.parameters()))
    device.forward("a", torch.randn(4, 64))
    with pytest.raises(ValueError, match="already in flight"):
        device.forward("a", torch.randn(4, 64))
    with pytest.raises(KeyError):
        device.backward("b", torch.zeros(4, 64))
    with pytest.raises(ValueError, match="shape"):
        device.backward("a", torch.zeros(4, 63))
    with pytest.raises(RuntimeError, match="in flight"):
        device.step()
    device.discard()
    assert device.in_flight == 0
    assert all(p.grad is None for p in device_part.module.parameters())
    device.step()


def test_device_at_cut_zero_forwards_raw_inputs_and_needs_no_optimizer() -> None:
    model = build_model("mlp", seed=0)
    device_part, edge_part = split_model(model, 0)
    device = DeviceStage(device_part, None)
    edge = EdgeStage(edge_part, make_optimizer(edge_part.module.parameters()))
    x, y = _batches("mlp", 1)[0]
    assert torch.equal(device.forward(0, x), x)
    device.backward(0, edge.forward_backward(x, y, len(x)).grad)
    device.step()
    edge.step()


def test_train_batch_reports_summed_loss_correct_count_and_samples() -> None:
    model = build_model("mlp", seed=0)
    x, y = _batches("mlp", 1)[0]
    _, expected_loss = evaluate(copy.deepcopy(model), x, y)
    logits = model(x)
    expected_correct = int((logits.argmax(1) == y).sum())
    result = LocalTrainer(model, make_optimizer(model.parameters())).train_batch(x, y, micro_batches=3)
    assert result.n == len(x)
    assert result.correct == expected_correct
    assert result.mean_loss == pytest.approx(expected_loss, rel=1e-5)


def test_micro_batches_follow_tensor_split_and_keep_labels_aligned() -> None:
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    chunks = micro_batches(x, y, 3)
    assert [len(c[1]) for c in chunks] == [4, 3, 3]
    assert all(torch.equal(cx.squeeze(1).long(), cy) for cx, cy in chunks)
    with pytest.raises(ValueError):
        micro_batches(x, y, 11)
    with pytest.raises(ValueError):
        micro_batches(x, y[:9], 2)


def test_make_optimizer_uses_fedflys_defaults() -> None:
    opt = make_optimizer(build_model("mlp", seed=0).parameters())
    assert isinstance(opt, torch.optim.SGD)
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]) == (0.01, 0.9, 0.0)


def test_evaluate_uses_eval_mode_and_restores_training_mode() -> None:
    model = build_model("vgg5", seed=0)
    x, y = _batches("vgg5", 1)[0]
    model.train()
    acc, loss = evaluate(model, x, y, batch_size=5)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
