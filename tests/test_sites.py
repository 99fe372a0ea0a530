"""The bridge the several-sites benchmark and tests start on loopback (mqttfl.tools.sites) is the shipped
broker_config/bridge.conf with only deployment values changed, so what crosses it is what crosses in production."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqttfl.tools.broker import BrokerError
from mqttfl.tools.sites import BRIDGE_CONF, TLS_AND_ACCOUNT, loopback_bridge


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_a_second_site_bridges_the_shipped_topic_lines_under_its_own_name_to_a_loopback_cloud_broker() -> None:
    shipped = directives(BRIDGE_CONF.read_text())
    section = loopback_bridge(41883, "site2", client_id="bridge-site2-test")
    lines = directives(section)
    # Every topic line as shipped, in order: the bench measures the production topic tree.
    assert [x for x in lines if x.startswith("topic ")] == [x for x in shipped if x.startswith("topic ")]
    assert "connection cloud-site2" in lines and "local_clientid bridge-site2.local" in lines
    assert "address 127.0.0.1:41883" in lines and "remote_clientid bridge-site2-test" in lines
    assert "site1" not in section
    assert not [x for x in lines if x.split(" ", 1)[0] in TLS_AND_ACCOUNT]
    # Everything else (protocol version, session kept across outages, notifications) stays as shipped.
    kept = [x.replace("site1", "site2") for x in shipped if x.split(" ", 1)[0] not in
            (*TLS_AND_ACCOUNT, "address", "remote_clientid")]
    assert [x for x in lines if x.split(" ", 1)[0] not in ("address", "remote_clientid")] == kept


def test_a_bridge_config_without_its_deployment_lines_is_refused_naming_them(
        tmp_path: Path) -> None:
    conf = tmp_path / "bridge.conf"
    conf.write_text("connection cloud-site1\ntopic mqttfl/v1/+/delta/+/+ out 1\n")
    with pytest.raises(BrokerError, match="address"):
        loopback_bridge(41883, conf=conf)
    with pytest.raises(BrokerError, match="not found"):
        loopback_bridge(41883, conf=tmp_path / "missing.conf")
