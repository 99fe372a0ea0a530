"""docs/config.md is the generated reference of every key, and `mqttfl config check` reads files as agents do."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.runtime.config import TOML_NAMES, CloudRuntime, ConfigError, DeviceSection, EdgeSection, MqttConfig
from mqttfl.tools.configref import check, reference
from mqttfl.tools.testbed import write_toml

ROOT = Path(__file__).resolve().parent.parent


def test_docs_config_md_is_the_generated_reference() -> None:
    assert (ROOT / "docs" / "config.md").read_text().strip() == reference().strip(), \
        "docs/config.md is stale: regenerate it with `mqttfl config reference > docs/config.md`"


def test_every_key_of_every_section_is_documented_with_a_meaning() -> None:
    text = reference()
    keys = [TOML_NAMES.get(f.name, f.name) for dc in (DeviceSection, EdgeSection, CloudRuntime) for f in fields(dc)]
    keys += [f.name for f in fields(MqttConfig) if f.name != "password"]
    keys += [k for k in CloudSettings().flat()]
    for key in keys:
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `{key}` |")), None)
        assert line is not None, f"{key} is not in the reference"
        assert line.split("|")[4].strip(), f"{key} has no meaning in the reference"


def test_the_shipped_example_configs_pass_the_check() -> None:
    for role in ("device", "edge", "cloud"):
        assert "valid" in check(role, str(ROOT / "systemd" / "examples" / f"{role}.toml"))


def test_check_refuses_a_bad_file_naming_the_key(tmp_path: Path) -> None:
    bad = write_toml(tmp_path / "d.toml", {"node": "dev1", "device": {"edge": "e1", "data": "x.npz", "cutt": 2}})
    with pytest.raises(ConfigError, match="cutt"):
        check("device", str(bad))
    bad = write_toml(tmp_path / "c.toml", {"node": "cloud", "cloud": {"rounds": 3, "lr_rate": 0.1}})
    with pytest.raises(ConfigError, match="lr_rate"):
        check("cloud", str(bad))
    for section, match in (({"optimizer": "rmsprop"}, "optimizer"), ({"loss": "hinge"}, "loss"),
                           ({"wait_for": "dev1"}, "wait_for"), ({"sample_fraction": 0.0}, "sample_fraction"),
                           ({"mode": "async", "fed_eval_every": 2}, "federated evaluation"),
                           ({"keep_models": -1}, "keep_models")):
        bad = write_toml(tmp_path / "c.toml", {"node": "cloud", "cloud": section})
        with pytest.raises(ConfigError, match=match):
            check("cloud", str(bad))
    bad = write_toml(tmp_path / "d.toml", {"node": "dev1", "device": {"edge": "e1", "data": "x.npz",
                                                                     "edge_brokers": {"e2": "nowhere"}}})
    with pytest.raises(ConfigError, match="host:port"):
        check("device", str(bad))
