"""Training on one side of a cut (or in the middle of a pipeline), with torch and no I/O.

Theory of operation (SplitFed; docs/design.md, "Stages"). A :class:`Stage` owns blocks ``[start, stop)`` of a
model and its optimizer. The first stage runs its blocks on a micro-batch and sends the *smashed*
activations downstream; a middle stage does the same from the activations it received; the last stage
finishes the forward pass, computes the loss and back-propagates to its input. Gradients flow back the same
way, each stage back-propagating the gradient it received through the graph it stashed at the forward.

Split step = local step. A mini-batch of ``B`` samples may be cut into ``M`` micro-batches
(:func:`micro_batches`, the one definition everybody uses). Each micro-batch's loss is the sum of its samples'
losses divided by ``B`` (:func:`loss_sum`), so the gradients accumulated over the ``M`` micro-batches are
exactly the gradient of the mini-batch mean loss, and every stage steps its optimizer once per mini-batch (the
flush). The optimizers (SGD, Adam, AdamW) and gradient clipping act on each parameter tensor on its own, so a
stage's update does not depend on where the cut is. The weights after split training therefore equal those of
:class:`LocalTrainer` on the same batches with the same micro-batch cut, up to float rounding.

BatchNorm: in train mode BN normalises with the statistics of the tensor it sees, i.e. of one micro-batch.
With ``M > 1`` a BN model (vgg5) is therefore *not* equivalent to ``M = 1``; its reference is gradient
accumulation over the same micro-batches (``LocalTrainer.train_batch(..., micro_batches=M)``).

Misuse by the caller (stepping with micro-batches in flight, re-forwarding a key still in flight) raises at
once: either would silently train on stale graphs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mqttfl.ml.models import Part
from mqttfl.ml.sgd import SGD
from mqttfl.protocol.plan import TASKS, Training

Optimizer = torch.optim.Optimizer | SGD


@dataclass(frozen=True)
class StepResult:
    """Outcome of a forward/backward over some samples."""

    loss_sum: float
    correct: int
    n: int


def micro_batches(x: torch.Tensor, y: torch.Tensor, m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a mini-batch into ``m`` micro-batches with ``torch.tensor_split`` semantics.

    The first ``B % m`` chunks get one sample more than the rest. Every stage and the local reference cut
    here, so a micro-batch index names the same samples everywhere.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if not 1 <= m <= len(x):
        raise ValueError(f"cannot cut a batch of {len(x)} into {m} micro-batches")
    return list(zip(torch.tensor_split(x, m), torch.tensor_split(y, m), strict=True))


def make_optimizer(params: Iterable[torch.nn.Parameter], training: Training | None = None,
                   **changes: Any) -> Optimizer | None:
    """The stage optimizer a plan names (``optimizer``, ``lr``, ``momentum``, ...; ``changes`` override the
    plan's values); None for a stage without parameters. Every stage and the unsplit reference build theirs here.

    SGD is this project's own (``mqttfl.ml.sgd``, bit-identical to torch's): constructing a ``torch.optim``
    optimizer imports torch's compiler machinery (over a second and ~80 MB on a small board), which a device
    training with the default optimizer never needs. Adam and AdamW are torch's, with ``foreach=False``: the
    multi-tensor path pulls the same machinery in on first use for no gain at these sizes."""
    t = training or Training()
    if changes:
        t = replace(t, **changes)
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                                foreach=False)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                 weight_decay=t.weight_decay, foreach=False)
    if t.optimizer != "sgd":
        raise ValueError(f"unknown optimizer {t.optimizer!r}")
    return SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov)


def loss_sum(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum over the samples of each sample's loss. Per sample, mse and bce_with_logits average over the
    outputs, so ``loss_sum / n`` is torch's default ``reduction="mean"`` for every loss."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="sum")
    width = out[0].numel() if len(out) else 1
    target = y.to(out.dtype).reshape(out.shape)
    if loss == "mse":
        return F.mse_loss(out, target, reduction="sum") / width
    if loss == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(out, target, reduction="sum") / width
    raise ValueError(f"unknown loss {loss!r}")


def correct(loss: str, out: torch.Tensor, y: torch.Tensor) -> int:
    """Samples predicted right: the arg-max class, or every label of a multi-label sample; 0 for regression."""
    task = TASKS.get(loss)
    if task == "classification":
        return int((out.detach().argmax(dim=1) == y).sum())
    if task == "multilabel":
        return int(((out.detach() > 0) == (y.reshape(out.shape) > 0.5)).flatten(1).all(dim=1).sum())
    return 0


def _clip(optimizer: Optimizer, t: Training) -> None:
    # Per tensor (torch.nn.utils.clip_grad_norm_'s formula on each tensor alone): a tensor lives on one side of
    # a cut, so a split model clips exactly as the unsplit one, which a global norm over all tensors could not.
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if t.clip_value > 0:
                p.grad.clamp_(-t.clip_value, t.clip_value)
            if t.clip_norm > 0:
                norm = float(p.grad.norm())
                if norm > t.clip_norm:
                    p.grad.mul_(t.clip_norm / (norm + 1e-6))


class Proximal:
    """FedProx's proximal term (Li et al., arXiv 1812.06127): the local objective gains (mu / 2)|w - w0|^2, w0
    the round's starting weights, so every step adds mu (w - w0) to the gradient. Each side of a split adds it
    for its own parameters: the term is a sum over parameters, so the two halves make the whole model's."""

    def __init__(self, params: Iterable[tuple[str, torch.nn.Parameter]], mu: float,
                 anchor: Mapping[str, np.ndarray] | None = None) -> None:
        self.mu = mu
        self.pairs = [(p, torch.from_numpy(np.array(anchor[n], dtype=np.float32)) if anchor is not None
                       else p.detach().clone()) for n, p in params if p.requires_grad]

    def add_to_grads(self) -> None:
        with torch.no_grad():
            for p, w0 in self.pairs:
                term = self.mu * (p.detach() - w0)
                if p.grad is None:
                    p.grad = term
                else:
                    p.grad.add_(term)


def _step(optimizer: Optimizer | None, t: Training) -> None:
    if optimizer is not None:
        if t.clip_value > 0 or t.clip_norm > 0:
            _clip(optimizer, t)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class Stage:
    """Blocks ``[start, stop)`` with their optimizer; forward and backward by micro-batch key."""

    def __init__(self, part: Part, optimizer: Optimizer | None, training: Training | None = None,
                 proximal: Proximal | None = None) -> None:
        self.part = part
        self.optimizer = optimizer
        self.training = training or Training()  # the loss and the clipping this stage trains with
        self.proximal = proximal
        self._stash: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (input, output)
        self.peak_stash = 0

    @property
    def in_flight(self) -> int:
        return len(self._stash)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        # A stage past the first needs the gradient at its input to send upstream.
        return x.detach().requires_grad_(True) if self.part.start > 0 else x

    def forward(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """Train-mode forward; returns the activations to send on (a detached float32 copy)."""
        if key in self._stash:
            raise ValueError(f"micro-batch {key!r} is already in flight")
        self.part.module.train()
        inp = self._input(x)
        out = self.part.module(inp)
        self._stash[key] = (inp, out)
        self.peak_stash = max(self.peak_stash, len(self._stash))
        # A copy, not a view: the encoder may hold it while autograd still owns the original.
        return out.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)

    def backward(self, key: Hashable, grad: torch.Tensor) -> torch.Tensor | None:
        """Back-propagate the downstream gradient for ``key``; returns the gradient at this stage's input."""
        if key not in self._stash:
            raise KeyError(f"no micro-batch {key!r} in flight (in flight: {list(self._stash)})")
        inp, out = self._stash[key]
        if tuple(grad.shape) != tuple(out.shape):
            raise ValueError(f"gradient for {key!r} has shape {tuple(grad.shape)}, expected {tuple(out.shape)}")
        del self._stash[key]
        if out.requires_grad:
            # sum(out * grad) has exactly ``grad`` as its gradient at ``out`` (times 1.0): the same backward as
            # ``out.backward(grad)``, whose argument check imports torch's symbolic-shape machinery (sympy, 37 MB
            # and a noticeable first-round delay on a device) the first time it runs.
            (out * grad.to(dtype=out.dtype)).sum().backward()
        return inp.grad if inp.requires_grad else None

    def loss(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, StepResult]:
        """Last stage: forward, loss (summed / ``batch_size``), backward. Returns (gradient at input, stats)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(x) != len(y):
            raise ValueError(f"{len(x)} activations but {len(y)} labels")
        self.part.module.train()
        a = x.detach().requires_grad_(True)
        out = self.part.module(a)
        total = loss_sum(self.training.loss, out, y)
        (total / batch_size).backward()
        assert a.grad is not None  # the loss always depends on its input
        return a.grad, StepResult(float(total.detach()), correct(self.training.loss, out, y), len(y))

    def step(self) -> None:
        """One optimizer step for the mini-batch (flush), then clear the grads."""
        if self._stash:
            raise RuntimeError(f"step() with {len(self._stash)} micro-batch(es) still in flight")
        if self.proximal is not None:  # FedProx's term joins the gradient before clipping and the step
            self.proximal.add_to_grads()
        _step(self.optimizer, self.training)

    # ------------------------------------------------------------------ state
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Per-parameter optimizer state as ``"<param key>|<state name>"`` -> float32 array."""
        out: dict[str, np.ndarray] = {}
        if self.optimizer is None:
            return out
        for name, p in self.part.named_parameters():
            for state_name, value in self.optimizer.state.get(p, {}).items():
                # Tensors (momentum, Adam's moments) and Adam's scalar step, which a migration must carry too.
                if isinstance(value, torch.Tensor):
                    out[f"{name}|{state_name}"] = value.detach().to(torch.float32).numpy().copy()
        return out

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        if self.optimizer is None or not state:
            return
        params = dict(self.part.named_parameters())
        for key, arr in state.items():
            name, _, state_name = key.partition("|")
            p = params.get(name)
            if p is None:
                raise KeyError(f"optimizer state for unknown parameter {name!r}")
            self.optimizer.state[p][state_name] = torch.from_numpy(np.array(arr, dtype=np.float32))


class LocalTrainer:
    """Unsplit training with the same micro-batch cut: classic FL (cut = end) and the reference for tests."""

    def __init__(self, model: nn.Module, optimizer: Optimizer | None,
                 training: Training | None = None, proximal: Proximal | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.training = training or Training()
        self.proximal = proximal

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1) -> StepResult:
        self.model.train()
        batch = len(x)
        loss_total, right = 0.0, 0
        for xm, ym in _cut(x, y, micro_batches):
            out = self.model(xm)
            total = loss_sum(self.training.loss, out, ym)
            (total / batch).backward()
            loss_total += float(total.detach())
            right += correct(self.training.loss, out, ym)
        if self.proximal is not None:
            self.proximal.add_to_grads()
        _step(self.optimizer, self.training)
        return StepResult(loss_total, right, batch)


_cut = micro_batches  # LocalTrainer.train_batch's parameter shadows the function name


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             loss: str = "cross_entropy") -> dict[str, float]:
    """The task's metrics over ``batches`` in eval mode (the model's mode is restored afterwards):
    classification accuracy and loss; regression loss, mse and mae; multi-label loss, accuracy (per label)
    and exact_match (every label of a sample right). ``loss`` is the mean of the training loss."""
    task = TASKS.get(loss)
    if task is None:
        raise ValueError(f"unknown loss {loss!r}")
    was_training = model.training
    model.eval()
    n, loss_total, right, abs_err, sq_err, label_right, labels = 0, 0.0, 0, 0.0, 0.0, 0, 0
    try:
        with torch.no_grad():
            for xb, yb in batches:
                out = model(xb)
                n += len(xb)
                loss_total += float(loss_sum(loss, out, yb))
                right += correct(loss, out, yb)
                if task == "regression":
                    err = out - yb.to(out.dtype).reshape(out.shape)
                    width = out[0].numel()
                    abs_err += float(err.abs().sum()) / width
                    sq_err += float((err * err).sum()) / width
                elif task == "multilabel":
                    label_right += int(((out > 0) == (yb.reshape(out.shape) > 0.5)).sum())
                    labels += out.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("nothing to evaluate")
    metrics = {"loss": loss_total / n}
    if task == "classification":
        metrics["accuracy"] = right / n
    elif task == "regression":
        metrics.update(mse=sq_err / n, mae=abs_err / n)
    else:
        metrics.update(accuracy=label_right / labels, exact_match=right / n)
    return metrics
