"""Heterogeneous devices: the local model a device class trains, and masked updates on the wire
(docs/algorithms.md, "Heterogeneous devices").

A device names its class (``[device] class``); the cloud's ``[cloud.classes.NAME]`` tables say what a device of
that class trains (:class:`DeviceClass`), and every round carries each device's :class:`LocalModel` to it
through its edge. A device whose local model is not the plain fp32 model trains locally (cut = end):

- ``partial`` (EmbracingFL / InclusiveFL): the input-side blocks run frozen (no autograd, no stored activations)
  and only the last ``train_blocks`` blocks train; the update holds only those blocks' keys;
- ``pruned``: magnitude masks at ratio ``prune`` (``prune_by`` ``weight``: the smallest entries of each weight
  tensor; ``channel``: the output channels with the smallest norm), masked weights stay zero;
- ``width`` (HeteroFL, the baseline): every hidden layer keeps its first ``width`` share of channels;
- ``precision``: fp16 or bf16 local compute (autocast, fp32 master weights), or int8 fake-quantised training
  of weights and activations (straight-through gradients; the activations kept for backward are stored as
  int8).

A masked update carries only the kept entries: each masked key travels as a 1-D array of its kept values (in
C order) plus ``"<key>|mask"``, the mask packed eight entries to a byte (:func:`compact`, :func:`expand`).
The edge and the cloud average each entry over the devices that trained it (``masked_average``).

``tau_s`` is the class's cutoff: a device checks after every mini-batch and, once its round has trained that
long, reports what it has with the examples it processed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.schema import TensorSpec

State = dict[str, np.ndarray]
TRAIN_MODES = ("full", "partial", "pruned", "width")
PRUNE_BY = ("weight", "channel")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
MASK = "|mask"
COVERAGE = "|cov"
DEFAULT_CLASS = "default"


@dataclass(frozen=True, kw_only=True)
class LocalModel:
    """What one device trains in a round (a class's settings without the cost model's)."""

    train: str = field(default="full", metadata={"doc": (
        "what a device of this class trains: full (the whole model), partial (only the last train_blocks blocks; "
        "the input side runs frozen), pruned (magnitude-pruned at prune) or width (every hidden layer's first "
        "width share of channels: HeteroFL's sub-model, the baseline); anything but full trains locally")})
    train_blocks: int = field(default=1, metadata={"doc": "partial: output-side blocks trained"})
    prune: float = field(default=0.5, metadata={"doc": "pruned: fraction of each weight tensor (or of its "
                                                       "channels) masked to zero"})
    prune_by: str = field(default="weight", metadata={"doc": (
        "pruned: weight (the smallest entries of each tensor) or channel (the output channels with the smallest "
        "norm); the output layer is never pruned")})
    width: float = field(default=0.5, metadata={"doc": "width: share of each hidden layer's channels kept"})
    precision: str = field(default="fp32", metadata={"doc": (
        "local compute: fp32, fp16 or bf16 (autocast over fp32 weights), or int8 (fake-quantised weights and "
        "activations, activations stored as int8 for backward); anything but fp32 trains locally")})
    tau_s: float = field(default=0.0, metadata={"doc": (
        "cutoff: a device stops after the mini-batch during which its round reached this many seconds of training "
        "and reports the examples it processed (0: none)")})

    def problems(self) -> list[str]:
        out = []
        if self.train not in TRAIN_MODES:
            out.append(f"train must be one of {list(TRAIN_MODES)}, got {self.train!r}")
        if self.train_blocks < 1:
            out.append("train_blocks must be >= 1")
        if not 0 <= self.prune < 1 or self.prune_by not in PRUNE_BY:
            out.append(f"prune must be in [0, 1) and prune_by one of {list(PRUNE_BY)}")
        if not 0 < self.width <= 1:
            out.append("width must be in (0, 1]")
        if self.precision not in PRECISIONS:
            out.append(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not (math.isfinite(self.tau_s) and self.tau_s >= 0):
            out.append("tau_s must be >= 0")
        return out

    @property
    def local_only(self) -> bool:
        """A device with this model trains the whole model itself (cut = end)."""
        return self.train != "full" or self.precision != "fp32"

    @property
    def plain(self) -> bool:
        """The default: the whole model in fp32, no cutoff (nothing of it travels in a round)."""
        return not self.local_only and self.tau_s == 0

    def frozen(self, n_blocks: int) -> int:
        """Input-side blocks this model runs without training them."""
        return max(0, n_blocks - self.train_blocks) if self.train == "partial" else 0

    def to_body(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(LocalModel)}

    @classmethod
    def from_body(cls, body: Any) -> LocalModel:
        if not isinstance(body, Mapping):
            raise ProtocolError("bad_field", "local model must be a map")
        kw: dict[str, Any] = {}
        for f in fields(LocalModel):
            if f.name not in body:
                continue
            v = body[f.name]
            want: Any = {"str": str, "int": int, "float": (int, float)}[str(f.type)]
            if isinstance(v, bool) or not isinstance(v, want):
                raise ProtocolError("bad_field", f"local model field {f.name!r} has type {type(v).__name__}")
            kw[f.name] = float(v) if str(f.type) == "float" else v
        local = cls(**kw)
        bad = local.problems()
        if bad:
            raise ProtocolError("bad_field", "local model: " + "; ".join(bad))
        return local


@dataclass(frozen=True, kw_only=True)
class DeviceClass(LocalModel):
    """``[cloud.classes.NAME]``: what the devices of class NAME train, and their cost model."""

    power_w: float = field(default=0.0, metadata={"doc": (
        "power drawn while computing, watts: the energy estimate is CPU time x power_w (where a device's board "
        "reports a power sensor, its reading is used instead; 0: no estimate)")})

    def problems(self) -> list[str]:
        return super().problems() + ([] if self.power_w >= 0 else ["power_w must be >= 0"])

    def local(self) -> LocalModel:
        return LocalModel(**{f.name: getattr(self, f.name) for f in fields(LocalModel)})

    @classmethod
    def of(cls, name: str, value: Any) -> DeviceClass:
        """A class from its config table; ValueError names a bad key."""
        if isinstance(value, DeviceClass):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"[cloud.classes.{name}] must be a table")
        known = {f.name: f for f in fields(cls)}
        unknown = set(value) - set(known)
        if unknown:
            raise ValueError(f"[cloud.classes.{name}]: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        for k, v in value.items():
            want = str(known[k].type)
            ok = isinstance(v, str) if want == "str" else (not isinstance(v, bool) and isinstance(
                v, int if want == "int" else (int, float)))
            if not ok:
                raise ValueError(f"[cloud.classes.{name}] {k} must be {want}, got {type(v).__name__} {v!r}")
            kw[k] = float(v) if want == "float" else v
        c = cls(**kw)
        bad = c.problems()
        if bad:
            raise ValueError(f"[cloud.classes.{name}]: " + "; ".join(bad))
        return c

    def flat(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ masked updates


def compact(delta: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> tuple[State, State]:
    """A masked update as it travels: (tensors, packed masks). A masked key carries its kept values only."""
    tensors: State = {}
    packed: State = {}
    for k, v in delta.items():
        m = masks.get(k)
        if m is None:
            tensors[k] = v
            continue
        keep = np.asarray(m, dtype=bool).reshape(v.shape)
        tensors[k] = np.ascontiguousarray(np.asarray(v, np.float32)[keep])
        packed[k] = np.packbits(keep.reshape(-1))
    return tensors, packed


def expand(tensors: Mapping[str, np.ndarray], packed: Mapping[str, np.ndarray], specs: Mapping[str, TensorSpec],
           what: str) -> tuple[State, State]:
    """(dense update, 0/1 float32 masks) of an update as it travelled; unmasked keys pass as they came (checked
    later against the schema). ProtocolError when a mask does not fit its key or its values."""
    dense: State = {}
    masks: State = {}
    for k, v in tensors.items():
        p = packed.get(k)
        if p is None:
            dense[k] = v
            continue
        spec = specs.get(k)
        if spec is None:
            raise ProtocolError("bad_shape", f"{what}: mask for {k!r}, which is not part of the update")
        size = math.prod(spec.shape)
        if p.dtype != np.uint8 or p.ndim != 1 or p.size != (size + 7) // 8:
            raise ProtocolError("bad_shape", f"{what}: mask of {k!r} has {p.size} bytes, {(size + 7) // 8} expected")
        keep = np.unpackbits(p, count=size).astype(bool)
        if v.ndim != 1 or v.size != int(keep.sum()):
            raise ProtocolError("bad_shape", f"{what}: {k!r} carries {v.size} values for {int(keep.sum())} kept")
        full = np.zeros(size, np.float32)
        full[keep] = v
        dense[k] = full.reshape(spec.shape)
        masks[k] = keep.reshape(spec.shape).astype(np.float32)
    extra = set(packed) - set(tensors)
    if extra:
        raise ProtocolError("bad_shape", f"{what}: masks {sorted(extra)[:3]} for keys it does not carry")
    return dense, masks


def split_masks(tensors: Mapping[str, Any], suffix: str = MASK) -> tuple[dict[str, Any], dict[str, Any]]:
    """A message's tensors without the ``suffix`` ones, and those by the key they belong to."""
    plain = {k: v for k, v in tensors.items() if not k.endswith(suffix)}
    extra = {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}
    return plain, extra
