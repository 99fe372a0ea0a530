"""Agent configuration: TOML + environment overrides, refusals, configurable wire caps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_agent.agent import build as build_cloud
from device_agent.agent import build as build_device
from edge_agent.agent import build as build_edge
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.runtime.config import ConfigError, DeviceSection, load_config, parse_section
from mqttfl.runtime.transport import Transport
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import write_toml
from tests.helpers import agent_config, wait_for


def test_environment_overrides_the_toml_file_and_parses_scalars(tmp_path):
    path = write_toml(tmp_path / "edge.toml", {"node": "edge1", "mqtt": {"host": "127.0.0.1", "port": 1883},
                                               "edge": {"deadline_fraction": 0.8}})
    cfg = load_config(path, "edge", environ={"MQTTFL_MQTT__PORT": "8883", "MQTTFL_FLEET": "site-a",
                                             "MQTTFL_EDGE__DEADLINE_FRACTION": "0.5"})
    assert cfg.mqtt.port == 8883 and cfg.fleet == "site-a" and cfg.section["deadline_fraction"] == 0.5


def test_password_is_read_from_the_systemd_credential_and_never_shown(tmp_path):
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    cfg = load_config(None, "device", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}, node="dev1")
    assert cfg.mqtt.password == "s3cret" and cfg.mqtt.username == "dev1"
    assert "s3cret" not in str(cfg.mqtt.redacted())


def test_credentials_in_clear_to_a_network_broker_are_refused(tmp_path):
    (tmp_path / "pw").write_text("x")
    with pytest.raises(ConfigError, match="in clear"):
        load_config(None, "device", environ={}, node="dev1",
                    mqtt={"host": "10.1.2.3", "password_file": str(tmp_path / "pw")})
    # Loopback, or TLS, is fine.
    load_config(None, "device", environ={}, node="dev1", mqtt={"host": "::1", "password_file": str(tmp_path / "pw")})
    load_config(None, "device", environ={}, node="dev1",
                mqtt={"host": "broker.lan", "tls": True, "password_file": str(tmp_path / "pw")})


@pytest.mark.parametrize("bad", [{"node": "Dev/1"}, {"node": "dev1", "fleet": "a+b"},
                                 {"node": "dev1", "mqtt": {"session_expiry": 0}},
                                 {"node": "dev1", "mqtt": {"colour": "red"}},
                                 {"node": "dev1", "limits": {"max_tensors": 0}},
                                 {"node": "dev1", "limits": {"max_widgets": 5}}])
def test_unusable_configs_get_a_clear_error(tmp_path, bad):
    with pytest.raises(ConfigError):
        load_config(write_toml(tmp_path / "c.toml", bad), "device", environ={})


def test_a_message_over_the_configured_cap_is_dropped_and_reported(broker, fleet, tmp_path):
    a = Transport(agent_config(broker, fleet, "alice")).start()
    small = load_config(None, "test", environ={}, node="bob", fleet=fleet,
                        mqtt={"host": broker.host, "port": broker.port}, limits={"max_message_bytes": 64 * 1024})
    b = Transport(small).start()
    try:
        a.send("delta", "bob", tensors={"w": np.ones(100_000, dtype=np.float32)})  # 400 KB > 64 KB
        a.send("delta", "bob", tensors={"w": np.ones(10, dtype=np.float32)})
        got = wait_for(lambda: (m := b.get(0.1)) is not None and m.kind == "delta" and m, what="the small delta")
        assert got.env.tensors["w"].shape == (10,)
        stats = b.stats_snapshot()
        assert stats["dropped"] == 1 and stats["drop_too_large"] == 1
    finally:
        a.stop()
        b.stop()


# --- unknown keys and cut = 0 are refused by name ------------------------------------------------------------

DEVICE = {"edge": "edge1", "data": "/nonexistent/dev1.npz"}  # refused before the data are opened
BUILD = {"device": build_device, "edge": build_edge, "cloud": build_cloud}


def role_config(tmp_path: Path, role: str, section: dict[str, Any], **top: Any) -> Path:
    base = {"device": DEVICE, "edge": {}, "cloud": {"model": "mlp", "input_shape": [64], "edges": ["edge1"]}}[role]
    return write_toml(tmp_path / f"{role}.toml", {"node": f"{role}1", **top, role: {**base, **section}})


@pytest.mark.parametrize("role", ["device", "edge", "cloud"])
def test_an_unknown_key_in_the_role_section_is_refused_with_its_name(tmp_path: Path, role: str) -> None:
    cfg = load_config(role_config(tmp_path, role, {"learning_rat": 0.1}), role, environ={})
    with pytest.raises(ConfigError, match=rf"\[{role}\].*learning_rat"):
        BUILD[role](cfg)  # what the agent does at start, before it opens data or connects


def test_cloud_settings_refuse_an_unknown_key_with_its_name() -> None:
    with pytest.raises(ValueError, match="learning_rat"):
        CloudSettings.from_section({"model": "mlp", "learning_rat": 0.1})


@pytest.mark.parametrize("role", ["device", "edge", "cloud"])
def test_an_unknown_top_level_key_or_section_is_refused_with_its_name(tmp_path: Path, role: str) -> None:
    with pytest.raises(ConfigError, match="stat_dir"):
        load_config(role_config(tmp_path, role, {}, stat_dir="/var/lib/mqttfl"), role, environ={})
    # A section of another role is unknown too: a device config with an [edge] table is a mistake.
    other = "edge" if role != "edge" else "device"
    with pytest.raises(ConfigError, match=rf"'{other}'"):
        load_config(write_toml(tmp_path / "two.toml", {"node": "n1", role: {}, other: {}}), role, environ={})


def test_an_unknown_control_key_is_refused_with_its_name(tmp_path: Path) -> None:
    path = role_config(tmp_path, "device", {}, control={"operators": ["operator"], "operator": "ops"})
    with pytest.raises(ConfigError, match=r"\[control\].*'operator'"):
        load_config(path, "device", environ={})


def test_mqttfl_config_names_the_file_and_is_not_read_as_a_key(tmp_path: Path) -> None:
    path = role_config(tmp_path, "device", {})
    cfg = load_config(path, "device", environ={"MQTTFL_CONFIG": str(path), "MQTTFL_FLEET": "site-a"})
    assert cfg.fleet == "site-a" and cfg.node == "device1"


def test_cut_0_is_refused_for_a_device() -> None:
    # A device with no block of its own would send raw inputs to its edge.
    with pytest.raises(ConfigError, match=r"\[device\] cut must be >= 1"):
        parse_section(DeviceSection, {**DEVICE, "cut": 0}, "device")
    assert parse_section(DeviceSection, {**DEVICE, "cut": -1}, "device").cut == -1  # the run's default
    assert parse_section(DeviceSection, {**DEVICE, "cut": 1}, "device").cut == 1


def test_cut_0_is_refused_in_the_cloud_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cut must be >= 1"):
        CloudSettings.from_section({"model": "mlp", "cut": 0})
    cfg = load_config(role_config(tmp_path, "cloud", {"cut": 0}), "cloud", environ={})
    with pytest.raises(ConfigError, match="cut must be >= 1"):
        build_cloud(cfg)
    assert CloudSettings.from_section({"model": "mlp", "cut": -1}).cut == -1


@pytest.mark.parametrize("section, named", [({"learning_rat": 0.1}, "learning_rat"), ({"cut": 0}, "cut")])
def test_device_agent_with_a_bad_config_exits_2_naming_the_key_and_does_not_start(
        tmp_path: Path, broker: Broker, section: dict[str, Any], named: str) -> None:
    path = role_config(tmp_path, "device", section, state_dir=str(tmp_path / "state"),
                       mqtt={"host": broker.host, "port": broker.port})
    r = subprocess.run([sys.executable, "-m", "device_agent", "--config", str(path)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "config error" in r.stderr and named in r.stderr
    # It never got as far as its state directory or the broker.
    assert not (tmp_path / "state").exists() and '"starting"' not in r.stdout
