"""The split-FL round protocol: message bodies shared by cloud, edges and devices (no I/O here).

Round r, synchronous (SplitFed V1, DESIGN §5):

    cloud --model(plan, full global state)--> edge          one per edge with participants
    edge  --model(plan, cut, device part)---> device        edges forward the device-side layers
    device --act(step, micro, smashed, y)---> edge          1F1B: up to min(M, 3) micro-batches in flight
    edge  --grad(step, micro, dA)-----------> device        cached: a re-sent act gets the same grad back
    device --delta(device part - global)----> edge          reliable (outbox + application ack)
    edge  --delta(sample-weighted mean of its devices' full-model deltas)--> cloud   reliable
    cloud: FedAvg over edges weighted by samples == flat FedAvg over devices; evaluate; persist; next round

A device whose cut equals the number of blocks trains locally (classic FL) and sends only its delta.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

FORMAT_VERSION = 1


class ProtocolError(ValueError):
    """A message that is well-formed on the wire but wrong for the protocol (round, shape, sender)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Plan:
    """Everything a participant needs to train one round; travels in every ``model`` message."""

    run: str
    round: int
    attempt: int = 0
    model: str = "vgg5"
    input_shape: tuple[int, ...] = (3, 32, 32)
    num_classes: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 100
    micro_batches: int = 1
    deadline_s: float = 120.0
    seed: int = 0

    def to_body(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Plan:
        names = {f.name for f in fields(cls)}
        try:
            kw = {k: v for k, v in body.items() if k in names}
            kw["input_shape"] = tuple(int(v) for v in kw.get("input_shape", (3, 32, 32)))
            plan = cls(**kw)
        except (TypeError, ValueError) as e:
            raise ProtocolError("bad_plan", f"bad plan: {e}") from e
        if plan.batch_size < 1 or plan.micro_batches < 1 or plan.epochs < 0 or not plan.lr > 0:
            raise ProtocolError("bad_plan", f"bad plan values: {plan}")
        return plan

    def with_(self, **kw: Any) -> Plan:
        return replace(self, **kw)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.run, self.round, self.attempt)


def data_seed(plan_seed: int, node: str) -> int:
    """Per-device shuffling seed: stable across processes (unlike hash()) so runs are reproducible."""
    return (plan_seed * 1_000_003 + zlib.crc32(node.encode())) % (2**32)


def prefixed(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in state.items()}


def unprefixed(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_state(state: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str) -> None:
    """Same keys, shapes and float dtype as the reference — a wrong model never touches ours."""
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ProtocolError("bad_shape", f"{what}: keys differ (missing {missing}, unexpected {extra})")
    for k, ref in expected.items():
        v = state[k]
        if v.shape != ref.shape:
            raise ProtocolError("bad_shape", f"{what}: {k} has shape {v.shape}, expected {ref.shape}")
        if v.dtype.kind != "f":
            raise ProtocolError("bad_dtype", f"{what}: {k} has dtype {v.dtype}, expected float")
        if not np.isfinite(v).all():
            raise ProtocolError("non_finite", f"{what}: {k} has NaN/Inf")


# What a device may report with its delta, and the type each field must have. The edge forwards only
# these, converted, so a malformed report can never reach the cloud's aggregation or metrics.
REPORT_FIELDS: dict[str, type] = {
    "samples": int, "steps": int, "loss_sum": float, "correct": int, "seen": int, "cut": int, "attempt": int,
    "t_local": float, "t_download": float, "t_total": float, "bytes_up": int, "bytes_down": int,
    "peak_rss_mb": float, "resends": int,
}


def clean_report(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in REPORT_FIELDS.items():
        if name not in body:
            continue
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError("bad_field", f"report field {name!r} must be a number, got {type(value).__name__}")
        if value != value or value in (float("inf"), float("-inf")) or value < 0:
            raise ProtocolError("bad_field", f"report field {name!r} out of range: {value!r}")
        out[name] = kind(value)
    return out


def check_activation(smashed: np.ndarray, labels: np.ndarray, expected_shape: tuple[int, ...],
                     num_classes: int, max_rows: int) -> None:
    if smashed.dtype != np.float32:
        raise ProtocolError("bad_dtype", f"activations must be float32, got {smashed.dtype}")
    if tuple(smashed.shape[1:]) != tuple(expected_shape):
        raise ProtocolError("bad_shape", f"activations {tuple(smashed.shape)}, expected (n, *{expected_shape})")
    if labels.dtype != np.int64 or labels.ndim != 1 or labels.shape[0] != smashed.shape[0]:
        raise ProtocolError("bad_shape", f"labels {labels.dtype}{labels.shape} do not match {smashed.shape[0]} rows")
    if not np.isfinite(smashed).all():
        raise ProtocolError("non_finite", "activations have NaN/Inf")
    if not 0 < smashed.shape[0] <= max_rows:
        raise ProtocolError("bad_shape", f"{smashed.shape[0]} rows outside 1..{max_rows}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ProtocolError("bad_labels", f"labels outside 0..{num_classes - 1}")
