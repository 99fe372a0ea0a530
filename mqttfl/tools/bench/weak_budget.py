"""A weak client's training budget (``mqttfl bench hetero`` part 1; docs/algorithms.md, "Heterogeneous devices"):
what partial training and HeteroFL width reduction cost next to the full model, so that both arms get the same
budget, a fraction ``f`` of a strong client's training compute and memory.

- Compute: multiply-accumulates of one training step, counted layer by layer on the model itself (forward hooks
  give each convolution's and linear layer's output size): a trained layer costs its forward, the gradient of its
  weights and (unless nothing before it trains) the gradient of its input, three forwards; a frozen layer runs
  its forward only. The slim network of width ``r`` costs each layer's MACs times the share of its weight that
  :func:`mqttfl.ml.local.width_masks` keeps (exactly the slim layer's MACs).
- Memory: the session's training memory as the backend measures it (``Memory`` job: weights, gradients,
  optimizer state, activations stored for backward) for the full model and each partial suffix. Width runs as
  masks over the full-size model here (its measured memory is the full model's), so the slim network's is
  derived from the same measurement: its kept weights with their gradients and optimizer state, and the stored
  activations times the kept share of channels.
"""

from __future__ import annotations

from typing import Any

GRID = tuple(round(0.05 * i, 2) for i in range(4, 21))  # HeteroFL ratios tried: 0.2 .. 1.0


def costs(model: str, shape: tuple[int, ...], batch: int) -> dict[str, dict[str, float]]:
    """Training compute (MACs per mini-batch) and memory (bytes) of ``full``, ``partial<k>`` for every suffix and
    ``width<r>`` for every ratio of :data:`GRID`; each also as ``*_ratio`` to the full model's."""
    import numpy as np
    import torch
    from torch import nn

    from mqttfl.ml.backend import TorchBackend
    from mqttfl.ml.data import load_digits
    from mqttfl.ml.local import width_masks
    from mqttfl.ml.models import build_model, initial_state
    from mqttfl.protocol import stage
    from mqttfl.protocol.hetero import LocalModel
    from mqttfl.protocol.plan import Plan, Training
    from mqttfl.protocol.schema import ModelRef

    net = build_model(model, num_classes=10, input_shape=shape, seed=0)
    layers: list[tuple[int, str, nn.Module, int]] = []  # (block, name, layer, MACs of one example's forward)

    def hook(name: str, block: int) -> Any:
        def count(m: nn.Module, _: Any, out: torch.Tensor) -> None:
            per_out = int(m.weight[0].numel()) if isinstance(m, nn.Conv2d) else int(m.in_features)  # type: ignore[index,arg-type]
            layers.append((block, name, m, int(out[0].numel() * per_out)))
        return count

    handles = [m.register_forward_hook(hook(name, int(name.split(".")[0])))
               for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(torch.zeros((1, *shape)))
    for h in handles:
        h.remove()
    n_blocks = len(net)

    def train_macs(first_trained: int, share: dict[str, float]) -> float:
        total = 0.0
        seen_trained = False
        for block, name, _, macs in layers:
            m = macs * share.get(name, 1.0)
            if block < first_trained:
                total += m  # frozen: forward only
            else:
                total += m * (3 if seen_trained else 2)  # no input gradient for the first trained layer
                seen_trained = True
        return total * batch

    train, _ = load_digits(shape)
    data = train.subset(np.arange(batch * 2))
    plan = Plan.of(Training(model=model, input_shape=shape, batch_size=batch), run="budget", round=0)
    start = initial_state(ModelRef(model, shape, 10), 0)
    slots = 1 if plan.momentum > 0 else 0

    def measured(local: LocalModel | None) -> int:
        backend = TorchBackend("budget", data=data)
        backend.run(stage.Open("s", plan, 0, n_blocks, start, data=True, local=local))
        backend.run(stage.LocalBatch("s", 0, 1))
        return int(backend.run(stage.Memory("s")))

    out: dict[str, dict[str, float]] = {}
    full_mem = measured(None)
    params = sum(t.numel() * t.element_size() for t in net.parameters())
    buffers = sum(t.numel() * t.element_size() for t in net.buffers())
    activations = full_mem - buffers - (2 + slots) * params
    out["full"] = {"macs": train_macs(0, {}), "memory": full_mem}
    for k in range(1, n_blocks):
        out[f"partial{k}"] = {"macs": train_macs(n_blocks - k, {}),
                              "memory": measured(LocalModel(train="partial", train_blocks=k))}
    weights = dict(net.named_parameters())
    for r in GRID:
        masks = width_masks(net, r)
        share = {name: float(masks[f"{name}.weight"].mean()) for _, name, _, _ in layers}
        kept = sum(int(masks[k].sum()) * weights[k].element_size() if k in masks else
                   weights[k].numel() * weights[k].element_size() for k in weights)
        out[f"width{r}"] = {"macs": train_macs(0, share), "memory": buffers + (2 + slots) * kept + activations * r}
    for v in out.values():
        v["macs_ratio"] = round(v["macs"] / out["full"]["macs"], 4)
        v["memory_ratio"] = round(v["memory"] / out["full"]["memory"], 4)
    return out


def match(table: dict[str, dict[str, float]], f: float) -> dict[str, Any]:
    """The two arms at budget ``f``: the widest HeteroFL ratio and the longest output-side suffix whose compute
    and memory both stay within ``f`` of the full model's (None: nothing fits)."""

    def fits(name: str) -> bool:
        return table[name]["macs_ratio"] <= f and table[name]["memory_ratio"] <= f

    widths = [float(k[5:]) for k in table if k.startswith("width") and fits(k)]
    blocks = [int(k[7:]) for k in table if k.startswith("partial") and fits(k)]
    return {"budget": f, "width": max(widths) if widths else None, "train_blocks": max(blocks) if blocks else None}
