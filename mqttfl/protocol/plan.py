"""The round plan: what every participant needs to train one round, carried in every ``model`` message.

:class:`Training` holds the training parameters and their defaults, once: the cloud's settings embed it
(``[cloud]`` keys with these names), and a :class:`Plan` is a ``Training`` stamped with the run, the round
and the attempt. Defaults are FedFly's (SGD lr 0.01, momentum 0.9, batch 100, VGG-5 cut after block 2).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.schema import ModelRef
from mqttfl.wire.encoding import ALLOWED as ENCODINGS_ALLOWED

ENCODED_KINDS = ("act", "grad", "delta", "model")
MAX_INTERVALS = 4096

OPTIMIZERS = ("sgd", "adam", "adamw")
# The loss names the task: what the labels are, and which metrics the cloud reports (docs/models.md, "Tasks").
TASKS = {"cross_entropy": "classification", "mse": "regression", "bce_with_logits": "multilabel"}
# The metric that names a run's best model, and whether higher is better.
BEST_METRIC = {"classification": ("accuracy", True), "regression": ("mse", False), "multilabel": ("accuracy", True)}
LR_SCHEDULES = ("constant", "step", "exponential", "cosine")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")  # mqttfl.protocol.schedule: the stages' orders of work
PARTITIONS = ("dp", "equal")
# Measured on honest runs (MLP, CNN, VGG-5 on digits, 1-5 local epochs): an edge's update reached at most 0.51 of
# the global model's norm, in a first round of 5 epochs from the initial model, and 0.02-0.19 in one epoch
# (docs/design.md, "Trust"). The bound leaves a 6x margin and still refuses an update that would swamp the model.
MAX_UPDATE_NORM = 3.0


@dataclass(frozen=True, kw_only=True)
class Training:
    model: str = field(default="vgg5", metadata={"doc": (
        "the model: vgg5, cnn, mlp, a user's module:function or an entry point of mqttfl.models (docs/models.md)")})
    input_shape: tuple[int, ...] = field(default=(3, 32, 32), metadata={"doc": (
        "shape of one input sample, e.g. [3, 32, 32] or [64]")})
    num_classes: int = field(default=10, metadata={"doc": (
        "the model's output size: classes (cross_entropy), targets (mse) or labels (bce_with_logits)")})
    loss: str = field(default="cross_entropy", metadata={"doc": (
        "cross_entropy (classification: integer labels), mse (regression: float targets) or bce_with_logits "
        "(multi-label: 0/1 per label); it sets the metrics the cloud reports")})
    optimizer: str = field(default="sgd", metadata={"doc": "local optimizer of every stage: sgd, adam or adamw"})
    lr: float = field(default=0.01, metadata={"doc": (
        "learning rate of the local optimizer (device and edge stages); the schedule starts from it")})
    momentum: float = field(default=0.9, metadata={"doc": "sgd: momentum"})
    nesterov: bool = field(default=False, metadata={"doc": "sgd: Nesterov momentum (needs momentum > 0)"})
    weight_decay: float = field(default=0.0, metadata={"doc": (
        "L2 penalty (sgd, adam) or decoupled weight decay (adamw)")})
    beta1: float = field(default=0.9, metadata={"doc": "adam, adamw: decay of the first moment"})
    beta2: float = field(default=0.999, metadata={"doc": "adam, adamw: decay of the second moment"})
    eps: float = field(default=1e-8, metadata={"doc": "adam, adamw: term added to the denominator"})
    lr_schedule: str = field(default="constant", metadata={"doc": (
        "learning rate per round: constant, step (x lr_gamma every lr_step_rounds), exponential (x lr_gamma "
        "each round) or cosine (from lr to lr_min over the run's rounds, or versions in async mode)")})
    lr_gamma: float = field(default=0.1, metadata={"doc": "step and exponential schedules: the decay factor"})
    lr_step_rounds: int = field(default=10, metadata={"doc": "step schedule: rounds between two decays"})
    lr_min: float = field(default=0.0, metadata={"doc": "cosine schedule: the learning rate it ends near"})
    clip_norm: float = field(default=0.0, metadata={"doc": (
        "clip each parameter tensor's gradient to this L2 norm before a step (0: off); per tensor, so a split "
        "model clips exactly as the unsplit one")})
    clip_value: float = field(default=0.0, metadata={"doc": (
        "clamp every gradient element to [-clip_value, clip_value] before a step (0: off)")})
    epochs: int = field(default=1, metadata={"doc": "local epochs per round"})
    batch_size: int = field(default=100, metadata={"doc": "mini-batch size on the devices"})
    micro_batches: int = field(default=1, metadata={"doc": (
        "micro-batches per mini-batch kept in flight on a split device (1F1B)")})
    deadline_s: float = field(default=120.0, metadata={"doc": (
        "a round's deadline in seconds; below quorum at the deadline the round is retried")})
    seed: int = field(default=0, metadata={"doc": (
        "seed of the initial model, of every device's batch order and of client sampling")})
    max_update_norm: float = field(default=MAX_UPDATE_NORM, metadata={"doc": (
        "an update (a device's at its edge, an edge's at the cloud) whose L2 norm exceeds this many times the "
        "global model's is refused; 0: no bound")})
    resume_every: int = field(default=10, metadata={"doc": (
        "an edge saves each device's edge-side session every this many mini-batches and the device keeps its "
        "own state at the same boundaries, so a restarted edge resumes the round there (0: off)")})
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
    # Eco-FL pipelines across a device's helpers ([cloud] chains; docs/design.md, "Pipeline")
    pipeline_schedule: str = field(default="1f1b", metadata={"doc": (
        "schedule of a pipelined device's stages: 1f1b (K_s = min(M, 2(S-s)-1) forwards before the first "
        "backward) or gpipe (every forward, then every backward: stashes M micro-batches per stage)")})
    partition: str = field(default="dp", metadata={"doc": (
        "how a pipelined device spreads the model's blocks over its stages: dp (the planner, from the stages' "
        "profiles, minimising the slowest stage within each stage's memory) or equal (as many blocks each)")})
    rebalance_threshold: float = field(default=0.15, metadata={"doc": (
        "a pipelined device re-plans when its slowest stage measures more than this fraction above the plan "
        "for rebalance_windows mini-batches in a row, and moves layers at the next flush; 0: never")})
    rebalance_windows: int = field(default=3, metadata={"doc": (
        "mini-batches in a row beyond rebalance_threshold before a pipelined device re-plans")})

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when usable)."""
        out = []
        if not isinstance(self.model, str) or not self.model:
            out.append("model must be a non-empty name or module:function")
        if not self.input_shape or any(not isinstance(d, int) or d < 1 for d in self.input_shape):
            out.append(f"input_shape must be positive integers, got {self.input_shape}")
        if self.num_classes < 1:
            out.append("num_classes must be >= 1")
        if self.loss not in TASKS:
            out.append(f"loss must be one of {sorted(TASKS)}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            out.append("lr must be > 0")
        if not 0 <= self.momentum < 1:
            out.append("momentum must be in [0, 1)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            out.append("nesterov needs optimizer sgd and momentum > 0")
        if not self.weight_decay >= 0:
            out.append("weight_decay must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            out.append("beta1 and beta2 must be in [0, 1) and eps > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            out.append(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not (0 < self.lr_gamma <= 1 and self.lr_step_rounds >= 1 and 0 <= self.lr_min < self.lr):
            out.append("lr_gamma must be in (0, 1], lr_step_rounds >= 1 and lr_min in [0, lr)")
        if not (self.clip_norm >= 0 and self.clip_value >= 0):
            out.append("clip_norm and clip_value must be >= 0 (0: off)")
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
        for kind in ENCODED_KINDS:
            name = getattr(self, f"{kind}_encoding")
            if name not in ENCODINGS_ALLOWED[kind]:
                out.append(f"{kind}_encoding must be one of {list(ENCODINGS_ALLOWED[kind])}, got {name!r}")
        if not 0 < self.topk_ratio <= 1:
            out.append("topk_ratio must be in (0, 1]")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            out.append(f"pipeline_schedule must be one of {list(PIPELINE_SCHEDULES)}, "
                       f"got {self.pipeline_schedule!r}")
        if self.partition not in PARTITIONS:
            out.append(f"partition must be one of {list(PARTITIONS)}, got {self.partition!r}")
        if not (self.rebalance_threshold >= 0 and self.rebalance_windows >= 1):
            out.append("rebalance_threshold must be >= 0 and rebalance_windows >= 1")
        return out

    def encodings(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """The encoding of every tensor kind: the plan's, with a device's own choices on top."""
        out = {kind: getattr(self, f"{kind}_encoding") for kind in ENCODED_KINDS}
        out.update({k: v for k, v in (overrides or {}).items() if v})
        return out

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(self.model, tuple(self.input_shape), self.num_classes)

    @property
    def task(self) -> str:
        return TASKS.get(self.loss, "classification")


@dataclass(frozen=True)
class LabelFormat:
    """What a device's labels are: ``kind`` ``class`` (``width`` = largest label + 1) or ``target`` (``width``
    floats per sample). A device refuses a plan its labels cannot train (:meth:`problem`)."""

    kind: str
    width: int

    def problem(self, plan: Training) -> str | None:
        """Why these labels cannot train the plan's model with its loss, or None."""
        if plan.loss == "cross_entropy":
            if self.kind != "class":
                return f"loss cross_entropy needs integer class labels; this data has {self.width} float targets"
            if self.width > plan.num_classes:
                return f"labels go up to {self.width - 1} but the run has num_classes = {plan.num_classes}"
            return None
        if self.kind != "target" or self.width != plan.num_classes:
            what = f"{self.width} float targets" if self.kind == "target" else "integer class labels"
            return (f"loss {plan.loss} needs {plan.num_classes} float targets per sample (num_classes); "
                    f"this data has {what}")
        return None


def round_lr(t: Training, position: int, horizon: int) -> float:
    """The learning rate of a round at ``position`` (rounds, or global versions, completed) of ``horizon``.

    The cloud stamps it into each round's plan, so devices and edges, the migration checkpoint and the unsplit
    reference all train with the same rate without knowing the schedule."""
    p = max(0, position)
    lr = float(t.lr)
    if t.lr_schedule == "step":
        lr = t.lr * t.lr_gamma ** (p // t.lr_step_rounds)
    elif t.lr_schedule == "exponential":
        lr = t.lr * t.lr_gamma ** p
    elif t.lr_schedule == "cosine":
        # Clamped one short of the horizon: the last round still trains (lr_min may be 0).
        p = min(p, max(horizon - 1, 0))
        lr = t.lr_min + (t.lr - t.lr_min) * (1 + math.cos(math.pi * p / max(horizon, 1))) / 2
    return max(lr, 1e-300)  # a plan's lr must stay > 0 however long a decay runs


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
    # The cloud's ModelSchema.fingerprint: a node whose own build of the model differs refuses the round.
    fingerprint: str = ""
    # Set by the cloud for each round, from its strategy and FedLAMA schedule (not config keys):
    prox_mu: float = 0.0  # FedProx: the proximal term's weight the local training adds (0: none)
    preaggregate: bool = True  # edges send their devices' mean (linear strategies) or each device's delta
    fedlama: bool = False  # FedLAMA: devices and edges keep their local layers between rounds
    intervals: tuple[tuple[str, int], ...] = ()  # FedLAMA: aggregation interval (rounds) of each layer not at 1
    profile: bool = False  # split-point planning: devices and edges report their profiles (docs/algorithms.md)
    probe_every: int = 1  # split-point planning: a device's link measurement serves this many rounds

    @classmethod
    def of(cls, training: Training, *, run: str, round: int, attempt: int = 0, **changes: Any) -> Plan:
        return cls(**{**asdict(training), **changes}, run=run, round=round, attempt=attempt)

    def to_body(self) -> dict[str, Any]:
        # Field by field, not asdict: every message of a round carries its plan, and asdict's deep copy was a
        # noticeable share of a thousand-client round in memory.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
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
            elif want is not None and (isinstance(v, bool) != (want is bool) or not isinstance(v, want)):
                raise ProtocolError("bad_plan", f"plan field {f.name!r} has type {type(v).__name__}")
            kw[f.name] = float(v) if want == (int, float) else v
        for required in ("run", "round"):
            if required not in kw:
                raise ProtocolError("bad_plan", f"plan lacks {required!r}")
        plan = cls(**kw)
        bad = plan.problems()
        if len(plan.fingerprint) > 64:
            bad.append("fingerprint is too long")
        if plan.round < 0 or plan.attempt < 0:
            bad.append("round and attempt must be >= 0")
        if not plan.prox_mu >= 0:
            bad.append("prox_mu must be >= 0")
        if bad:
            raise ProtocolError("bad_plan", "bad plan: " + "; ".join(bad))
        return plan

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
