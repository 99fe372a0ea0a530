"""The round plan: what every participant needs to train one round, carried in every ``model`` message.

:class:`Training` holds the training parameters and their defaults, once: the cloud's settings embed it
(``[cloud]`` keys with these names), and a :class:`Plan` is a ``Training`` stamped with the run, the round
and the attempt. Defaults are FedFly's (SGD lr 0.01, momentum 0.9, batch 100, VGG-5 cut after block 2).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.schema import ModelRef

# Measured on honest runs (MLP, CNN, VGG-5 on digits, 1-5 local epochs): an edge's update reached at most 0.51 of
# the global model's norm, in a first round of 5 epochs from the initial model, and 0.02-0.19 in one epoch
# (docs/design.md, "Trust"). The bound leaves a 6x margin and still refuses an update that would swamp the model.
MAX_UPDATE_NORM = 3.0


@dataclass(frozen=True, kw_only=True)
class Training:
    model: str = field(default="vgg5", metadata={"doc": (
        "the model: vgg5, cnn, mlp, or a user's module:function (docs/models.md)")})
    input_shape: tuple[int, ...] = field(default=(3, 32, 32), metadata={"doc": (
        "shape of one input sample, e.g. [3, 32, 32] or [64]")})
    num_classes: int = field(default=10, metadata={"doc": "number of classes (the model's output size)"})
    lr: float = field(default=0.01, metadata={"doc": "learning rate of local SGD (device and edge stages)"})
    momentum: float = field(default=0.9, metadata={"doc": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"doc": "SGD weight decay"})
    epochs: int = field(default=1, metadata={"doc": "local epochs per round"})
    batch_size: int = field(default=100, metadata={"doc": "mini-batch size on the devices"})
    micro_batches: int = field(default=1, metadata={"doc": (
        "micro-batches per mini-batch kept in flight on a split device (1F1B)")})
    deadline_s: float = field(default=120.0, metadata={"doc": (
        "a round's deadline in seconds; below quorum at the deadline the round is retried")})
    seed: int = field(default=0, metadata={"doc": "seed of the initial model and of every device's batch order"})
    max_update_norm: float = field(default=MAX_UPDATE_NORM, metadata={"doc": (
        "an update (a device's at its edge, an edge's at the cloud) whose L2 norm exceeds this many times the "
        "global model's is refused; 0: no bound")})
    resume_every: int = field(default=10, metadata={"doc": (
        "an edge saves each device's edge-side session every this many mini-batches and the device keeps its "
        "own state at the same boundaries, so a restarted edge resumes the round there (0: off)")})

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when usable)."""
        out = []
        if not isinstance(self.model, str) or not self.model:
            out.append("model must be a non-empty name or module:function")
        if not self.input_shape or any(not isinstance(d, int) or d < 1 for d in self.input_shape):
            out.append(f"input_shape must be positive integers, got {self.input_shape}")
        if self.num_classes < 1:
            out.append("num_classes must be >= 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            out.append("lr must be > 0")
        if not 0 <= self.momentum < 1:
            out.append("momentum must be in [0, 1)")
        if not self.weight_decay >= 0:
            out.append("weight_decay must be >= 0")
        if self.epochs < 1:
            out.append("epochs must be >= 1")
        if self.batch_size < 1:
            out.append("batch_size must be >= 1")
        if self.micro_batches < 1:
            out.append("micro_batches must be >= 1")
        if not self.deadline_s > 0:
            out.append("deadline_s must be > 0")
        if self.seed < 0:
            out.append("seed must be >= 0")
        if not (isinstance(self.max_update_norm, (int, float)) and self.max_update_norm >= 0):
            out.append("max_update_norm must be >= 0")
        if self.resume_every < 0:
            out.append("resume_every must be >= 0")
        return out

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(self.model, tuple(self.input_shape), self.num_classes)


TRAINING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Training))


@dataclass(frozen=True, kw_only=True)
class Plan(Training):
    run: str
    round: int
    attempt: int = 0

    @classmethod
    def of(cls, training: Training, *, run: str, round: int, attempt: int = 0, **changes: Any) -> Plan:
        return cls(**{**asdict(training), **changes}, run=run, round=round, attempt=attempt)

    def to_body(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_body(cls, body: Any) -> Plan:
        if not isinstance(body, Mapping):
            raise ProtocolError("bad_plan", "plan must be a map")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in body:
                continue
            v = body[f.name]
            want: Any = {"str": str, "int": int, "float": (int, float)}.get(str(f.type))
            if f.name == "input_shape":
                if not isinstance(v, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                               for d in v):
                    raise ProtocolError("bad_plan", "plan input_shape must be a list of integers")
                v = tuple(v)
            elif want is not None and (isinstance(v, bool) or not isinstance(v, want)):
                raise ProtocolError("bad_plan", f"plan field {f.name!r} has type {type(v).__name__}")
            kw[f.name] = float(v) if want == (int, float) else v
        for required in ("run", "round"):
            if required not in kw:
                raise ProtocolError("bad_plan", f"plan lacks {required!r}")
        plan = cls(**kw)
        bad = plan.problems()
        if plan.round < 0 or plan.attempt < 0:
            bad.append("round and attempt must be >= 0")
        if bad:
            raise ProtocolError("bad_plan", "bad plan: " + "; ".join(bad))
        return plan

    def with_(self, **kw: Any) -> Plan:
        return replace(self, **kw)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.run, self.round, self.attempt)

    def newer_than(self, other: Plan) -> bool:
        """Whether this plan supersedes ``other``: another run, or a later round or attempt of the same run."""
        return self.run != other.run or (self.round, self.attempt) > (other.round, other.attempt)


def reconnect_within(deadline_s: float) -> float:
    """How often a node taking part in a round retries a lost link: a twentieth of the round's deadline, at
    least once a second. A node whose link comes back is then back within deadline_s / 20, long before its
    edge closes the round at ``deadline_fraction`` (docs/design.md, "Transport")."""
    return max(1.0, deadline_s / 20.0)


def data_seed(plan_seed: int, node: str) -> int:
    """Per-device shuffling seed: stable across processes (unlike hash()) so runs are reproducible."""
    return (plan_seed * 1_000_003 + zlib.crc32(node.encode())) % (2**32)


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    """Mini-batches of one epoch; the last may be short (no sample is left out)."""
    return -(-n_samples // batch_size) if n_samples > 0 else 0


def round_steps(n_samples: int, plan: Training) -> int:
    """Mini-batches a device trains in one round: the data position a migration resumes from counts these."""
    return plan.epochs * batches_per_epoch(n_samples, plan.batch_size)
