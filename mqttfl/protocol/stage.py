"""The stage interface: what a protocol machine asks of the training code, as data.

A *stage* owns a consecutive range of a model's blocks for one session (a device's round, or one device's
edge-side copy at an edge) with its optimizer. A machine never calls training code: it returns
``Run(job)`` effects with the jobs below, and the runtime hands the result back as ``JobDone(job,
result)`` (``mqttfl.protocol.events``). The runtime implements them with torch (``mqttfl.ml.backend``); an
in-memory fleet may implement them with virtual time. Jobs of one session run in the order they were asked.

Stage roles in a split (docs/design.md, "Stages"): the first stage reads its micro-batch from local data
(``Forward`` without ``x``), a middle stage gets its input from upstream (``Forward`` with ``x``), the last
stage computes the loss (``Loss``). ``Backward`` takes the gradient at the stage's output and returns the
gradient at its input (``None`` at the first stage: raw inputs need none and never leave a device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mqttfl.protocol.hetero import LocalModel
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import ModelRef

State = dict[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class Job:
    session: str


@dataclass(frozen=True, eq=False)
class Open(Job):
    """Build blocks ``[start, stop)`` of the plan's model, load ``state`` (and the optimizer and RNG states,
    when a migration installs a checkpoint) and make the optimizer. ``data``: this stage reads the node's
    local data."""

    plan: Plan
    start: int
    stop: int
    state: State
    optimizer: State | None = None
    rng: np.ndarray | None = None
    data: bool = False
    anchor: State | None = None  # FedProx: the round's starting weights when they are not ``state`` (a move)
    local: LocalModel | None = None  # a device class's model (docs/algorithms.md, "Heterogeneous devices"):
    # frozen input side, masks, precision. Result: :class:`Opened` with the masks, when there are any.


@dataclass(frozen=True, eq=False)
class Forward(Job):
    """Train-mode forward of micro-batch ``micro`` of mini-batch ``step``, keeping its graph for Backward.
    Result: :class:`Smashed`."""

    step: int
    micro: int
    n_micro: int
    x: np.ndarray | None = None
    y: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Backward(Job):
    """Back-propagate ``grad`` (at the stage output) for a forwarded micro-batch. Result: the gradient at the
    stage input, or None at the first stage."""

    step: int
    micro: int
    grad: np.ndarray


@dataclass(frozen=True, eq=False)
class Loss(Job):
    """Last stage: forward, loss summed over the micro-batch and divided by the mini-batch size ``batch_size``
    (so accumulated micro-batch gradients equal the mini-batch mean's), backward. Result: :class:`LossResult`."""

    step: int
    micro: int
    x: np.ndarray
    y: np.ndarray
    batch_size: int


@dataclass(frozen=True, eq=False)
class LocalBatch(Job):
    """Unsplit training of mini-batch ``step`` from local data, cut into ``n_micro`` micro-batches, with one
    optimizer step. Result: :class:`BatchStats`."""

    step: int
    n_micro: int


@dataclass(frozen=True, eq=False)
class Step(Job):
    """One optimizer step for the mini-batch (the flush), then zero the gradients."""


@dataclass(frozen=True, eq=False)
class Snapshot(Job):
    """Result: :class:`StageSnapshot` (weights, optimizer state, RNG state) for a migration checkpoint."""


@dataclass(frozen=True, eq=False)
class Weights(Job):
    """Result: the stage's current weights and float buffers, by the full model's keys."""


@dataclass(frozen=True, eq=False)
class Close(Job):
    """Forget the session (its graphs, weights and optimizer)."""


@dataclass(frozen=True, eq=False)
class Evaluate(Job):
    """Evaluate a full model state on the node's test data (the cloud's test set, a device's held-out split),
    with the metrics of the task ``loss`` names. Result: :class:`EvalResult`."""

    model: ModelRef
    state: State
    loss: str = "cross_entropy"


@dataclass(frozen=True, eq=False)
class Measure(Job):
    """The node's own meters (bytes sent and received, peak memory). Result: :class:`Meters`."""


@dataclass(frozen=True, eq=False)
class Memory(Job):
    """The session's training memory at its peak so far (weights, gradients, optimizer state, the activations
    stored for backward), bytes. Result: int."""


@dataclass(frozen=True, eq=False)
class Profile(Job):
    """Measure the plan's model block by block on this node, at its emulated speed: forward + backward seconds of
    ``rows`` samples (0: one mini-batch of ``plan.batch_size``; a pipeline profiles one micro-batch) and the
    training memory of each block. The split-point planner and a pipeline's partitioner weigh nodes by it.
    Result: :class:`BlockProfile`."""

    plan: Plan
    rows: int = 0


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Smashed:
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class LossResult:
    grad: np.ndarray
    loss_sum: float
    correct: int
    n: int


@dataclass(frozen=True)
class BatchStats:
    loss_sum: float
    correct: int
    n: int


@dataclass(frozen=True)
class StageSnapshot:
    weights: State
    optimizer: State  # "<param key>|<state name>" -> tensor (SGD: momentum_buffer)
    rng: np.ndarray


@dataclass(frozen=True)
class EvalResult:
    accuracy: float | None
    loss: float | None
    n: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # every metric of the task, loss included


@dataclass(frozen=True)
class Meters:
    tx_bytes: int = 0
    rx_bytes: int = 0
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0  # the process's CPU time so far
    energy_j: float = 0.0  # the board's energy counter, where it has one (0: none)


@dataclass(frozen=True)
class Opened:
    masks: dict[str, np.ndarray]  # key -> bool mask of the entries this session trains (pruned, width)


@dataclass(frozen=True)
class BlockProfile:
    block_s: tuple[float, ...]
    block_bytes: tuple[int, ...]


class JobFailed(Exception):
    """A job that could not run (a bad state, an exhausted data source): the runtime reports it as the
    job's result, so the machine decides what it means for the protocol."""
