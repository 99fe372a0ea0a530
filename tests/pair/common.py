"""Shared pieces of the broker-free tier: small fleets on the digits MLP and the unsplit reference.

The reference replays what each device does (its shard, its batch order, its micro-batch cut) with
:class:`LocalTrainer` on the whole model and takes flat FedAvg over the devices: split training must end on
the same global model (split step = local step).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mqttfl.ml.data import Dataset, load_digits
from mqttfl.ml.models import schema_of
from mqttfl.protocol.schema import ModelRef
from mqttfl.runtime.memory import MemoryFleet
from mqttfl.tools.testbed import FleetSpec, make_shards
from tests import reference
from tests.reference import TOL, initial_global, max_abs_diff, train_like_device  # noqa: F401  (shared)

MODEL, SHAPE = "mlp", (64,)
SCHEMA = schema_of(ModelRef(MODEL, SHAPE, 10))
N_BLOCKS, SPLIT_CUT = SCHEMA.n_blocks, SCHEMA.default_cut
# Small enough to run in milliseconds, large enough for several mini-batches per round and a visible update.
BASE_CLOUD = {"rounds": 2, "batch_size": 20, "lr": 0.3, "momentum": 0.9, "seed": 7, "run": "r1"}


@functools.lru_cache(maxsize=1)
def digits() -> tuple[Dataset, Dataset]:
    train, test = load_digits(SHAPE)
    return train.subset(np.arange(400)), test.subset(np.arange(200))


def spec(devices: Mapping[str, str], *, extra_edges: tuple[str, ...] = (), cloud: Mapping[str, Any] | None = None,
         device_extra: Mapping[str, dict[str, Any]] | None = None) -> FleetSpec:
    return FleetSpec(devices=dict(devices), model=MODEL, input_shape=SHAPE, extra_edges=extra_edges,
                     cloud={**BASE_CLOUD, **(cloud or {})}, device_extra=dict(device_extra or {}))


def fleet_of(s: FleetSpec, *, start: bool = True, **kw: Any) -> MemoryFleet:
    train, test = digits()
    fleet = MemoryFleet.from_spec(s, make_shards(s, train), test, **kw)
    if start:
        fleet.start()
    return fleet


def reference_global(s: FleetSpec, rounds: int | Iterable[Iterable[str]]) -> dict[str, np.ndarray]:
    return reference.reference_global(s, digits()[0], rounds)


def assert_reference(fleet: MemoryFleet, s: FleetSpec, rounds: int | Iterable[Iterable[str]]) -> None:
    """The cloud's global model (in memory and as persisted) equals the unsplit reference, and moved."""
    expected = reference_global(s, rounds)
    diff = max_abs_diff(fleet.global_state(), expected)
    assert diff <= TOL, f"global model differs from unsplit FedAvg by {diff:.3g}"
    persisted = fleet.persisted(fleet.cloud)
    assert persisted is not None and max_abs_diff(persisted["global"], expected) <= TOL
    assert max_abs_diff(fleet.global_state(), initial_global(s)) > 1e-2, "the run did not train"


def round_entries(fleet: MemoryFleet) -> list[dict[str, Any]]:
    return fleet.metrics("round", node=fleet.cloud)
