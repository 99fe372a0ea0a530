"""FedFly migration checkpoint: a device's edge-side training state, as one message body + tensors.

What moves (DESIGN §5, ALGORITHMS §2): the edge-side weights and float buffers, the optimizer state
(SGD momentum buffers), the round's global edge-side weights (the base the round-end delta is taken
against), the round plan (which fixes the learning-rate schedule position together with ``steps``), the
data position (``expected`` = next (step, micro) and ``steps`` done), the loss accumulated so far, the RNG
state, and a format version. A SHA-256 over every tensor's name, dtype, shape and bytes, in a fixed order,
travels in the body; together with chunk-level checksums this refuses any checkpoint that was damaged or
tampered with before a single weight is loaded.

Migration happens at a mini-batch boundary, so no gradient is in flight and no gradient cache moves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mqttfl.protocol.messages import Plan, ProtocolError

CHECKPOINT_FORMAT = 1
_GROUPS = ("w", "m", "b")  # weights (+ float buffers), momentum, base


class CheckpointError(ProtocolError):
    """A checkpoint that must not be installed; ``code`` says why."""


State = dict[str, np.ndarray]


@dataclass
class EdgeCheckpoint:
    device: str
    migration: str  # migration id, ties the messages of one move together
    plan: Plan
    cut: int
    weights: State
    momentum: State  # empty before the first optimizer step
    base: State
    expected: tuple[int, int]
    steps: int
    loss_sum: float
    seen: int
    n_micro: int
    smashed_shape: tuple[int, ...]
    rng: np.ndarray  # torch CPU generator state (uint8)

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"rng": np.ascontiguousarray(self.rng, dtype=np.uint8)}
        for prefix, group in zip(_GROUPS, (self.weights, self.momentum, self.base), strict=True):
            out.update({f"{prefix}/{k}": np.ascontiguousarray(v) for k, v in group.items()})
        return out

    def to_message(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        tensors = self.tensors()
        body = {
            "format": CHECKPOINT_FORMAT, "device": self.device, "migration": self.migration,
            "plan": self.plan.to_body(), "cut": self.cut, "expected": list(self.expected), "steps": self.steps,
            "loss_sum": self.loss_sum, "seen": self.seen, "n_micro": self.n_micro,
            "smashed_shape": list(self.smashed_shape), "sha256": digest(tensors),
        }
        return body, tensors

    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.tensors().values())


def digest(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def from_message(body: Mapping[str, Any], tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 reference_momentum_keys: list[str]) -> EdgeCheckpoint:
    """Validate and decode. ``reference``: the edge-side state (keys, shapes) a fresh model has at this cut;
    ``reference_momentum_keys``: its trainable parameters (which may carry momentum)."""
    fmt = body.get("format")
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError("bad_version", f"checkpoint format {fmt!r}, this edge reads {CHECKPOINT_FORMAT}")
    if body.get("sha256") != digest(tensors):
        raise CheckpointError("checksum", "checkpoint checksum mismatch: refusing a damaged checkpoint")
    groups: dict[str, State] = {p: {} for p in _GROUPS}
    for name, arr in tensors.items():
        if name == "rng":
            continue
        prefix, _, key = name.partition("/")
        if prefix not in groups:
            raise CheckpointError("bad_field", f"unexpected checkpoint tensor {name!r}")
        groups[prefix][key] = np.asarray(arr)
    for what, group, keys in (("weights", groups["w"], list(reference)), ("base", groups["b"], list(reference))):
        if sorted(group) != sorted(keys):
            raise CheckpointError("bad_shape", f"checkpoint {what} keys do not match the model at this cut")
    for key, ref in reference.items():
        for what in ("w", "b"):
            arr = groups[what][key]
            if arr.shape != ref.shape or arr.dtype != np.float32:
                raise CheckpointError("bad_shape", f"checkpoint {key}: {arr.dtype}{arr.shape}, expected "
                                                   f"float32{ref.shape}")
            if not np.isfinite(arr).all():
                raise CheckpointError("non_finite", f"checkpoint {key} has NaN/Inf")
    for key, arr in groups["m"].items():
        if key not in reference_momentum_keys or arr.shape != reference[key].shape or arr.dtype != np.float32:
            raise CheckpointError("bad_shape", f"momentum buffer {key!r} does not match the model")
    rng = tensors.get("rng")
    if rng is None or rng.dtype != np.uint8 or rng.ndim != 1:
        raise CheckpointError("bad_field", "checkpoint lacks a uint8 RNG state")
    try:
        plan = Plan.from_body(body["plan"])
        expected = (int(body["expected"][0]), int(body["expected"][1]))
        ck = EdgeCheckpoint(
            device=str(body["device"]), migration=str(body["migration"]), plan=plan, cut=int(body["cut"]),
            weights=groups["w"], momentum=groups["m"], base=groups["b"], expected=expected,
            steps=int(body["steps"]), loss_sum=float(body["loss_sum"]), seen=int(body["seen"]),
            n_micro=int(body["n_micro"]), smashed_shape=tuple(int(v) for v in body["smashed_shape"]),
            rng=np.array(rng),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError("bad_field", f"checkpoint body: {e}") from e
    if expected[1] != 0:
        raise CheckpointError("bad_field", "checkpoints are taken at mini-batch boundaries (micro must be 0)")
    return ck
