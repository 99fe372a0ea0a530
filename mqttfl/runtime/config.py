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

from mqttfl.wire.codec import Limits
from mqttfl.wire.topics import validate_id

# [limits] keys an operator may set (sizes in bytes or elements); the rest of Limits stays fixed.
LIMIT_KEYS = ("max_message_bytes", "max_tensor_elements", "max_total_elements", "max_tensors", "max_json_bytes")

ENV_PREFIX = "MQTTFL_"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password_file: str = ""
    password: str = ""  # resolved from password_file; never written to logs
    keepalive: int = 30
    session_expiry: int = 3600
    chunk_bytes: int = 1024 * 1024
    inbox_size: int = 4096
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def redacted(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["password"] = "***" if self.password else ""
        return d


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


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
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
        # DESIGN §6: credentials never cross a network in clear.
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
    unknown = set(limits_section) - set(LIMIT_KEYS)
    if unknown:
        raise ConfigError(f"[limits]: unknown keys {sorted(unknown)}; known: {list(LIMIT_KEYS)}")
    for k, v in limits_section.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"[limits] {k} must be a positive integer")
    return AgentConfig(
        node=str(node),
        role=role,
        fleet=str(data.get("fleet", "default")),
        state_dir=str(data.get("state_dir", "")),
        log_level=str(data.get("log_level", "info")),
        mqtt=_mqtt_from(data.get("mqtt", {}), str(node), environ),
        operators=operators,
        section=dict(data.get(role, {})),
        limits=Limits(**limits_section),
    )
