"""The torch backend behind the stage interface: jobs in, results out; any DataSource feeds a device."""

from __future__ import annotations

import numpy as np

from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.data import Dataset, load_digits
from mqttfl.ml.models import initial_state, schema_of
from mqttfl.protocol import stage
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import ModelRef

PLAN = Plan(run="r", round=0, model="mlp", input_shape=(64,), batch_size=16, lr=0.05)
REF = ModelRef("mlp", (64,), 10)


class RowsOnDemand:
    """A data source that is not a Dataset: it builds each requested row when asked (as a streamed or
    memory-mapped source would), so nothing but the batch is ever held."""

    def __init__(self, ds: Dataset) -> None:
        self._x, self._y = ds.x, ds.y
        self.rows_read = 0

    def __len__(self) -> int:
        return len(self._y)

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.rows_read += len(idx)
        return np.stack([self._x[i] for i in idx]), np.array([self._y[i] for i in idx], np.int64)

    def labels(self) -> np.ndarray:
        return self._y


def _local_round(backend: TorchBackend, steps: int) -> dict[str, np.ndarray]:
    state = initial_state(REF, seed=0)
    backend.run(stage.Open("s", PLAN, 0, schema_of(REF).n_blocks, state, data=True))
    for step in range(steps):
        backend.run(stage.LocalBatch("s", step, 2))
    return backend.run(stage.Weights("s"))


def test_any_data_source_trains_like_the_in_memory_shard() -> None:
    train, _ = load_digits((64,))
    shard = train.subset(np.arange(100))
    source = RowsOnDemand(shard)
    a = _local_round(TorchBackend("dev1", data=shard), steps=3)
    b = _local_round(TorchBackend("dev1", data=source), steps=3)
    assert source.rows_read == 3 * PLAN.batch_size
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_split_forward_and_backward_through_jobs_matches_the_local_step() -> None:
    train, _ = load_digits((64,))
    shard = train.subset(np.arange(64))
    cut, n = 2, schema_of(REF).n_blocks
    state = initial_state(REF, seed=0)
    dev, edge, local = TorchBackend("dev1", data=shard), TorchBackend("edge1"), TorchBackend("dev1", data=shard)
    dev.run(stage.Open("d", PLAN, 0, cut, {k: state[k] for k in schema_of(REF).keys(0, cut)}, data=True))
    edge.run(stage.Open("e", PLAN, cut, n, {k: state[k] for k in schema_of(REF).keys(cut)}))
    local.run(stage.Open("l", PLAN, 0, n, state, data=True))
    smashed = dev.run(stage.Forward("d", 0, 0, 1))
    assert smashed.x.shape == (PLAN.batch_size, *schema_of(REF).activation(cut))
    res = edge.run(stage.Loss("e", 0, 0, smashed.x, smashed.y, PLAN.batch_size))
    assert dev.run(stage.Backward("d", 0, 0, res.grad)) is None  # the first stage sends nothing upstream
    dev.run(stage.Step("d"))
    edge.run(stage.Step("e"))
    local.run(stage.LocalBatch("l", 0, 1))
    split = {**dev.run(stage.Weights("d")), **edge.run(stage.Weights("e"))}
    ref = local.run(stage.Weights("l"))
    assert max(float(np.max(np.abs(split[k] - ref[k]))) for k in ref) <= 1e-6
    snap = edge.run(stage.Snapshot("e"))
    assert snap.optimizer and set(snap.weights) == set(schema_of(REF).keys(cut))
