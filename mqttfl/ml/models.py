"""Models as lists of blocks that can be cut at any block boundary (docs/design.md, "Round").

A model is an ``nn.Sequential`` whose children are *blocks*, the units a split point may fall between. With
``n`` blocks a cut ``c`` in ``[0, n]`` gives the device ``blocks[:c]`` and the edge ``blocks[c:]``; ``c = n``
is plain local training, ``c = 0`` sends raw inputs.

Both sides of a cut keep the full model's parameter names (``"3.1.weight"``), so the device's and the
edge's states are disjoint pieces of one ``state_dict`` and merge by plain dict union; aggregation and
checkpoints never need to know where the cut was.

States travel as float32 numpy arrays. BatchNorm running statistics are part of the state (they are float
buffers) because averaging the weights without them leaves the aggregated model evaluating with stale
normalisation; ``num_batches_tracked`` is an integer counter that only matters for momentum-free BN, so it is
left out rather than averaged.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mqttfl.protocol.schema import ModelRef, ModelSchema, TensorSpec

Builder = Callable[[tuple[int, ...], int], nn.Sequential]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build the blocks, and the defaults of the paper the model comes from."""

    build: Builder
    input_shape: tuple[int, ...]
    default_cut: int


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{model} expects an image input shape (C, H, W), got {input_shape}")
    c, h, w = input_shape
    return c, h, w


def _vgg5(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    # FedFly's VGG-5: the device keeps conv1, pool, conv2, pool (cut 2); the smashed tensor is 64 x H/4 x W/4.
    c, h, w = _image_shape(input_shape, "vgg5")
    flat = 64 * (h // 2 // 2) * (w // 2 // 2)
    if flat == 0:
        raise ValueError(f"vgg5 needs H, W >= 4, got {input_shape}")
    return nn.Sequential(
        nn.Sequential(*_conv_bn_relu(c, 32), nn.MaxPool2d(2)),
        nn.Sequential(*_conv_bn_relu(32, 64), nn.MaxPool2d(2)),
        nn.Sequential(*_conv_bn_relu(64, 64)),
        nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(inplace=True)),
        nn.Sequential(nn.Linear(128, num_classes)),
    )


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    # The two-conv CNN of McMahan et al. that Eco-FL trains. "Same" padding (2 for a 5x5 kernel) keeps the
    # model valid on small inputs such as the 8x8 digits, where unpadded 5x5 convs would run out of pixels.
    c, h, w = _image_shape(input_shape, "cnn")
    flat = 64 * (h // 2 // 2) * (w // 2 // 2)
    if flat == 0:
        raise ValueError(f"cnn needs H, W >= 4, got {input_shape}")
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, 32, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(32, 64, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(inplace=True)),
        nn.Sequential(nn.Linear(512, num_classes)),
    )


_MLP_HIDDEN = (128, 64, 32, 16)


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    # The heterogeneous-IoT paper's 5-layer sigmoid MLP. The leading Flatten lets image-shaped batches in too.
    widths = (math.prod(input_shape), *_MLP_HIDDEN)
    blocks: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        head = [nn.Flatten()] if i == 0 else []
        blocks.append(nn.Sequential(*head, nn.Linear(a, b), nn.Sigmoid()))
    blocks.append(nn.Sequential(nn.Linear(widths[-1], num_classes)))
    return nn.Sequential(*blocks)


def _chain(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    # Twelve blocks of equal width: a model with enough equal blocks that 2, 3, 4 or 6 pipeline stages get equal
    # shares (the pipeline benchmark and tests; docs/design.md, "Pipeline").
    width = 64
    blocks: list[nn.Module] = [nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(10)]
    blocks.append(nn.Sequential(nn.Linear(width, num_classes)))
    return nn.Sequential(*blocks)


MODELS: dict[str, ModelSpec] = {
    "vgg5": ModelSpec(_vgg5, (3, 32, 32), default_cut=2),
    "cnn": ModelSpec(_cnn, (1, 28, 28), default_cut=1),
    "mlp": ModelSpec(_mlp, (64,), default_cut=2),
    "chain12": ModelSpec(_chain, (64,), default_cut=6),
}
ENTRY_POINTS = "mqttfl.models"  # a package may register models under this entry-point group


def _user_spec(ref: str) -> ModelSpec:
    """A user's model: ``package.module:function`` or an entry point of :data:`ENTRY_POINTS`.

    The function takes ``(input_shape, num_classes)`` and returns the model's blocks (an ``nn.Sequential``
    or a list of modules); an optional ``default_cut`` attribute on it names its usual split point."""
    fn: Any = None
    if ":" in ref:
        module, _, attr = ref.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model {ref!r}: cannot load {attr!r} from {module!r}: {e}") from None
    else:
        found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS) if ep.name == ref]
        if not found:
            known = sorted({*MODELS, *(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINTS))})
            raise ValueError(f"unknown model {ref!r}; known: {', '.join(known)} (or module:function)")
        fn = found[0].load()
    if not callable(fn):
        raise ValueError(f"model {ref!r} is not callable")

    def build(shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        blocks = fn(tuple(shape), num_classes)
        model = blocks if isinstance(blocks, nn.Sequential) else nn.Sequential(*blocks)
        if len(model) < 2:
            raise ValueError(f"model {ref!r} has {len(model)} block(s); a split needs at least 2")
        return model

    return ModelSpec(build, (), default_cut=int(getattr(fn, "default_cut", 1)))


def _spec(name: str) -> ModelSpec:
    spec = MODELS.get(name)
    return spec if spec is not None else _user_spec(name)


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: tuple[int, ...] | None = None,
    seed: int | None = None,
) -> nn.Sequential:
    """Build a model by name or reference; with ``seed`` the initial weights are a function of the seed alone.

    The seeded init runs inside a forked RNG so it neither depends on nor disturbs the caller's global
    torch RNG (a device that builds a model mid-run must not shift its data shuffling).
    """
    spec = _spec(name)
    shape = tuple(input_shape) if input_shape is not None else spec.input_shape
    if not shape:
        raise ValueError(f"model {name!r} needs an input_shape")
    if seed is None:
        return spec.build(shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(shape, num_classes)


@functools.lru_cache(maxsize=32)
def schema_of(ref: ModelRef) -> ModelSchema:
    """The pure description of a model that the protocol machines check states and activations against.

    Built on the CPU with one sample through it, in a forked RNG (the caller's random stream is untouched): the
    meta device would skip the weights' init, but its first use imports torch's symbolic-shape and compiler
    machinery, over 70 MB and a second on a device (docs/design.md, "Measured")."""
    spec = _spec(ref.model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = spec.build(tuple(ref.input_shape), ref.num_classes)
        blocks = []
        for i, block in enumerate(model):
            trainable = {k for k, _ in block.named_parameters(prefix=str(i))}
            blocks.append(tuple(TensorSpec(k, tuple(t.shape), "float32", k in trainable)
                                for k, t in _float_tensors(block, f"{i}.")))
        x = torch.zeros((1, *ref.input_shape))
        boundaries = [tuple(ref.input_shape)]
        model.eval()
        for block in model:
            x = block(x)
            boundaries.append(tuple(x.shape[1:]))
    return ModelSchema(ref, tuple(blocks), tuple(boundaries), default_cut=min(spec.default_cut, len(model) - 1))


def initial_state(ref: ModelRef, seed: int) -> dict[str, np.ndarray]:
    """The seeded initial weights of a run's global model."""
    return model_state(build_model(ref.model, num_classes=ref.num_classes, input_shape=ref.input_shape, seed=seed))


def _float_tensors(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(prefix=prefix.rstrip("."))
    for key, buf in module.named_buffers(prefix=prefix.rstrip(".")):
        if buf.is_floating_point():
            yield key, buf


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _load(own: Mapping[str, torch.Tensor], state: Mapping[str, np.ndarray], where: str) -> None:
    # Check everything before writing anything, so a bad state never leaves the model half-loaded.
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"state for {where} lacks {len(missing)} key(s): {', '.join(missing[:5])}")
    arrays = {}
    for key, t in own.items():
        arr = np.asarray(state[key])
        if tuple(arr.shape) != tuple(t.shape):
            raise ValueError(f"{key}: state has shape {tuple(arr.shape)}, {where} expects {tuple(t.shape)}")
        arrays[key] = arr
    with torch.no_grad():
        for key, t in own.items():
            # np.array copies: decoded arrays are read-only views, which torch.from_numpy warns about.
            t.copy_(torch.from_numpy(np.array(arrays[key], dtype=np.float32)))


class Part:
    """Blocks ``[start, stop)`` of a model: the same module objects, addressed by the full model's keys."""

    def __init__(self, model: nn.Sequential, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(model):
            raise ValueError(f"blocks [{start}, {stop}) out of range for a model of {len(model)} blocks")
        self.start = start
        self.stop = stop
        # A new container over the same block objects: training the part trains the model.
        self.module = nn.Sequential(*(model[i] for i in range(start, stop)))
        self._model = model

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(self.start, self.stop):
            out.update(_float_tensors(self._model[i], f"{i}."))
        return out

    def keys(self) -> list[str]:
        return list(self._tensors())

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable parameters under the full model's keys (optimizer state is keyed by these)."""
        for i in range(self.start, self.stop):
            yield from self._model[i].named_parameters(prefix=str(i))

    def state(self) -> dict[str, np.ndarray]:
        return {k: _to_numpy(t) for k, t in self._tensors().items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load this part's keys; keys of other blocks are ignored so a full-model state can be passed."""
        _load(self._tensors(), state, f"blocks [{self.start}, {self.stop})")

    def __repr__(self) -> str:
        return f"Part(blocks=[{self.start}, {self.stop}), keys={len(self.keys())})"


def model_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: _to_numpy(t) for k, t in _float_tensors(model, "")}


def load_model_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    _load(dict(_float_tensors(model, "")), state, "the model")
