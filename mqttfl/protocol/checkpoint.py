"""FedFly migration checkpoint: a device's edge-side training state, as one message body + tensors.

What moves (docs/design.md, "Migration"): the edge-side weights and float buffers, the optimizer state
(SGD's momentum buffers, Adam's moments: any per-parameter state), the round's global edge-side weights (the
base the round-end delta is taken against), the round plan (which fixes the learning-rate schedule position
together with ``steps``), the data position (``expected`` = next (step, micro), and ``steps`` done), the loss
accumulated so far, the RNG state, and a format version. A SHA-256 over every tensor's name, dtype, shape and
bytes, in a fixed order, travels in the body; together with chunk-level checksums this refuses any
checkpoint that was damaged or tampered with before a single weight is loaded.

Migration happens at a mini-batch boundary, so no gradient is in flight and no gradient cache moves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import TensorSpec

CHECKPOINT_FORMAT = 2
_GROUPS = ("w", "o", "b")  # weights (+ float buffers), optimizer state, base
MAX_OPTIMIZER_STATES = 8  # per parameter: SGD has 1, Adam 3 (exp_avg, exp_avg_sq, step)


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
    optimizer: State  # "<param key>|<state name>" -> tensor; empty before the first optimizer step
    base: State
    expected: tuple[int, int]
    steps: int
    loss_sum: float
    seen: int
    n_micro: int
    rng: np.ndarray  # the stage's RNG state (uint8)

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"rng": np.ascontiguousarray(self.rng, dtype=np.uint8)}
        for prefix, group in zip(_GROUPS, (self.weights, self.optimizer, self.base), strict=True):
            # np.asarray, not ascontiguousarray: that one turns Adam's 0-d step into shape (1,).
            out.update({f"{prefix}/{k}": np.asarray(v, order="C") for k, v in group.items()})
        return out

    def to_message(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        tensors = self.tensors()
        body = {
            "format": CHECKPOINT_FORMAT, "checkpoint_device": self.device, "plan": self.plan.to_body(),
            "cut": self.cut, "expected": list(self.expected), "steps": self.steps, "loss_sum": self.loss_sum,
            "seen": self.seen, "n_micro": self.n_micro, "sha256": digest(tensors),
        }
        return body, tensors

    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.tensors().values())


def digest(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], order="C")
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _check_float(key: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.float32:
        raise CheckpointError("bad_shape", f"checkpoint {key}: {arr.dtype}{arr.shape}, expected float32{shape}")
    if not np.isfinite(arr).all():
        raise CheckpointError("non_finite", f"checkpoint {key} has NaN/Inf")


def from_message(body: Mapping[str, Any], tensors: Mapping[str, np.ndarray], migration: str,
                 reference: Mapping[str, TensorSpec]) -> EdgeCheckpoint:
    """Validate and decode. ``reference``: the edge-side tensors of the model at this cut (keys, shapes; the
    trainable ones may carry optimizer state)."""
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
        groups[prefix][key] = np.array(arr)
    for what, group in (("weights", groups["w"]), ("base", groups["b"])):
        if sorted(group) != sorted(reference):
            raise CheckpointError("bad_shape", f"checkpoint {what} keys do not match the model at this cut")
        for key, spec in reference.items():
            _check_float(f"{what} {key}", group[key], spec.shape)
    per_param: dict[str, int] = {}
    for name, arr in groups["o"].items():
        key, _, state_name = name.partition("|")
        param = reference.get(key)
        if param is None or not param.trainable or not state_name:
            raise CheckpointError("bad_shape", f"optimizer state {name!r} does not match the model")
        per_param[key] = per_param.get(key, 0) + 1
        if per_param[key] > MAX_OPTIMIZER_STATES:
            raise CheckpointError("bad_shape", f"too many optimizer states for {key!r}")
        # Per-parameter state has the parameter's shape (momentum, moments) or is a scalar (Adam's step).
        _check_float(f"optimizer {name}", arr, param.shape if arr.ndim else ())
    rng = tensors.get("rng")
    if rng is None or rng.dtype != np.uint8 or rng.ndim != 1:
        raise CheckpointError("bad_field", "checkpoint lacks a uint8 RNG state")
    try:
        plan = Plan.from_body(body["plan"])
        expected = (int(body["expected"][0]), int(body["expected"][1]))
        ck = EdgeCheckpoint(
            device=str(body["checkpoint_device"]), migration=migration, plan=plan, cut=int(body["cut"]),
            weights=groups["w"], optimizer=groups["o"], base=groups["b"], expected=expected,
            steps=int(body["steps"]), loss_sum=float(body["loss_sum"]), seen=int(body["seen"]),
            n_micro=int(body["n_micro"]), rng=np.array(rng),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError("bad_field", f"checkpoint body: {e}") from e
    if expected[1] != 0:
        raise CheckpointError("bad_field", "checkpoints are taken at mini-batch boundaries (micro must be 0)")
    if min(expected[0], ck.steps, ck.seen, ck.n_micro) < 0 or not np.isfinite(ck.loss_sum):
        raise CheckpointError("bad_field", "checkpoint position out of range")
    return ck
