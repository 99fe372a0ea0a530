"""The round plan: what every participant needs to train one round, carried in every ``model`` message.

:class:`Training` holds the training parameters and their defaults, once: the cloud's settings embed it
(``[cloud]`` keys with these names), and a :class:`Plan` is a ``Training`` stamped with the run, the round
and the attempt. Defaults are FedFly's (SGD lr 0.01, momentum 0.9, batch 100, VGG-5 cut after block 2).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.schema import ModelRef
from mqttfl.wire.encoding import ALLOWED as ENCODINGS_ALLOWED

ENCODED_KINDS = ("act", "grad", "delta", "model")
MAX_INTERVALS = 4096


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
    # Tensor encodings per message kind (docs/algorithms.md, "Compression"); a device may override each.
    act_encoding: str = field(default="none", metadata={"doc": (
        "how split devices send activations: none, fp16, int8 (stochastic, one scale per tensor) or int8c "
        "(one scale per channel)")})
    grad_encoding: str = field(default="none", metadata={"doc": (
        "how edges return gradients at the cut: none, fp16, int8 or int8c")})
    delta_encoding: str = field(default="none", metadata={"doc": (
        "how devices send their round's delta: none, fp16, int8, int8c, or topk (the topk_ratio largest "
        "entries with error feedback)")})
    model_encoding: str = field(default="none", metadata={"doc": (
        "how the round's model travels down (cloud to edge, edge to device): none or fp16")})
    topk_ratio: float = field(default=0.01, metadata={"doc": (
        "fraction of a delta's entries a topk device sends per round; the rest is carried to later rounds")})

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
        for kind in ENCODED_KINDS:
            name = getattr(self, f"{kind}_encoding")
            if name not in ENCODINGS_ALLOWED[kind]:
                out.append(f"{kind}_encoding must be one of {list(ENCODINGS_ALLOWED[kind])}, got {name!r}")
        if not 0 < self.topk_ratio <= 1:
            out.append("topk_ratio must be in (0, 1]")
        return out

    def encodings(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """The encoding of every tensor kind: the plan's, with a device's own choices on top."""
        out = {kind: getattr(self, f"{kind}_encoding") for kind in ENCODED_KINDS}
        out.update({k: v for k, v in (overrides or {}).items() if v})
        return out

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(self.model, tuple(self.input_shape), self.num_classes)


TRAINING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Training))


def check_encodings(value: Any, what: str) -> dict[str, str]:
    """A map of tensor kind -> encoding name from the wire or a config; ProtocolError names what is wrong."""
    if not isinstance(value, Mapping):
        raise ProtocolError("bad_field", f"{what} must be a map")
    out = {}
    for kind, name in value.items():
        if kind not in ENCODINGS_ALLOWED or not isinstance(name, str) or (
                name and name not in ENCODINGS_ALLOWED[kind]):
            raise ProtocolError("bad_field", f"{what}: {kind!r} cannot travel as {name!r}")
        if name:
            out[str(kind)] = name
    return out


@dataclass(frozen=True, kw_only=True)
class Plan(Training):
    run: str
    round: int
    attempt: int = 0
    # Set by the cloud for each round, from its strategy and FedLAMA schedule (not config keys):
    prox_mu: float = 0.0  # FedProx: the proximal term's weight the local training adds (0: none)
    preaggregate: bool = True  # edges send their devices' mean (linear strategies) or each device's delta
    fedlama: bool = False  # FedLAMA: devices and edges keep their local layers between rounds
    intervals: tuple[tuple[str, int], ...] = ()  # FedLAMA: aggregation interval (rounds) of each layer not at 1

    @classmethod
    def of(cls, training: Training, *, run: str, round: int, attempt: int = 0, **changes: Any) -> Plan:
        return cls(**{**asdict(training), **changes}, run=run, round=round, attempt=attempt)

    def to_body(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["intervals"] = dict(self.intervals)
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
            want: Any = {"str": str, "int": int, "float": (int, float), "bool": bool}.get(str(f.type))
            if f.name == "intervals":
                if not isinstance(v, Mapping) or len(v) > MAX_INTERVALS or not all(
                        isinstance(k, str) and isinstance(t, int) and not isinstance(t, bool) and t >= 1
                        for k, t in v.items()):
                    raise ProtocolError("bad_plan", "plan intervals must map layer names to intervals >= 1")
                v = tuple(sorted(v.items()))
            elif f.name == "input_shape":
                if not isinstance(v, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                               for d in v):
                    raise ProtocolError("bad_plan", "plan input_shape must be a list of integers")
                v = tuple(v)
            elif want is bool and not isinstance(v, bool):
                raise ProtocolError("bad_plan", f"plan field {f.name!r} has type {type(v).__name__}")
            elif want is not None and want is not bool and (isinstance(v, bool) or not isinstance(v, want)):
                raise ProtocolError("bad_plan", f"plan field {f.name!r} has type {type(v).__name__}")
            kw[f.name] = float(v) if want == (int, float) else v
        for required in ("run", "round"):
            if required not in kw:
                raise ProtocolError("bad_plan", f"plan lacks {required!r}")
        plan = cls(**kw)
        bad = plan.problems()
        if plan.round < 0 or plan.attempt < 0:
            bad.append("round and attempt must be >= 0")
        if not plan.prox_mu >= 0:
            bad.append("prox_mu must be >= 0")
        if bad:
            raise ProtocolError("bad_plan", "bad plan: " + "; ".join(bad))
        return plan

    def with_(self, **kw: Any) -> Plan:
        return replace(self, **kw)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.run, self.round, self.attempt)

    def due(self, keys: Iterable[str]) -> list[str]:
        """The layers aggregated at the end of this round: all of them, or under FedLAMA those whose interval
        divides the number of rounds done after this one (docs/algorithms.md, "FedLAMA")."""
        iv = dict(self.intervals)
        return [k for k in keys if (self.round + 1) % iv.get(k, 1) == 0]

    def newer_than(self, other: Plan) -> bool:
        """Whether this plan supersedes ``other``: another run, or a later round or attempt of the same run."""
        return self.run != other.run or (self.round, self.attempt) > (other.round, other.attempt)


def data_seed(plan_seed: int, node: str) -> int:
    """Per-device shuffling seed: stable across processes (unlike hash()) so runs are reproducible."""
    return (plan_seed * 1_000_003 + zlib.crc32(node.encode())) % (2**32)


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    """Mini-batches of one epoch; the last may be short (no sample is left out)."""
    return -(-n_samples // batch_size) if n_samples > 0 else 0


def round_steps(n_samples: int, plan: Training) -> int:
    """Mini-batches a device trains in one round: the data position a migration resumes from counts these."""
    return plan.epochs * batches_per_epoch(n_samples, plan.batch_size)
