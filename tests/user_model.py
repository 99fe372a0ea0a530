"""A model that is not part of mqttfl: what a user's package provides (``module:function``, docs/models.md)."""

from __future__ import annotations

from torch import nn


def tiny_mlp(input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    (d,) = input_shape
    return [nn.Sequential(nn.Linear(d, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
            nn.Sequential(nn.Linear(8, num_classes))]


tiny_mlp.default_cut = 2  # type: ignore[attr-defined]


def tiny_mlp_v2(input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """The next version of the same model: a wider first layer (what a node with another release would build)."""
    (d,) = input_shape
    return [nn.Sequential(nn.Linear(d, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 8), nn.ReLU()),
            nn.Sequential(nn.Linear(8, num_classes))]


tiny_mlp_v2.default_cut = 2  # type: ignore[attr-defined]
