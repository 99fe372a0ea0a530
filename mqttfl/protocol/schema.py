"""What a model looks like on the wire, without the model: blocks, tensor names, shapes, cut shapes.

The protocol machines never import torch (docs/design.md, "Layers"), yet they must refuse a state or an
activation of the wrong shape before it reaches training. A :class:`ModelSchema` is the pure description
they check against: the model's blocks (the units a split point falls between), the float tensors of each
block under the full model's keys (``"3.1.weight"``), and the activation shape at every block boundary.
The runtime builds it once per model from the real network on torch's meta device (``mqttfl.ml.models``).

Its :attr:`~ModelSchema.fingerprint` names the architecture: two nodes that compute the same fingerprint
agree on every key, shape and dtype, so a node joining a run with another version of a user's model is
refused with the first difference (:meth:`ModelSchema.difference`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mqttfl.protocol.errors import ProtocolError

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    trainable: bool = True  # False: a float buffer (BatchNorm running statistics)


@dataclass(frozen=True)
class ModelRef:
    """How a plan names a model: a registry name or ``module:function``, and what it is built for."""

    model: str
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class ModelSchema:
    ref: ModelRef
    blocks: tuple[tuple[TensorSpec, ...], ...]
    # boundaries[c] is the per-sample activation shape at cut c: boundaries[0] is the input,
    # boundaries[n_blocks] the model's output.
    boundaries: tuple[tuple[int, ...], ...]
    default_cut: int = 1
    _specs: dict[str, TensorSpec] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.boundaries) != len(self.blocks) + 1:
            raise ValueError(f"{len(self.blocks)} blocks need {len(self.blocks) + 1} boundaries")
        for block in self.blocks:
            for spec in block:
                self._specs[spec.key] = spec

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def specs(self, start: int = 0, stop: int | None = None) -> dict[str, TensorSpec]:
        """The tensors of blocks ``[start, stop)``, by key."""
        stop = self.n_blocks if stop is None else stop
        if not 0 <= start <= stop <= self.n_blocks:
            raise ValueError(f"blocks [{start}, {stop}) out of range for {self.n_blocks} blocks")
        return {s.key: s for b in self.blocks[start:stop] for s in b}

    def keys(self, start: int = 0, stop: int | None = None) -> list[str]:
        return list(self.specs(start, stop))

    def activation(self, cut: int) -> tuple[int, ...]:
        return self.boundaries[cut]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(repr(tuple(self.ref.input_shape)).encode())
        h.update(f"|{self.ref.num_classes}|".encode())
        for i, block in enumerate(self.blocks):
            for s in block:
                h.update(f"{i}|{s.key}|{s.shape}|{s.dtype}|{s.trainable};".encode())
        return h.hexdigest()[:16]

    def describe(self) -> tuple[tuple[int, str, tuple[int, ...], str], ...]:
        """Every tensor as (block, key, shape, dtype): what the cloud sends with a round so that a node whose own
        build of the model differs can say where (:meth:`difference`)."""
        return tuple((i, s.key, tuple(s.shape), s.dtype) for i, b in enumerate(self.blocks) for s in b)

    def difference(self, other: Iterable[Sequence[Any]]) -> str | None:
        """The first difference between this schema ("here") and another node's :meth:`describe` ("there"),
        or None when they agree."""
        mine = {row[1]: row for row in self.describe()}
        theirs = {str(row[1]): row for row in other}
        for key in [*mine, *(k for k in theirs if k not in mine)]:  # in the model's order
            if key not in theirs:
                return f"tensor {key!r} {list(mine[key][2])} is missing there"
            if key not in mine:
                return f"tensor {key!r} {list(theirs[key][2])} is not part of the model here"
            a, b = mine[key], theirs[key]
            if (a[0], tuple(a[2]), a[3]) != (int(b[0]), tuple(b[2]), str(b[3])):
                return (f"tensor {key!r}: block {a[0]} {a[3]}{list(a[2])} here, "
                        f"block {b[0]} {b[3]}{list(b[2])} there")
        return None


def mismatch(local: ModelSchema, expected: str, model: str, cloud: Iterable[Sequence[Any]]) -> str | None:
    """Why a node's own build of a plan's model is not the cloud's (``expected`` fingerprint, ``cloud``'s
    description), naming the first differing tensor; None when they agree or the plan names no fingerprint."""
    if not expected or local.fingerprint == expected:
        return None
    diff = local.difference(cloud)
    return (f"model {model!r} differs from the cloud's (fingerprint {local.fingerprint} here, {expected} there)"
            + (f": {diff}" if diff else ""))


MAX_DESCRIPTION_ROWS = 100_000


def parse_description(value: Any) -> tuple[tuple[int, str, tuple[int, ...], str], ...]:
    """Another node's :meth:`ModelSchema.describe` from the wire, checked (ProtocolError on a bad row)."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DESCRIPTION_ROWS:
        raise ProtocolError("bad_field", "schema must be a list of [block, key, shape, dtype] rows")
    rows = []
    for row in value:
        if not (isinstance(row, (list, tuple)) and len(row) == 4 and isinstance(row[0], int)
                and isinstance(row[1], str) and len(row[1]) <= 300 and isinstance(row[2], (list, tuple))
                and len(row[2]) <= 16 and all(isinstance(d, int) and not isinstance(d, bool) for d in row[2])
                and isinstance(row[3], str) and len(row[3]) <= 16):
            raise ProtocolError("bad_field", f"bad schema row {str(row)[:80]}")
        rows.append((int(row[0]), row[1], tuple(row[2]), row[3]))
    return tuple(rows)


def check_state(state: Mapping[str, Any], expected: Mapping[str, TensorSpec], what: str) -> State:
    """Same keys, shapes and float dtype as the schema, and finite: a wrong model never touches ours.

    Returns the state as writable float32 arrays (decoded arrays are read-only views into the message).
    """
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ProtocolError("bad_shape", f"{what}: keys differ (missing {missing}, unexpected {extra})")
    out: State = {}
    for k, spec in expected.items():
        v = state[k]
        if not isinstance(v, np.ndarray):
            raise ProtocolError("bad_type", f"{what}: {k} is not an array")
        if tuple(v.shape) != tuple(spec.shape):
            raise ProtocolError("bad_shape", f"{what}: {k} has shape {tuple(v.shape)}, expected {spec.shape}")
        if v.dtype.kind != "f":
            raise ProtocolError("bad_dtype", f"{what}: {k} has dtype {v.dtype}, expected float")
        if not np.isfinite(v).all():
            raise ProtocolError("non_finite", f"{what}: {k} has NaN/Inf")
        out[k] = np.array(v, dtype=np.float32)
    return out


def state_norm(state: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of a state taken as one vector (accumulated in float64: a huge value reads as huge, not inf)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values()))
