"""Shared fixtures: one real Mosquitto per test session; tests use unique topic roots (fleets) to share it."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

from mqttfl.tools.broker import Broker, BrokerOptions

_fleet_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Broker:
    b = Broker(BrokerOptions(), workdir=tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.cleanup()


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> str:
    """A fleet id unique to this test, so tests sharing the broker never see each other's messages."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    return f"t{next(_fleet_counter)}-{os.getpid()}-{name}"


@pytest.fixture
def python() -> str:
    """The interpreter that runs agent processes in integration tests."""
    return sys.executable


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
