"""Agent configuration: TOML + environment overrides, refusals, configurable wire caps."""

from __future__ import annotations

import numpy as np
import pytest

from mqttfl.runtime.config import ConfigError, load_config
from mqttfl.runtime.transport import Transport
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
