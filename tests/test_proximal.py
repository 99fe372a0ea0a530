"""FedProx's proximal term in local training: it adds mu (w - w0) to every gradient, on each side of a split for
its own parameters, so split training with the term equals unsplit training with it."""

from __future__ import annotations

import copy

import numpy as np
import torch

from mqttfl.ml.models import Part, build_model, model_state
from mqttfl.ml.stage import LocalTrainer, Proximal, Stage, make_optimizer, micro_batches


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_one_step_adds_mu_times_the_distance_to_the_anchor() -> None:
    model = build_model("mlp", input_shape=(64,), seed=1)
    anchor = {k: v + 0.5 for k, v in model_state(model).items()}  # the round's start, away from the weights
    plain = copy.deepcopy(model)
    (x, y), = _batches(1)
    mu, lr = 0.3, 0.1
    LocalTrainer(plain, make_optimizer(plain.parameters(), lr=lr, momentum=0.0)).train_batch(x, y)
    w0 = model_state(model)
    prox = Proximal(model.named_parameters(), mu, anchor)
    LocalTrainer(model, make_optimizer(model.parameters(), lr=lr, momentum=0.0), proximal=prox).train_batch(x, y)
    got, without = model_state(model), model_state(plain)
    for k in got:
        # w1 = w0 - lr (g + mu (w0 - anchor)) = (w0 - lr g) - lr mu (w0 - anchor)
        np.testing.assert_allclose(got[k], without[k] - lr * mu * (w0[k] - anchor[k]), atol=1e-6)


def test_split_training_with_the_term_equals_unsplit_training_with_it() -> None:
    mu = 0.5
    whole = build_model("mlp", input_shape=(64,), seed=2)
    split = copy.deepcopy(whole)
    trainer = LocalTrainer(whole, make_optimizer(whole.parameters(), lr=0.05),
                           proximal=Proximal(whole.named_parameters(), mu))
    cut = 2
    parts = [Part(split, 0, cut), Part(split, cut, len(split))]
    device, edge = (Stage(p, make_optimizer(p.module.parameters(), lr=0.05),
                          proximal=Proximal(p.named_parameters(), mu)) for p in parts)
    for x, y in _batches(5):
        trainer.train_batch(x, y, micro_batches=2)
        for i, (xm, ym) in enumerate(micro_batches(x, y, 2)):
            g, _ = edge.loss(device.forward(i, xm), ym, batch_size=len(x))
            device.backward(i, g)
        device.step()
        edge.step()
    a, b = model_state(whole), model_state(split)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    plain = build_model("mlp", input_shape=(64,), seed=2)
    t = LocalTrainer(plain, make_optimizer(plain.parameters(), lr=0.05))
    for x, y in _batches(5):
        t.train_batch(x, y, micro_batches=2)
    assert max(float(np.abs(model_state(plain)[k] - a[k]).max()) for k in a) > 1e-4  # the term did something
