"""SGD with momentum, step for step what ``torch.optim.SGD(foreach=False)`` computes, without ``torch.optim``.

Why not torch's (docs/design.md, "Stages"): constructing any ``torch.optim.Optimizer`` runs ``add_param_group``
under the ``torch._disable_dynamo`` decorator, which imports ``torch._dynamo`` on first use: about 1.2 s and
80 MB of resident memory on a device that never compiles anything. SGD is the default optimizer and the one
small boards run, so it gets this implementation; Adam and AdamW stay with ``torch.optim``.

The arithmetic is torch's single-tensor path operation by operation (weight decay added to the gradient, the
momentum buffer cloned from the first gradient and then ``buf * momentum + (1 - dampening) * grad``, Nesterov's
``grad + momentum * buf``, ``param - lr * step``), so the weights are bit-identical to torch's optimizer
(``tests/test_split.py``). The parts of the ``Optimizer`` interface the stages use are the same: ``param_groups``,
``state[param]["momentum_buffer"]``, ``step()``, ``zero_grad(set_to_none)`` and ``defaults``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch


class SGD:
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if lr < 0.0 or momentum < 0.0 or weight_decay < 0.0:
            raise ValueError(f"invalid SGD settings: lr {lr}, momentum {momentum}, weight_decay {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.defaults: dict[str, Any] = {"lr": lr, "momentum": momentum, "dampening": dampening,
                                         "weight_decay": weight_decay, "nesterov": nesterov}
        self.param_groups: list[dict[str, Any]] = [{"params": list(params), **self.defaults}]
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)

    def step(self) -> None:
        with torch.no_grad():
            for group in self.param_groups:
                lr, momentum, dampening = float(group["lr"]), group["momentum"], group["dampening"]
                weight_decay, nesterov = group["weight_decay"], group["nesterov"]
                for p in group["params"]:
                    if p.grad is None:
                        continue  # torch skips a parameter without a gradient, momentum and all
                    grad = p.grad
                    if weight_decay != 0:
                        grad = grad.add(p, alpha=weight_decay)
                    if momentum != 0:
                        state = self.state[p]
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = grad.detach().clone()
                            state["momentum_buffer"] = buf
                        else:
                            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                        grad = grad.add(buf, alpha=momentum) if nesterov else buf
                    p.add_(grad, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()
