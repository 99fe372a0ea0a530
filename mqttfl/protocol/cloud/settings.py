"""The cloud's run settings: ``[cloud]`` keys, checked once, each with one default.

``[cloud]`` is flat for operators; here it is three parts: the training parameters every plan carries
(:class:`~mqttfl.protocol.plan.Training`), the strategy's parameters
(:class:`~mqttfl.fl.strategies.StrategyParams`) and how the run proceeds (this class). An unknown key is
refused with its name, never ignored.

Precedence (docs/operations.md, "Runs"): a run's settings are the config's at the run's start plus the
operator's ``set`` commands; they are persisted with the run and win over an edited config file after a
restart (the cloud logs and reports the keys that differ). ``new-run`` starts a run from the config file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mqttfl.fl import strategies
from mqttfl.fl.staleness import by_name as staleness_by_name
from mqttfl.protocol.hetero import DeviceClass
from mqttfl.protocol.plan import TRAINING_FIELDS, Training
from mqttfl.wire.topics import TopicError, validate_id

PARAM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(strategies.StrategyParams))
MODES = ("sync", "async")


@dataclass(frozen=True, kw_only=True)
class CloudSettings:
    run: str = field(default="", metadata={"doc": "the run's id; empty: a new run-xxxxxxxx id at the first start"})
    rounds: int = field(default=20, metadata={"doc": "synchronous rounds to run"})
    quorum: float = field(default=0.5, metadata={"doc": (
        "fraction of a round's devices that must report for the round to count")})
    max_attempts: int = field(default=3, metadata={"doc": (
        "a round below quorum is retried; after this many misses in a row the run fails")})
    min_devices: int = field(default=1, metadata={"doc": "online devices (with an online edge) before a round starts"})
    wait_for: tuple[str, ...] = field(default=(), metadata={"doc": (
        "device ids that round 0 of a run waits for (online, with an online edge); with start_grace_s > 0 it "
        "starts without the missing ones once the grace period is over")})
    start_grace_s: float = field(default=0.0, metadata={"doc": (
        "round 0 waits this long after min_devices are online (for wait_for, or for more devices to join); 0: "
        "no grace (start at once, or wait for every device in wait_for)")})
    sample_fraction: float = field(default=1.0, metadata={"doc": (
        "sync: fraction of the online devices that train each round (client sampling, seeded by seed and round)")})
    sample_size: int = field(default=0, metadata={"doc": (
        "sync: devices that train each round (client sampling; overrides sample_fraction when > 0)")})
    fed_eval_every: int = field(default=0, metadata={"doc": (
        "sync: every this many rounds (and after the last), devices with eval_data evaluate the global model and "
        "the cloud reports the weighted result beside its own (federated evaluation); 0: never")})
    metrics_devices: int = field(default=100, metadata={"doc": (
        "a round's metrics list each device's costs when the round had at most this many devices; a larger "
        "round's metrics carry the per-class costs and the slowest devices only (the run log has every device)")})
    max_samples: int = field(default=0, metadata={"doc": (
        "a device declaring more samples than this when it joins is left out of rounds (0: no cap); a report "
        "never counts more samples than its device declared")})
    cut: int = field(default=-1, metadata={"doc": (
        "split point for devices that set none: blocks [0, cut) on the device; -1: the model's default")})
    autostart: bool = field(default=True, metadata={"doc": (
        "start the run when the cloud starts (else wait for the start command)")})
    mode: str = field(default="sync", metadata={"doc": (
        "sync (rounds) or async (group aggregation into global versions, docs/async.md)")})
    strategy: str = field(default="", metadata={"doc": (
        "aggregation strategy; empty: fedavg (sync), ecofl (async); see docs/async.md")})
    # Asynchronous group aggregation (docs/async.md)
    num_groups: int = field(default=3, metadata={"doc": "async: number of groups (Eco-FL) or tiers (FedAT)"})
    group_deadline_s: float = field(default=60.0, metadata={"doc": "async: deadline of a group round, seconds"})
    max_versions: int = field(default=50, metadata={"doc": "async: global versions to produce"})
    regroup_every: int = field(default=10, metadata={"doc": (
        "async, ecofl: regroup every this many versions (0: never)")})
    lam: float = field(default=1.0, metadata={"doc": (
        "async, ecofl: weight of the label-mix term in the grouping objective")})
    latency_ema: float = field(default=0.3, metadata={"doc": (
        "async: weight of a new latency measurement in each device's moving average")})
    profile_rounds: int = field(default=2, metadata={"doc": (
        "async: synchronous rounds with everyone before groups are formed")})
    # FedLAMA layer-wise aggregation intervals (docs/algorithms.md, "FedLAMA")
    fedlama_phi: int = field(default=0, metadata={"doc": (
        "sync: FedLAMA's interval multiplier phi (layers whose copies agree are aggregated every phi rounds, "
        "and only the layers due travel); 0: off, 1: every layer every round through the layer-wise path")})
    fedlama_warmup: int = field(default=1, metadata={"doc": (
        "sync, FedLAMA: windows of phi rounds before intervals are first adjusted")})
    # Heterogeneous devices (docs/algorithms.md, "Split-point planning", "Heterogeneous devices")
    plan_cuts: bool = field(default=False, metadata={"doc": (
        "sync: devices and edges report profiles (per-block time and memory, the device's link) and the cloud "
        "chooses each device's cut before every round to minimise its time under its memory limit; a device's "
        "own [device] cut wins; [cloud] cut (or the model's default) holds until a device's profile is in")})
    probe_every: int = field(default=5, metadata={"doc": (
        "sync, plan_cuts: a device probes its link to its edge (four round trips before it trains) every this "
        "many rounds, and at once in a new run, at a new edge, after a restart, after a failed probe, and when "
        "its split mini-batches' round trips changed by 2x from one round to the next; 1: every round")})
    classes: Mapping[str, DeviceClass] = field(default_factory=dict, metadata={"doc": (
        "device classes: [cloud.classes.NAME] tables (keys below) saying what a device whose [device] class is "
        "NAME trains, its cutoff and its power; devices of an unlisted class, and class default unless listed, "
        "train the whole model")})
    training: Training = field(default_factory=Training)
    params: strategies.StrategyParams = field(default_factory=strategies.StrategyParams)

    @property
    def strategy_name(self) -> str:
        return self.strategy or ("fedavg" if self.mode == "sync" else "ecofl")

    def problems(self) -> list[str]:
        out = list(self.training.problems())
        if self.mode not in MODES:
            out.append(f"mode must be one of {MODES}, got {self.mode!r}")
        elif self.strategy_name not in strategies.names(synchronous=self.mode == "sync"):
            out.append(f"strategy {self.strategy_name!r} is not a {self.mode} strategy; known: "
                       f"{strategies.names(synchronous=self.mode == 'sync')}")
        try:
            staleness_by_name(self.params.staleness)
        except ValueError as e:
            out.append(str(e))
        if self.rounds < 0 or self.max_versions < 0 or self.regroup_every < 0:
            out.append("rounds, max_versions and regroup_every must be >= 0")
        if not 0 < self.quorum <= 1:
            out.append("quorum must be in (0, 1]")
        if self.max_samples < 0:
            out.append("max_samples must be >= 0")
        if self.metrics_devices < 0:
            out.append("metrics_devices must be >= 0")
        if self.max_attempts < 1 or self.min_devices < 1 or self.num_groups < 1 or self.profile_rounds < 1 \
                or self.probe_every < 1:
            out.append("max_attempts, min_devices, num_groups, profile_rounds and probe_every must be >= 1")
        if self.cut == 0 or self.cut < -1:
            out.append("cut must be >= 1 (a device keeps at least one block: raw inputs never leave it) or -1")
        if not 0 < self.params.alpha <= 1:
            out.append("alpha must be in (0, 1]")
        if self.params.fedbuff_k < 1:
            out.append("fedbuff_k must be >= 1")
        if not self.group_deadline_s > 0 or not 0 < self.latency_ema <= 1 or self.lam < 0:
            out.append("group_deadline_s must be > 0, latency_ema in (0, 1], lam >= 0")
        if not 0 < self.sample_fraction <= 1 or self.sample_size < 0 or self.fed_eval_every < 0:
            out.append("sample_fraction must be in (0, 1], sample_size and fed_eval_every >= 0")
        if self.mode != "sync" and (self.sample_fraction != 1 or self.sample_size or self.fed_eval_every):
            out.append("client sampling and federated evaluation are for mode sync")
        if self.start_grace_s < 0 or len(set(self.wait_for)) != len(self.wait_for):
            out.append("start_grace_s must be >= 0 and wait_for must not repeat a device")
        for device in self.wait_for:
            try:
                validate_id(device)
            except TopicError as e:
                out.append(f"wait_for: {e}")
        if self.fedlama_phi < 0 or self.fedlama_warmup < 1:
            out.append("fedlama_phi must be >= 0 and fedlama_warmup >= 1")
        if self.fedlama_phi and self.mode != "sync":
            out.append("fedlama_phi needs mode = \"sync\"")
        if self.plan_cuts and self.mode != "sync":
            out.append("plan_cuts needs mode = \"sync\"")
        for name, c in self.classes.items():
            try:
                validate_id(name)
            except TopicError as e:
                out.append(f"classes: {e}")
            if c.plain:
                continue
            if self.mode != "sync" or self.fedlama_phi:
                out.append(f"class {name}: device classes with their own local model or cutoff need mode = "
                           f"\"sync\" without fedlama_phi")
            elif c.train != "full" and self.strategy_name in strategies.REGISTRY and \
                    not strategies.make_strategy(self.strategy_name, self.params).masks:
                out.append(f"class {name}: a {c.train} model covers part of the model, which strategy "
                           f"{self.strategy_name} cannot aggregate (fedavg, fedprox and fednova can)")
        out += self.params.problems()
        return out

    def flat(self) -> dict[str, Any]:
        """The ``[cloud]`` keys and values (for persistence, status and the config reference)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("training", "params")}
        out["wait_for"] = list(self.wait_for)
        out["classes"] = {name: c.flat() for name, c in sorted(self.classes.items())}
        out.update(asdict(self.training))
        out["input_shape"] = list(self.training.input_shape)
        out.update(asdict(self.params))
        return out

    def with_values(self, values: Mapping[str, Any]) -> CloudSettings:
        """These settings with ``values`` (flat ``[cloud]`` keys) applied; ValueError names a bad key."""
        own = {f.name for f in fields(self)} - {"training", "params"}
        unknown = set(values) - own - set(TRAINING_FIELDS) - set(PARAM_FIELDS)
        if unknown:
            known = sorted(own | set(TRAINING_FIELDS) | set(PARAM_FIELDS))
            raise ValueError(f"[cloud]: unknown keys {sorted(unknown)}; known: {known}")
        top = {k: v for k, v in values.items() if k in own}
        if "wait_for" in top:
            top["wait_for"] = tuple(top["wait_for"])
        if "classes" in top:
            if not isinstance(top["classes"], Mapping):
                raise ValueError("[cloud] classes must be a table of [cloud.classes.NAME] tables")
            top["classes"] = {str(n): DeviceClass.of(str(n), v) for n, v in top["classes"].items()}
        train = {k: v for k, v in values.items() if k in TRAINING_FIELDS}
        if "input_shape" in train:
            train["input_shape"] = tuple(train["input_shape"])
        par = {k: v for k, v in values.items() if k in PARAM_FIELDS}
        for name, v in values.items():
            want = _field_type(name)
            if want is not None and not _is(v, want):
                raise ValueError(f"[cloud] {name} must be {want}, got {type(v).__name__} {v!r}")
        try:
            return replace(self, **top, training=replace(self.training, **train), params=replace(self.params, **par))
        except TypeError as e:
            raise ValueError(f"[cloud]: {e}") from e

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> CloudSettings:
        s = cls().with_values(section)
        bad = s.problems()
        if bad:
            raise ValueError("[cloud]: " + "; ".join(bad))
        return s


def _field_type(name: str) -> str | None:
    for dc in (CloudSettings, Training, strategies.StrategyParams):
        for f in fields(dc):
            if f.name == name and f.name not in ("training", "params"):
                return str(f.type)
    return None


def _is(v: Any, want: str) -> bool:
    if want == "bool":
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    if want == "int":
        return isinstance(v, int)
    if want == "float":
        return isinstance(v, (int, float))
    if want == "str":
        return isinstance(v, str)
    if want.startswith("tuple[str"):
        return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
    if want.startswith("tuple"):
        return isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    return True
