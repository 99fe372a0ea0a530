"""The two ends of a split link (mqttfl.protocol.links): order, re-sends, the gradient cache, and a middle
stage built from one of each that stays exactly-once when its links repeat messages."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mqttfl.ml.models import Part, build_model, model_state
from mqttfl.ml.stage import LocalTrainer, Stage, make_optimizer, micro_batches
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.links import GRAD_CACHE, Downstream, Upstream
from mqttfl.protocol.messages import Activations, Gradients


def act(step: int, micro: int, n_micro: int = 2, x: np.ndarray | None = None) -> Activations:
    x = np.zeros((2, 3), np.float32) if x is None else x
    return Activations(run="r", round=0, step=step, micro=micro, n_micro=n_micro, batch_size=4, attempt=0, x=x,
                       y=np.zeros(len(x), np.int64))


def grad(a: Activations, g: np.ndarray | None = None) -> Gradients:
    return Gradients(run="r", round=0, step=a.step, micro=a.micro, loss_sum=1.0, correct=1,
                     g=np.ones_like(a.x) if g is None else g)


def test_downstream_keeps_what_it_sent_until_its_gradient_is_settled_and_resends_it_all() -> None:
    down = Downstream(timeout_s=5.0)
    a0, a1 = act(0, 0), act(0, 1)
    down.sent(a0, now=1.0)
    down.sent(a1, now=2.0)
    assert down.due == 7.0
    assert down.accept(grad(a0)) and not down.accept(grad(a0))  # the answer to a re-send we already have
    assert not down.accept(grad(act(5, 0)))  # nothing sent for that key
    with pytest.raises(ProtocolError):
        down.accept(grad(a1, np.ones((2, 4), np.float32)))
    down.settled(a0.key)
    assert down.resend(now=9.0) == [a1] and down.resends == 1 and down.due == 14.0


def test_upstream_takes_micro_batches_in_order_and_answers_re_sends_from_its_cache() -> None:
    up = Upstream()
    a0, a1 = act(0, 0), act(0, 1)
    with pytest.raises(ProtocolError) as e:
        up.take(a1)
    assert e.value.code == "out_of_order"
    assert up.take(a0) is False and not up.at_boundary
    up.remember(grad(a0))
    assert up.answered(a0) is not None and up.answered(a1) is None
    with pytest.raises(ProtocolError, match="n_micro changed"):
        up.take(act(0, 1, n_micro=3))
    assert up.take(a1) is True and up.at_boundary and up.expected == (1, 0)
    for s in range(GRAD_CACHE + 3):
        up.remember(grad(act(s + 1, 0)))
    assert len(up.cache) == GRAD_CACHE and up.answered(a0) is None  # bounded: the oldest forgotten


def test_a_middle_stage_from_both_link_ends_trains_exactly_once_over_links_that_repeat_messages() -> None:
    """First -> middle -> last over 'links' that deliver every activation and gradient twice: the middle
    stage answers the repeats from its cache and ignores repeated gradients, so the three stages end with the
    weights of local training on the same micro-batches."""
    torch.manual_seed(0)
    model = build_model("mlp", seed=3)
    reference = copy.deepcopy(model)
    stages = [Stage(p, make_optimizer(p.module.parameters(), lr=0.05))
              for p in (Part(model, 0, 1), Part(model, 1, 3), Part(model, 3, len(model)))]
    first, middle, last = stages
    up, down = Upstream(), Downstream(timeout_s=1.0)
    batches = [(torch.randn(8, 64), torch.randint(0, 10, (8,))) for _ in range(3)]
    trained = 0
    for step, (x, y) in enumerate(batches):
        for micro, (xm, ym) in enumerate(micro_batches(x, y, 2)):
            incoming = act(step, micro, 2, first.forward((step, micro), xm).numpy())
            incoming = Activations(**{**incoming.__dict__, "y": ym.numpy()})
            for delivery in (incoming, incoming):  # the upstream link repeats the activation
                cached = up.answered(delivery)
                if cached is not None:
                    answer = cached
                    continue
                flush = up.take(delivery)
                out = middle.forward(delivery.key, torch.from_numpy(delivery.x))
                sent = Activations(**{**delivery.__dict__, "x": out.numpy()})
                down.sent(sent, now=0.0)
                g_last, _ = last.loss(torch.from_numpy(sent.x), torch.from_numpy(sent.y), len(x))
                g = Gradients(run="r", round=0, step=step, micro=micro, loss_sum=0.0, correct=0, g=g_last.numpy())
                assert down.accept(g) and not down.accept(g)  # the downstream link repeats the gradient
                g_in = middle.backward(delivery.key, torch.from_numpy(down.grads[delivery.key].g))
                down.settled(delivery.key)
                trained += 1
                answer = Gradients(run="r", round=0, step=step, micro=micro, loss_sum=0.0, correct=0,
                                   g=g_in.numpy())
                up.remember(answer)
                if flush:
                    middle.step()
                    last.step()
            first.backward((step, micro), torch.from_numpy(answer.g))
        first.step()
    assert trained == 6 and not down.outstanding
    trainer = LocalTrainer(reference, make_optimizer(reference.parameters(), lr=0.05))
    for x, y in batches:
        trainer.train_batch(x, y, micro_batches=2)
    a, b = model_state(model), model_state(reference)
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-5
