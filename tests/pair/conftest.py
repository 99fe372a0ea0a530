"""The broker-free tier: protocol machines wired together in memory (``mqttfl.runtime.memory``), no broker and
no processes. Everything under ``tests/pair`` is marked ``pair``; ``make test-fast`` runs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pair: broker-free tests of the protocol machines wired in memory")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.pair)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The agents run one intra-op thread; for these tiny models a thread pool only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
