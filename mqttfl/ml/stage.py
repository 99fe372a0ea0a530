"""Split-learning steps on one side of a cut, with no I/O: the agents move the tensors (ALGORITHMS §1).

Theory of operation (SplitFed): the device runs its blocks on a micro-batch and sends the *smashed*
activations with the labels; the edge finishes the forward pass, computes the loss, back-propagates to the
cut and returns the gradient there; the device back-propagates that gradient through its stashed graph.

Split step = local step (DESIGN §5). A device mini-batch of ``B`` samples may be cut into ``M`` micro-batches
(:func:`micro_batches`, the one definition everybody uses). Each micro-batch's loss is
``cross_entropy(logits, y, reduction="sum") / B``, so the gradients accumulated over the ``M`` micro-batches
are exactly the gradient of the mini-batch mean loss, and both sides step their optimizer once per
mini-batch. The weights after split training therefore equal those of :class:`LocalTrainer` on the same
batches with the same micro-batch cut, up to float rounding.

BatchNorm: in train mode BN normalises with the statistics of the tensor it sees, i.e. of one micro-batch.
With ``M > 1`` a BN model (vgg5) is therefore *not* equivalent to ``M = 1``; its reference is gradient
accumulation over the same micro-batches (``LocalTrainer.train_batch(..., micro_batches=M)``). Models
without BN (cnn, mlp) give the same result for every ``M`` up to float rounding.

Misuse of a stage by its own agent (stepping with micro-batches in flight, re-forwarding a key that is
still in flight) raises immediately: either would silently train on stale graphs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mqttfl.ml.models import Part


@dataclass(frozen=True)
class StepResult:
    """Outcome of a forward/backward over some samples. ``grad`` is the gradient at the cut (edge only)."""

    loss_sum: float
    correct: int
    n: int
    grad: torch.Tensor | None = None

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.n if self.n else float("nan")


def micro_batches(x: torch.Tensor, y: torch.Tensor, m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a mini-batch into ``m`` micro-batches with ``torch.tensor_split`` semantics.

    The first ``B % m`` chunks get one sample more than the rest. Device, edge, pipeline and the local
    reference all cut here, so a micro-batch index names the same samples everywhere.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if not 1 <= m <= len(x):
        raise ValueError(f"cannot cut a batch of {len(x)} into {m} micro-batches")
    return list(zip(torch.tensor_split(x, m), torch.tensor_split(y, m), strict=True))


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.SGD:
    """SGD with FedFly's defaults (lr 0.01, momentum 0.9)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _step(optimizer: torch.optim.Optimizer | None) -> None:
    # A side with no parameters (cut 0 on the device) has no optimizer; torch refuses to build an empty one.
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _scaled_loss(logits: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    loss_sum = F.cross_entropy(logits, y, reduction="sum")
    return loss_sum, loss_sum / batch_size


def _correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.detach().argmax(dim=1) == y).sum())


class DeviceStage:
    """The device side: forward micro-batches, keep their graphs until the edge's gradient comes back."""

    def __init__(self, part: Part, optimizer: torch.optim.Optimizer | None) -> None:
        self.part = part
        self.optimizer = optimizer
        self._stash: dict[Hashable, torch.Tensor] = {}

    @property
    def in_flight(self) -> int:
        return len(self._stash)

    def forward(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """Train-mode forward; returns the smashed activations to send (a detached float32 copy)."""
        if key in self._stash:
            raise ValueError(f"micro-batch {key!r} is already in flight")
        self.part.module.train()
        out = self.part.module(x)
        self._stash[key] = out
        # A copy, not a view: the encoder may hold it while autograd still owns the original.
        return out.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)

    def backward(self, key: Hashable, grad: torch.Tensor) -> None:
        """Back-propagate the edge's gradient for ``key`` into the parameter grads and drop its graph."""
        if key not in self._stash:
            raise KeyError(f"no micro-batch {key!r} in flight (in flight: {list(self._stash)})")
        out = self._stash[key]
        if tuple(grad.shape) != tuple(out.shape):
            raise ValueError(
                f"gradient for {key!r} has shape {tuple(grad.shape)}, expected {tuple(out.shape)}"
            )
        del self._stash[key]
        # At cut 0 the "output" is the raw input: nothing to train, nothing to back-propagate.
        if out.requires_grad:
            out.backward(grad.to(dtype=out.dtype, device=out.device))

    def step(self) -> None:
        """One optimizer step for the mini-batch (flush), then clear the grads."""
        if self._stash:
            raise RuntimeError(f"step() with {len(self._stash)} micro-batch(es) still in flight")
        _step(self.optimizer)

    def discard(self) -> None:
        """Forget in-flight graphs and accumulated grads, e.g. when a round is aborted."""
        self._stash.clear()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)


class EdgeStage:
    """The edge side: finish the forward pass, compute the loss, return the gradient at the cut."""

    def __init__(self, part: Part, optimizer: torch.optim.Optimizer | None) -> None:
        self.part = part
        self.optimizer = optimizer

    def forward_backward(self, smashed: torch.Tensor, labels: torch.Tensor, batch_size: int) -> StepResult:
        """Accumulate this micro-batch's parameter grads; ``batch_size`` is the device's mini-batch size B."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(smashed) != len(labels):
            raise ValueError(f"{len(smashed)} activations but {len(labels)} labels")
        self.part.module.train()
        a = smashed.detach().requires_grad_(True)
        logits = self.part.module(a)
        loss_sum, loss = _scaled_loss(logits, labels, batch_size)
        loss.backward()
        assert a.grad is not None  # the loss always depends on its input
        return StepResult(float(loss_sum.detach()), _correct(logits, labels), len(labels), grad=a.grad)

    def step(self) -> None:
        _step(self.optimizer)

    def discard(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)


class LocalTrainer:
    """Unsplit training with the same micro-batch cut: classic FL (cut = end) and the reference for tests."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1) -> StepResult:
        self.model.train()
        batch = len(x)
        loss_total, correct = 0.0, 0
        for xm, ym in _cut(x, y, micro_batches):
            logits = self.model(xm)
            loss_sum, loss = _scaled_loss(logits, ym, batch)
            loss.backward()
            loss_total += float(loss_sum.detach())
            correct += _correct(logits, ym)
        _step(self.optimizer)
        return StepResult(loss_total, correct, batch)


_cut = micro_batches  # LocalTrainer.train_batch's parameter shadows the function name


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode; the model's train/eval mode is restored afterwards."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need matching non-empty inputs and labels, got {len(x)} and {len(y)}")
    was_training = model.training
    model.eval()
    loss_total, correct = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                logits = model(xb)
                loss_total += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += _correct(logits, yb)
    finally:
        model.train(was_training)
    return correct / len(x), loss_total / len(x)
