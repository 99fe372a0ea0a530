"""A device class's local model in torch (docs/algorithms.md, "Heterogeneous devices"): the frozen input side,
pruning and width masks, reduced precision, and the training memory a session holds.

- Masks (:func:`prune_masks`, :func:`width_masks`) are bool arrays by the full model's keys. They are applied
  once to the weights and, through a gradient hook, to every gradient, so a masked entry stays exactly zero
  whatever the optimizer (momentum and weight decay of a zero are zero); :func:`apply_masks` re-applies them
  after each step all the same.
- Width reduction is HeteroFL's sub-model as masks: each hidden layer keeps its first ``width`` share of
  output channels (the input layer's inputs and the output layer's outputs stay whole), the inputs of the next
  layer follow, BatchNorm follows its channels. A dropped channel's weights and bias are zero, so it carries
  exact zeros forward and the kept entries train exactly as the slim network would; it costs the full model's
  compute and memory here, so only its accuracy is comparable, not its speed.
- Precision: fp16 / bf16 run the forward under CPU autocast (fp32 master weights, gradients in fp32); int8
  fake-quantises the inputs and weights of every convolution and linear layer (symmetric, one scale per tensor,
  straight-through gradients) and stores the activations kept for backward as int8 with their scale.
- :class:`SavedBytes` counts the bytes autograd keeps for backward, as it keeps them: the activations part of
  a session's training memory.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
INT8_MIN_ELEMENTS = 64  # smaller saved tensors (per-channel statistics) stay as they are


class SavedBytes:
    """Counts the tensors autograd saves for backward while its hooks are active: ``current`` rises as forwards
    save and falls as backwards use them, ``peak`` keeps the largest. With ``int8`` float activations are stored
    quantised (one scale per tensor). Tensors that are parameters cost nothing extra and are not counted."""

    def __init__(self, params: list[torch.Tensor], *, int8: bool = False) -> None:
        self.int8 = int8
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self.current = 0
        self.peak = 0

    def _add(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def pack(self, t: torch.Tensor) -> Any:
        if t.untyped_storage().data_ptr() in self._params:
            return ("ref", t, 0)
        if self.int8 and t.is_floating_point() and t.numel() >= INT8_MIN_ELEMENTS:
            scale = t.detach().abs().amax().float().clamp_min(1e-30) / 127.0
            q = torch.clamp(torch.round(t.detach().float() / scale), -127, 127).to(torch.int8)
            self._add(q.numel())
            return ("q", (q, scale, t.dtype, t.requires_grad), q.numel())
        n = t.numel() * t.element_size()
        self._add(n)
        return ("t", t, n)

    def unpack(self, packed: Any) -> torch.Tensor:
        kind, value, n = packed
        self.current -= n
        if kind == "q":
            q, scale, dtype, _ = value
            return (q.float() * scale).to(dtype)
        return value  # type: ignore[no-any-return]

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def precision_context(precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    dtype = PRECISION_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast("cpu", dtype=dtype)


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantise-dequantise with one scale per tensor; the gradient passes straight through."""
    scale = x.detach().abs().amax().clamp_min(1e-30) / 127.0
    q = torch.clamp(torch.round(x.detach() / scale), -127, 127) * scale
    return x + (q - x.detach())


def _quant_conv(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(fake_quant(x), fake_quant(self.weight), self.bias)


def _quant_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(fake_quant(x), fake_quant(self.weight), self.bias)


def quantise_int8(module: nn.Module) -> None:
    """Fake-quantised int8 training for every convolution and linear layer of ``module`` (their parameters and
    keys stay as they are)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.forward = types.MethodType(_quant_conv, m)  # type: ignore[method-assign]
        elif isinstance(m, nn.Linear):
            m.forward = types.MethodType(_quant_linear, m)  # type: ignore[method-assign]


def _layers(model: nn.Sequential) -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules by their full-model prefix (``"3.1"``), in the order a plain stack of blocks runs them."""
    for name, m in model.named_modules():
        if name and not list(m.children()):
            yield name, m


def _output_layer(model: nn.Sequential) -> str:
    names = [n for n, m in _layers(model) if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not names:
        raise ValueError("the model has no convolution or linear layer to mask")
    return names[-1]


def prune_masks(model: nn.Sequential, ratio: float, by: str) -> dict[str, np.ndarray]:
    """Magnitude masks keeping the ``1 - ratio`` largest entries of each convolution and linear weight (``by``
    "weight"), or its output channels with the largest L2 norm ("channel", with their biases and the BatchNorm
    that follows them); the output layer is never pruned."""
    out: dict[str, np.ndarray] = {}
    if ratio <= 0:
        return out
    last = _output_layer(model)
    kept: np.ndarray | None = None  # the output channels of the layer just pruned by channel
    for name, m in _layers(model):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and kept is not None:
            # A dropped channel's statistics are those of a constant zero: averaged into the global model they
            # would shrink its running variance towards zero for a channel that others (or the global model at
            # evaluation) compute, and blow it up there.
            for key in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, key, None) is not None:
                    out[f"{name}.{key}"] = kept.copy()
            kept = None
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or name == last:
            continue
        kept = None
        w = m.weight.detach().abs().numpy()
        if by == "weight":
            keep = max(1, int(round((1 - ratio) * w.size)))
            order = np.argsort(-w.reshape(-1), kind="stable")
            mask = np.zeros(w.size, bool)
            mask[order[:keep]] = True
            out[f"{name}.weight"] = mask.reshape(w.shape)
        else:
            norms = np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(axis=1))
            keep = max(1, int(round((1 - ratio) * len(norms))))
            channels = np.zeros(len(norms), bool)
            channels[np.argsort(-norms, kind="stable")[:keep]] = True
            out[f"{name}.weight"] = np.broadcast_to(channels.reshape(-1, *[1] * (w.ndim - 1)), w.shape).copy()
            if m.bias is not None:
                out[f"{name}.bias"] = channels.copy()
            kept = channels
    return out


def width_masks(model: nn.Sequential, width: float) -> dict[str, np.ndarray]:
    """HeteroFL's sub-model of a plain stack of blocks as masks: every hidden convolution or linear layer keeps
    its first ``ceil(width * out)`` output channels, and the next layer only the inputs from those."""
    out: dict[str, np.ndarray] = {}
    last = _output_layer(model)
    kept: np.ndarray | None = None  # the channels of the current activation that carry values (None: all)
    for name, m in _layers(model):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            n_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            n_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            rows = np.ones(n_out, bool)
            if name != last:
                rows[max(1, math.ceil(width * n_out)):] = False
            cols = np.ones(n_in, bool)
            if kept is not None:
                if n_in % len(kept):
                    raise ValueError(f"width reduction: {name} takes {n_in} inputs from {len(kept)} channels")
                cols = np.repeat(kept, n_in // len(kept))  # a flattened (C, H, W) map: H * W inputs per channel
            w = m.weight
            mask = np.outer(rows, cols).reshape(n_out, n_in, *[1] * (w.dim() - 2))
            out[f"{name}.weight"] = np.broadcast_to(mask, tuple(w.shape)).copy()
            if m.bias is not None:
                out[f"{name}.bias"] = rows.copy()
            kept = rows
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and kept is not None:
            for key in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, key, None) is not None:
                    out[f"{name}.{key}"] = kept.copy()
    return out


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked entries (after each optimizer step: nothing may revive them)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for key, m in masks.items():
            tensors[key].mul_(m)


def install_masks(model: nn.Module, masks: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Zero the masked entries and mask every later gradient; the masks as tensors."""
    as_tensors = {k: torch.from_numpy(v.astype(np.float32)) for k, v in masks.items()}
    params = dict(model.named_parameters())
    apply_masks(model, as_tensors)
    for key, m in as_tensors.items():
        p = params.get(key)
        if p is not None and p.requires_grad:
            p.register_hook(lambda g, m=m: g * m)
    return as_tensors
