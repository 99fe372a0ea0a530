"""A stage backend that trains nothing: each round it hands back the round's weights plus a fixed update.

Virtual devices (``mqttfl virtual --mode replay``) use it to load the broker, the edges and the cloud with the
messages, sizes and timing of a real round but none of its compute, so that a thousand of them fit in one
process and what is measured is the fleet's overhead (docs/operations.md, "Virtual devices"). Only devices that
train the whole model (no split) can replay: a split stage's activations would have to be real.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from mqttfl.protocol import stage
from mqttfl.protocol.plan import batches_per_epoch

# One update shared by every replaying device of the process (per key and shape), scaled per device: memory is
# one model's worth, however many devices replay it.
_UPDATES: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}


def fixed_update(key: str, shape: tuple[int, ...]) -> np.ndarray:
    u = _UPDATES.get((key, shape))
    if u is None:
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        u = _UPDATES[(key, shape)] = (1e-3 * rng.standard_normal(shape)).astype(np.float32)
    return u


class ReplayBackend:
    """See the module docstring. ``n_samples``: the device's shard size (the samples each mini-batch reports)."""

    def __init__(self, node: str, n_samples: int) -> None:
        self.node = node
        self.n_samples = n_samples
        self.scale = 0.5 + (zlib.crc32(node.encode()) % 1000) / 1000.0  # devices differ, deterministically
        self.sessions: dict[str, tuple[stage.Open, dict[str, np.ndarray]]] = {}

    def run(self, job: stage.Job) -> Any:
        if isinstance(job, stage.Open):
            self.sessions[job.session] = (job, job.state)
            return None
        if isinstance(job, stage.Close):
            self.sessions.pop(job.session, None)
            return None
        if isinstance(job, stage.Evaluate):
            return stage.EvalResult(None, None)
        if isinstance(job, stage.Memory):
            return 0  # no training memory: nothing is trained
        opened, state = self.sessions[job.session]
        if isinstance(job, stage.LocalBatch):
            bs = opened.plan.batch_size
            i = job.step % batches_per_epoch(self.n_samples, bs)
            return stage.BatchStats(0.0, 0, min(bs, self.n_samples - i * bs))
        if isinstance(job, stage.Step):
            return None
        if isinstance(job, stage.Snapshot):
            return stage.StageSnapshot(dict(state), {}, np.zeros(0, dtype=np.uint8))
        if isinstance(job, stage.Weights):
            return {k: v + self.scale * fixed_update(k, v.shape) if v.dtype.kind == "f" else v
                    for k, v in state.items()}
        raise stage.JobFailed(f"{self.node} replays a fixed update and trains the whole model only: set [device] "
                              f"cut to the model's block count (got a {type(job).__name__} job)")
