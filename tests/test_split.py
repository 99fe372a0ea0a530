"""Split step = local step: stages driven in process reproduce unsplit training (2 and 3 stages)."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mqttfl.ml.models import MODELS, Part, build_model, model_state
from mqttfl.ml.sgd import SGD
from mqttfl.ml.stage import LocalTrainer, Stage, evaluate, make_optimizer, micro_batches
from tests.helpers import chunks, schema

BATCH = {"vgg5": 12, "cnn": 16, "mlp": 32}


def _batches(name: str, n_batches: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[name].input_shape
    b = BATCH[name]
    return [
        (torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g))
        for _ in range(n_batches)
    ]


def _stage(model, start: int, stop: int, lr: float = 0.05) -> Stage:
    part = Part(model, start, stop)
    return Stage(part, make_optimizer(part.module.parameters(), lr=lr))


def _train_split(model, cut: int, batches, m: int, lr: float = 0.05) -> list[float]:
    device, edge = _stage(model, 0, cut, lr), _stage(model, cut, len(model), lr)
    losses = []
    for x, y in batches:
        loss = 0.0
        # All forwards first, then the gradients: the device holds M graphs at once as in a pipeline.
        sent = [(i, device.forward(i, xm), ym) for i, (xm, ym) in enumerate(micro_batches(x, y, m))]
        for i, smashed, ym in sent:
            grad, result = edge.loss(smashed, ym, batch_size=len(x))
            assert device.backward(i, grad) is None  # the first stage sends no gradient on
            loss += result.loss_sum
        device.step()
        edge.step()
        losses.append(loss)
    return losses


def _train_three_stages(model, cuts: tuple[int, int], batches, m: int, lr: float = 0.05) -> None:
    first, middle, last = (_stage(model, 0, cuts[0], lr), _stage(model, cuts[0], cuts[1], lr),
                           _stage(model, cuts[1], len(model), lr))
    for x, y in batches:
        for i, (xm, ym) in enumerate(micro_batches(x, y, m)):
            a = middle.forward(i, first.forward(i, xm))
            g_mid, _ = last.loss(a, ym, batch_size=len(x))
            first.backward(i, middle.backward(i, g_mid))
        for s in (first, middle, last):
            s.step()


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
    split_losses = _train_split(split, schema(name).default_cut, batches, m)
    local_losses = _train_local(local, batches, m)
    assert _max_diff(split, local) <= 1e-5
    assert split_losses == pytest.approx(local_losses, rel=1e-5)
    assert _max_diff(split, build_model(name, seed=1)) > 1e-3  # it did train


def test_split_training_at_every_cut_of_the_mlp_equals_local_training() -> None:
    batches = _batches("mlp", n_batches=2)
    for cut in range(1, 5):
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
def test_three_stages_with_a_middle_stage_equal_local_training(name: str) -> None:
    batches = _batches(name, n_batches=2)
    piped = build_model(name, seed=5)
    local = copy.deepcopy(piped)
    _train_three_stages(piped, (1, 3), batches, m=2)
    _train_local(local, batches, m=2)
    assert _max_diff(piped, local) <= 1e-5


@pytest.mark.parametrize("name", ["vgg5", "mlp"])
def test_gradient_at_the_cut_is_autograds_gradient_of_the_monolithic_loss(name: str) -> None:
    model = build_model(name, seed=4)
    reference = copy.deepcopy(model)
    cut = schema(name).default_cut
    x, y = _batches(name, 1)[0]
    xm, ym = micro_batches(x, y, 2)[0]

    act = reference[:cut](xm)
    loss = F.cross_entropy(reference[cut:](act), ym, reduction="sum") / len(x)
    (expected,) = torch.autograd.grad(loss, act)

    device, edge = _stage(model, 0, cut), _stage(model, cut, len(model))
    grad, result = edge.loss(device.forward("m0", xm), ym, batch_size=len(x))
    assert grad.shape == act.shape
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert result.loss_sum == pytest.approx(float(loss.detach()) * len(x), rel=1e-5)


def test_smashed_activations_are_a_detached_contiguous_float32_copy() -> None:
    device = _stage(build_model("vgg5", seed=0), 0, 2)
    smashed = device.forward(0, torch.randn(4, 3, 32, 32))
    assert smashed.shape == (4, 64, 8, 8)
    assert smashed.dtype == torch.float32 and smashed.is_contiguous() and not smashed.requires_grad
    assert device.in_flight == 1


def test_a_stage_refuses_misuse_that_would_train_on_stale_graphs() -> None:
    device = _stage(build_model("mlp", seed=0), 0, 2)
    device.forward("a", torch.randn(4, 64))
    with pytest.raises(ValueError, match="already in flight"):
        device.forward("a", torch.randn(4, 64))
    with pytest.raises(KeyError):
        device.backward("b", torch.zeros(4, 64))
    with pytest.raises(ValueError, match="shape"):
        device.backward("a", torch.zeros(4, 63))
    with pytest.raises(RuntimeError, match="in flight"):
        device.step()
    device.backward("a", torch.zeros(4, 64))
    device.step()
    assert device.in_flight == 0 and device.peak_stash == 1


def test_optimizer_state_round_trips_through_a_snapshot() -> None:
    model = build_model("mlp", seed=0)
    stage = _stage(model, 1, len(model))
    x, y = torch.randn(8, 128), torch.randint(0, 10, (8,))
    stage.loss(x, y, 8)
    stage.step()
    saved = stage.optimizer_state()
    assert saved and all("|momentum_buffer" in k for k in saved)
    other = _stage(copy.deepcopy(model), 1, len(model))
    other.load_optimizer_state(saved)
    assert other.optimizer_state().keys() == saved.keys()
    assert all(np.array_equal(other.optimizer_state()[k], v) for k, v in saved.items())


def test_train_batch_reports_summed_loss_correct_count_and_samples() -> None:
    model = build_model("mlp", seed=0)
    x, y = _batches("mlp", 1)[0]
    expected_loss = evaluate(copy.deepcopy(model), chunks(x, y))["loss"]
    logits = model(x)
    expected_correct = int((logits.argmax(1) == y).sum())
    result = LocalTrainer(model, make_optimizer(model.parameters())).train_batch(x, y, micro_batches=3)
    assert result.n == len(x)
    assert result.correct == expected_correct
    assert result.loss_sum / result.n == pytest.approx(expected_loss, rel=1e-5)


def test_micro_batches_follow_tensor_split_and_keep_labels_aligned() -> None:
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    micro = micro_batches(x, y, 3)
    assert [len(c[1]) for c in micro] == [4, 3, 3]
    assert all(torch.equal(cx.squeeze(1).long(), cy) for cx, cy in micro)
    with pytest.raises(ValueError):
        micro_batches(x, y, 11)
    with pytest.raises(ValueError):
        micro_batches(x, y[:9], 2)


def test_make_optimizer_uses_fedflys_defaults() -> None:
    opt = make_optimizer(build_model("mlp", seed=0).parameters())
    assert isinstance(opt, SGD)
    assert make_optimizer([]) is None
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]) == (0.01, 0.9, 0.0)


@pytest.mark.parametrize("settings", [{"momentum": 0.9}, {"momentum": 0.0}, {"momentum": 0.9, "weight_decay": 1e-3},
                                      {"momentum": 0.9, "nesterov": True}, {"momentum": 0.5, "dampening": 0.1}])
def test_own_sgd_is_bit_identical_to_torchs(settings: dict[str, Any]) -> None:
    # The default optimizer avoids torch.optim (whose first construction imports torch._dynamo); it must not
    # change a single bit of training, momentum state included.
    models = [build_model("vgg5", seed=3) for _ in range(2)]
    ours = SGD(models[0].parameters(), lr=0.05, **settings)
    theirs = torch.optim.SGD(models[1].parameters(), lr=0.05, foreach=False, **settings)
    x, y = _batches("vgg5", 1)[0]
    for step in range(4):
        for model, opt in zip(models, (ours, theirs), strict=True):
            model.train()
            if step == 2:  # a parameter without a gradient is skipped, momentum and all
                model[0][0].weight.requires_grad_(False)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (k, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    for pa, pb in zip(models[0].parameters(), models[1].parameters(), strict=True):
        sa, sb = ours.state.get(pa, {}), theirs.state.get(pb, {})
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_device_never_imports_torchs_compiler_or_symbolic_shapes() -> None:
    # What a device does in a round (the schema check, a split first stage's forward, backward and step, local
    # training) must not pull in torch._dynamo (optimizer construction) or sympy (meta tensors, Tensor.backward's
    # argument check): together over 150 MB and two seconds on a device (docs/design.md, "Measured").
    code = ("import sys, torch\n"
            "from mqttfl.ml.models import Part, build_model, schema_of\n"
            "from mqttfl.ml.stage import LocalTrainer, Stage, make_optimizer\n"
            "from mqttfl.protocol.schema import ModelRef\n"
            "schema_of(ModelRef('vgg5', (3, 32, 32), 10))\n"
            "m = build_model('vgg5', seed=0)\n"
            "part = Part(m, 0, 2)\n"
            "st = Stage(part, make_optimizer(part.module.parameters()))\n"
            "out = st.forward((0, 0), torch.randn(4, 3, 32, 32))\n"
            "st.backward((0, 0), torch.ones_like(out))\n"
            "st.step()\n"
            "m = build_model('cnn', input_shape=(1, 8, 8), seed=0)\n"
            "LocalTrainer(m, make_optimizer(m.parameters())).train_batch(torch.randn(4, 1, 8, 8), torch.arange(4))\n"
            "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_evaluate_uses_eval_mode_and_restores_training_mode() -> None:
    model = build_model("vgg5", seed=0)
    x, y = _batches("vgg5", 1)[0]
    model.train()
    m = evaluate(model, chunks(x, y, batch_size=5))
    acc, loss = m["accuracy"], m["loss"]
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
