"""Agent configuration: one TOML file per agent plus environment overrides.

Overrides use ``MQTTFL_<KEY>`` for top-level keys and ``MQTTFL_<SECTION>__<KEY>`` for sections
(``MQTTFL_MQTT__HOST=broker.lan``). Values from the environment are parsed as TOML scalars when they can
be (numbers, booleans, arrays), otherwise taken as strings. This keeps systemd units free of config
templating: ``Environment=MQTTFL_MQTT__PORT=8883`` is enough.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mqttfl.protocol.cloud.roles import ROLE_KEYS, Roles
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.wire.codec import Limits
from mqttfl.wire.encoding import ALLOWED as ENCODINGS_ALLOWED
from mqttfl.wire.topics import validate_id

# [limits] keys an operator may set (sizes in bytes or elements); the rest of Limits stays fixed.
LIMIT_KEYS = ("max_message_bytes", "max_tensor_elements", "max_total_elements", "max_tensors", "max_json_bytes")
MIB = 1024 * 1024

ENV_PREFIX = "MQTTFL_"
# MQTTFL_* variables that are not config keys: MQTTFL_CONFIG names the file itself (the agents' --config default).
ENV_NOT_KEYS = frozenset({"MQTTFL_CONFIG"})


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class MqttConfig:
    host: str = field(default="127.0.0.1", metadata={"doc": "broker address"})
    port: int = field(default=1883, metadata={"doc": "broker port"})
    tls: bool = field(default=False, metadata={"doc": "use TLS (required with a password to a non-loopback broker)"})
    ca_file: str = field(default="", metadata={"doc": "CA certificate for TLS (broker_config/gen-ca.sh)"})
    cert_file: str = field(default="", metadata={"doc": "client certificate, for mutual TLS"})
    key_file: str = field(default="", metadata={"doc": "client key, for mutual TLS"})
    username: str = field(default="", metadata={"doc": (
        "MQTT user name; defaults to the node id when a password is configured")})
    password_file: str = field(default="", metadata={"doc": (
        "file holding the password; default: $CREDENTIALS_DIRECTORY/mqtt-password when present")})
    password: str = ""  # resolved from password_file; never written to logs
    keepalive: int = field(default=30, metadata={"doc": "MQTT keepalive, seconds"})
    session_expiry: int = field(default=3600, metadata={"doc": (
        "how long the broker keeps an offline node's session and queue, seconds (> 0)")})
    chunk_bytes: int = field(default=1024 * 1024, metadata={"doc": (
        "payloads larger than this travel as chunks of at most this size")})
    inbox_size: int = field(default=4096, metadata={"doc": (
        "bound of the queue between the network thread and the agent's loop (messages)")})
    reconnect_min_s: float = field(default=0.5, metadata={"doc": (
        "first reconnect delay, seconds (doubles, with jitter)")})
    reconnect_max_s: float = field(default=30.0, metadata={"doc": "longest reconnect delay, seconds"})

    def redacted(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["password"] = "***" if self.password else ""
        return d


@dataclass(frozen=True)
class Budget:
    """``[limits]`` budgets of inbound data, overall and per sender (docs/operations.md, "Budgets").

    What a node holds of messages it has not yet handed to its machine: received messages waiting in the queue
    (``FairInbox``) and partly received chunked messages (``Reassembler``, counted at their declared size).
    Each is bounded by ``memory_bytes`` overall and by ``sender_bytes`` per sender, so one sender can exhaust
    only its own share. Defaults depend on the role: a device is a small board."""

    memory_bytes: int = field(default=512 * MIB, metadata={"doc": (
        "inbound data a node may hold before use: queued messages, and again partial chunked messages (at their "
        "declared size), each at most this many bytes")})
    sender_bytes: int = field(default=128 * MIB, metadata={"doc": (
        "the same per sender; also the largest chunked message this node accepts from one sender")})
    sender_transfers: int = field(default=16, metadata={"doc": "partial chunked messages open per sender"})
    sender_queue: int = field(default=1024, metadata={"doc": "messages queued per sender before its next ones "
                                                             "are dropped"})
    sender_rate: float = field(default=2000.0, metadata={"doc": (
        "messages per second per sender (a token bucket holding two seconds' worth); more are dropped")})
    transfer_idle_s: float = field(default=60.0, metadata={"doc": (
        "a partial chunked message without a new chunk for this long is dropped and its memory freed")})

    def problems(self) -> list[str]:
        out = [f"[limits] {f.name} must be > 0" for f in fields(self) if not getattr(self, f.name) > 0]
        if self.sender_bytes > self.memory_bytes:
            out.append("[limits] sender_bytes must not exceed memory_bytes")
        return out


# The defaults by role. A device hears its edge (gradients, its model part, a relayed checkpoint of a few MB)
# and little else; an edge hears its devices' activations and the cloud's model; the cloud every edge's delta.
ROLE_BUDGETS: dict[str, Budget] = {
    "device": Budget(memory_bytes=64 * MIB, sender_bytes=32 * MIB, sender_transfers=4, sender_queue=256),
    "edge": Budget(),
    "cloud": Budget(memory_bytes=1024 * MIB, sender_bytes=512 * MIB),
}
BUDGET_KEYS = tuple(f.name for f in fields(Budget))


@dataclass(frozen=True)
class AgentConfig:
    node: str
    role: str
    fleet: str = "default"
    state_dir: str = ""
    log_level: str = "info"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    operators: tuple[str, ...] = ("operator",)
    section: Mapping[str, Any] = field(default_factory=dict)  # the role's own section ([device], [edge], [cloud])
    limits: Limits = field(default_factory=Limits)  # [limits]: what this node accepts from the wire
    budget: Budget = field(default_factory=Budget)  # [limits]: how much of it, overall and per sender


AGENT_ROLES = ("device", "edge", "cloud")


def doc(text: str) -> dict[str, str]:
    """Field metadata: what a key means (docs/config.md is checked against these)."""
    return {"doc": text}


@dataclass(frozen=True)
class DeviceSection:
    """``[device]``: a device agent."""

    edge: str = field(default="", metadata=doc("the edge this device attaches to (required with data)"))
    data: str = field(default="", metadata=doc(
        "path of the device's local data shard (required, unless the node only serves others' pipelines: "
        "serve; docs/data.md)"))
    eval_data: str = field(default="", metadata=doc(
        "path of the device's held-out shard: it evaluates the global model on it when the cloud asks "
        "([cloud] fed_eval_every); empty: the device takes no part in federated evaluation"))
    cloud: str = field(default="cloud", metadata=doc("node id of the cloud (restart requests after a lost edge)"))
    cut: int = field(default=-1, metadata=doc(
        "split point: blocks [0, cut) train here, the rest at the edge; the number of blocks = local "
        "training; -1 = the run's default. 0 is refused: raw inputs never leave a device"))
    act_timeout_s: float = field(default=10.0, metadata=doc(
        "re-send activations whose gradient has not come back after this many seconds"))
    migrate_timeout_s: float = field(default=10.0, metadata=doc(
        "give up a move when the source or destination edge is silent this long"))
    share_labels: bool = field(default=True, metadata=doc(
        "publish the label histogram (Eco-FL grouping by label mix); false keeps it private"))
    slowdown: float = field(default=1.0, metadata=doc(
        "emulated board speed: every compute step takes this many times as long (benchmarks, tests)"))
    step_delay_s: float = field(default=0.0, metadata=doc(
        "emulated board compute per mini-batch, seconds (x slowdown)"))
    threads: int = field(default=1, metadata=doc("torch intra-op threads"))
    edge_brokers: dict[str, str] = field(default_factory=dict, metadata=doc(
        "a device that moves between sites: edge id -> \"host:port\" of that edge's site broker; on moving to "
        "such an edge the device reconnects there ([mqtt] credentials and TLS; docs/operations.md)"))
    act_encoding: str = field(default="", metadata=doc(
        "this device's activations: none, fp16, int8 or int8c; empty: the run's act_encoding"))
    grad_encoding: str = field(default="", metadata=doc(
        "the gradients this device asks its edge for: none, fp16, int8 or int8c; empty: the run's"))
    delta_encoding: str = field(default="", metadata=doc(
        "this device's deltas: none, fp16, int8, int8c or topk; empty: the run's delta_encoding"))
    model_encoding: str = field(default="", metadata=doc(
        "the model this device downloads: none or fp16; empty: the run's model_encoding"))
    topk_ratio: float = field(default=0.0, metadata=doc(
        "fraction of its delta a topk device sends per round; 0: the run's topk_ratio"))
    attack_scale: float = field(default=1.0, metadata=doc(
        "attack emulation for tests and benchmarks: the device multiplies its delta by this before sending "
        "(a poisoning participant); 1 = honest"))
    serve: list[str] = field(default_factory=list, metadata=doc(
        "device ids whose pipelines this node may be a middle stage of (a helper: Eco-FL, docs/design.md "
        "\"Pipeline\"; the cloud's [cloud] chains names it for them); without data it trains nothing of its own"))
    klass: str = field(default="default", metadata=doc(
        "the device's class: the cloud's [cloud.classes.NAME] of that name says what it trains "
        "(a partial, pruned or narrower model, reduced precision), its cutoff and its power"))
    memory_mb: float = field(default=0.0, metadata=doc(
        "memory this node may use for training, MB (weights, gradients, optimizer state, stored activations): "
        "the split-point planner ([cloud] plan_cuts) keeps its cut within it, and a pipeline's planner its "
        "stage's blocks and stashed micro-batches; 0: no limit"))
    block_ms: float = field(default=0.0, metadata=doc(
        "emulated compute: every block of the model costs this many ms per mini-batch forward, twice that "
        "backward (x slowdown), slept, not computed (benchmarks of pipelines on a shared CPU)"))

    def brokers(self) -> dict[str, tuple[str, int]]:
        out = {}
        for edge, address in self.edge_brokers.items():
            host, _, port = str(address).rpartition(":")
            out[edge] = (host, int(port))
        return out

    def encodings(self) -> dict[str, str]:
        """This device's own tensor encodings, by kind (the run's apply where empty)."""
        return {k: v for k in ENCODINGS_ALLOWED if (v := getattr(self, f"{k}_encoding"))}

    def problems(self) -> list[str]:
        out = []
        for edge, address in self.edge_brokers.items():
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                out.append(f"[device] edge_brokers: {edge} = {address!r} is not host:port")
        for kind, allowed in ENCODINGS_ALLOWED.items():
            name = getattr(self, f"{kind}_encoding")
            if name and name not in allowed:
                out.append(f"[device] {kind}_encoding must be one of {list(allowed)} or empty, got {name!r}")
        if not 0 <= self.topk_ratio <= 1:
            out.append("[device] topk_ratio must be in [0, 1]")
        if not self.attack_scale == self.attack_scale:  # NaN
            out.append("[device] attack_scale must be a number")
        if not isinstance(self.serve, list) or not all(isinstance(c, str) for c in self.serve):
            out.append("[device] serve must be a list of device ids")
        elif not self.data and not self.serve:
            out.append("[device] needs 'edge' and 'data' (or 'serve', for a node that only helps others)")
        elif self.data and not self.edge:
            out.append("[device] needs 'edge' with 'data'")
        if self.memory_mb < 0 or self.block_ms < 0:
            out.append("[device] memory_mb and block_ms must be >= 0")
        if self.cut == 0 or self.cut < -1:
            out.append("[device] cut must be >= 1 (a device keeps at least one block: raw inputs never leave "
                       "it) or -1 for the run's default")
        if self.act_timeout_s <= 0 or self.migrate_timeout_s <= 0 or self.slowdown < 1 or self.step_delay_s < 0:
            out.append("[device] timeouts must be > 0, slowdown >= 1, step_delay_s >= 0")
        try:
            validate_id(self.klass)
        except ValueError as e:
            out.append(f"[device] class: {e}")
        if not self.memory_mb >= 0:
            out.append("[device] memory_mb must be >= 0")
        return out


@dataclass(frozen=True)
class EdgeSection:
    """``[edge]``: an edge agent."""

    cloud: str = field(default="cloud", metadata=doc("node id of the cloud"))
    deadline_fraction: float = field(default=0.85, metadata=doc(
        "an edge closes its part of a round at this fraction of the round's deadline, so its report reaches "
        "the cloud in time"))
    threads: int = field(default=1, metadata=doc("torch intra-op threads"))
    delta_encoding: str = field(default="", metadata=doc(
        "how the edge sends its delta to the cloud: none, fp16, int8, int8c or topk (only the non-zero entries, "
        "lossless); empty: the run's delta_encoding"))
    slowdown: float = field(default=1.0, metadata=doc(
        "emulated speed: every compute step takes this many times as long (benchmarks, tests)"))
    block_ms: float = field(default=0.0, metadata=doc(
        "emulated compute per block and mini-batch, ms, as [device] block_ms (the last stage of pipelines)"))
    group_downloads: bool = field(default=True, metadata=doc(
        "announce a round to the devices whose announcement is identical (same cut and encodings, no "
        "pipeline, class model or FedLAMA part of their own) with one message on this edge's broadcast topic "
        "instead of one per device; devices not in the round receive it too and ignore it. false: one message "
        "per device"))

    def problems(self) -> list[str]:
        out = [] if 0 < self.deadline_fraction <= 1 else ["[edge] deadline_fraction must be in (0, 1]"]
        if self.slowdown < 1 or self.block_ms < 0:
            out.append("[edge] slowdown must be >= 1 and block_ms >= 0")
        if self.delta_encoding and self.delta_encoding not in ENCODINGS_ALLOWED["delta"]:
            out.append(f"[edge] delta_encoding must be one of {list(ENCODINGS_ALLOWED['delta'])} or empty")
        return out


@dataclass(frozen=True)
class CloudRuntime:
    """``[cloud]`` keys read by the cloud's runtime rather than its protocol machine."""

    test_data: str = field(default="", metadata=doc(
        "held-out data the cloud evaluates every global model on; empty: no accuracy is reported"))
    keep_models: int = field(default=3, metadata=doc(
        "global models of the last this many rounds kept per run under state_dir/cloud/runs/RUN (the best "
        "round's is kept besides; 0: only the best); mqttfl export reads them"))
    threads: int = field(default=1, metadata=doc("torch intra-op threads"))

    def problems(self) -> list[str]:
        return [] if self.keep_models >= 0 else ["[cloud] keep_models must be >= 0"]


def _typed(cls: type, values: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The values of the keys ``cls`` declares, each checked against the field's type."""
    known = {f.name: f for f in fields(cls)}
    kw = {}
    for key, value in values.items():
        if key not in known:
            continue
        want = str(known[key].type)
        ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "dict[str, str]": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
              }.get(want, True)
        if not ok:
            raise ConfigError(f"[{name}] {key} must be {want}, got {type(value).__name__} {value!r}")
        kw[key] = float(value) if want == "float" else value
    return kw


def read_cloud_section(section: Mapping[str, Any]) -> tuple[CloudRuntime, Roles, CloudSettings]:
    """``[cloud]`` in its three parts: the runtime's keys, who is what (``Roles``: read at every start, never
    persisted with a run), and the run's settings. ConfigError names a bad key."""
    runtime_keys = frozenset(f.name for f in fields(CloudRuntime))
    rt: CloudRuntime = parse_section(CloudRuntime, {k: v for k, v in section.items() if k in runtime_keys}, "cloud")
    try:
        settings = CloudSettings.from_section({k: v for k, v in section.items()
                                               if k not in runtime_keys and k not in ROLE_KEYS})
        roles = Roles.from_section(section)
        bad = roles.problems()
        if bad:
            raise ValueError("; ".join(bad))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return rt, roles, settings


# Section fields whose TOML key is a Python keyword.
TOML_NAMES = {"klass": "class"}


def parse_section(cls: type, values: Mapping[str, Any], name: str, *, extra: frozenset[str] = frozenset()) -> Any:
    """A section dataclass from its TOML table: unknown keys and wrong types are refused by name.
    Keys in ``extra`` belong to another reader of the same section and are skipped here."""
    fields_of = {TOML_NAMES.get(f.name, f.name): f.name for f in fields(cls)}
    unknown = set(values) - set(fields_of) - extra
    if unknown:
        raise ConfigError(f"[{name}]: unknown keys {sorted(unknown)}; known: {sorted(set(fields_of) | extra)}")
    values = {fields_of.get(k, k): v for k, v in values.items()}
    section = cls(**_typed(cls, values, name))
    bad = section.problems()
    if bad:
        raise ConfigError("; ".join(bad))
    return section


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in ENV_NOT_KEYS:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if "__" in name:
            section, sub = name.split("__", 1)
            out.setdefault(section, {})
            if not isinstance(out[section], dict):
                raise ConfigError(f"{key}: '{section}' is not a section")
            out[section][sub] = _parse_env_value(raw)
        else:
            out[name] = _parse_env_value(raw)
    return out


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mqtt_from(data: Mapping[str, Any], node: str, environ: Mapping[str, str]) -> MqttConfig:
    known = {f.name for f in fields(MqttConfig)} - {"password"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"[mqtt]: unknown keys {sorted(unknown)}")
    cfg = MqttConfig(**{k: v for k, v in data.items() if k in known})
    pw_file = cfg.password_file
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if not pw_file and creds and (Path(creds) / "mqtt-password").exists():
        pw_file = str(Path(creds) / "mqtt-password")  # systemd LoadCredential=mqtt-password:...
    password = ""
    if pw_file:
        try:
            password = Path(pw_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"[mqtt] password_file {pw_file!r}: {e.strerror}") from e
    username = cfg.username or (node if password else "")
    cfg = replace(cfg, password=password, username=username, password_file=pw_file)
    if password and not cfg.tls and not _is_loopback(cfg.host):
        # docs/design.md, "Trust": credentials never cross a network in clear.
        raise ConfigError(
            f"refusing to send credentials in clear to {cfg.host}: enable [mqtt] tls or use a loopback broker"
        )
    if not (0 < cfg.port < 65536):
        raise ConfigError(f"[mqtt] port {cfg.port} out of range")
    if cfg.chunk_bytes < 1024:
        raise ConfigError("[mqtt] chunk_bytes must be at least 1024")
    if cfg.session_expiry <= 0:
        raise ConfigError("[mqtt] session_expiry must be > 0 (0 makes the broker forget offline agents)")
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e


def load_config(
    path: str | Path | None, role: str, *, environ: Mapping[str, str] | None = None, **overrides: Any
) -> AgentConfig:
    environ = os.environ if environ is None else environ
    data = apply_env(read_toml(path) if path else {}, environ)
    for k, v in overrides.items():
        if v is not None:
            data[k] = v
    node = data.get("node")
    if not node:
        raise ConfigError("'node' is required (the node id, e.g. dev1)")
    try:
        validate_id(str(node))
        validate_id(str(data.get("fleet", "default")))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    control = data.get("control", {})
    operators = tuple(control.get("operators", ("operator",)))
    limits_section = dict(data.get("limits", {}))
    unknown = set(limits_section) - set(LIMIT_KEYS) - set(BUDGET_KEYS)
    if unknown:
        raise ConfigError(f"[limits]: unknown keys {sorted(unknown)}; known: {[*LIMIT_KEYS, *BUDGET_KEYS]}")
    budget_section = {k: limits_section.pop(k) for k in BUDGET_KEYS if k in limits_section}
    for k, v in limits_section.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"[limits] {k} must be a positive integer")
    budget = replace(ROLE_BUDGETS.get(role, Budget()), **_typed(Budget, budget_section, "limits"))
    bad = budget.problems()
    if bad:
        raise ConfigError("; ".join(bad))
    known_top = {"node", "fleet", "state_dir", "log_level", "mqtt", "limits", "control", role}
    unknown_top = set(data) - known_top
    if role in AGENT_ROLES and unknown_top:
        raise ConfigError(f"unknown top-level keys or sections {sorted(unknown_top)} for a {role} "
                          f"(known: {sorted(known_top)})")
    unknown_control = set(control) - {"operators"}
    if unknown_control:
        raise ConfigError(f"[control]: unknown keys {sorted(unknown_control)}; known: ['operators']")
    state_dir = str(data.get("state_dir", ""))
    if state_dir and role in AGENT_ROLES:
        # Agents of one host may share a state directory (systemd's StateDirectory=mqttfl): each keeps its
        # outbox, boot counter and state in a folder of its own.
        state_dir = str(Path(state_dir) / str(node))
    return AgentConfig(
        node=str(node),
        role=role,
        fleet=str(data.get("fleet", "default")),
        state_dir=state_dir,
        log_level=str(data.get("log_level", "info")),
        mqtt=_mqtt_from(data.get("mqtt", {}), str(node), environ),
        operators=operators,
        section=dict(data.get(role, {})),
        limits=Limits(**limits_section),
        budget=budget,
    )
