"""The torch implementation of the stage interface (``mqttfl.protocol.stage``): what the runtime calls to
carry out a machine's ``Run(job)`` effects.

One :class:`TorchBackend` per node holds that node's stage sessions (a device's round, or each device's
edge-side copy at an edge), its local data source (devices) and test data (the cloud). Emulated board speed
for benchmarks and tests sharing one small machine (docs/operations.md, "Emulated devices"): ``slowdown``
stretches every compute job by that factor (sleeping the extra time), ``step_delay_s`` adds a fixed board
compute time per mini-batch, and ``block_ms`` makes every block of the model cost that many milliseconds per
full mini-batch forward (twice that backward, pro rata for a micro-batch, times ``slowdown``), slept rather
than computed: pipeline stages on processes that share two cores then run at the speeds configured, not at
whatever the shared CPU gives them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mqttfl.ml.data import BatchOrder, DataSource
from mqttfl.ml.models import Part, build_model, load_model_state
from mqttfl.ml.stage import LocalTrainer, Proximal, Stage, evaluate, make_optimizer, micro_batches
from mqttfl.protocol import stage as jobs
from mqttfl.protocol.plan import Plan, data_seed


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor over a decoded array, copying only when the array is read-only (decoded tensors are views into
    the message, and torch.from_numpy on read-only memory warns and would write through)."""
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


@dataclass
class _Session:
    plan: Plan
    stage: Stage
    model: torch.nn.Sequential
    order: BatchOrder | None = None
    rng: torch.Tensor | None = None


class TorchBackend:
    def __init__(self, node: str, *, data: DataSource | None = None, test: DataSource | None = None,
                 slowdown: float = 1.0, step_delay_s: float = 0.0, block_ms: float = 0.0, sleep: bool = True) -> None:
        self.node = node
        self.data = data
        self.test = test
        self.slowdown = slowdown
        self.step_delay_s = step_delay_s
        self.block_ms = block_ms
        self.sleep = sleep  # False on virtual time (the in-memory fleet charges the emulated cost to its clock)
        self.sessions: dict[str, _Session] = {}
        self._eval_models: dict[Any, torch.nn.Sequential] = {}

    def run(self, job: jobs.Job) -> Any:
        handler = getattr(self, "_" + type(job).__name__.lower(), None)
        if handler is None:
            raise TypeError(f"no handler for job {type(job).__name__}")
        return handler(job)

    # ------------------------------------------------------------------ emulation
    def _timed(self, fn: Any, *args: Any) -> Any:
        t = time.monotonic()
        out = fn(*args)
        if self.slowdown > 1.0:
            time.sleep((time.monotonic() - t) * (self.slowdown - 1.0))
        return out

    def _board_step(self) -> None:
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s * self.slowdown)

    def _block_s(self, plan: Plan, rows: int, passes: int) -> float:
        """Emulated seconds of one block: ``passes`` 1 forward, 2 backward, 3 both, for ``rows`` samples."""
        return self.block_ms / 1000.0 * passes * rows / max(plan.batch_size, 1) * self.slowdown

    def _emulate(self, s: _Session, rows: int, passes: int) -> None:
        if self.block_ms > 0 and self.sleep:
            time.sleep(self._block_s(s.plan, rows, passes) * (s.stage.part.stop - s.stage.part.start))

    # ------------------------------------------------------------------ jobs
    def _session(self, job: jobs.Job) -> _Session:
        s = self.sessions.get(job.session)
        if s is None:
            raise KeyError(f"no stage session {job.session!r}")
        return s

    def _open(self, job: jobs.Open) -> None:
        plan = job.plan
        model = build_model(plan.model, num_classes=plan.num_classes, input_shape=plan.input_shape)
        part = Part(model, job.start, job.stop)
        part.load_state(job.state)
        opt = make_optimizer((p for _, p in part.named_parameters()), plan)
        # FedProx: anchored at the round's starting weights (a migrated session: the round's base, not where
        # training stood when it moved).
        prox = Proximal(part.named_parameters(), plan.prox_mu, job.anchor) if plan.prox_mu > 0 else None
        stage = Stage(part, opt, plan, prox)
        if job.optimizer:
            stage.load_optimizer_state(job.optimizer)
        order = None
        if job.data:
            if self.data is None:
                raise RuntimeError(f"{self.node} has no local data")
            order = BatchOrder(len(self.data), plan.batch_size, seed=data_seed(plan.seed, self.node))
        rng = torch.from_numpy(np.array(job.rng, dtype=np.uint8)) if job.rng is not None else None
        self.sessions[job.session] = _Session(plan, stage, model, order, rng)

    def _batch(self, s: _Session, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert s.order is not None and self.data is not None
        epoch, index = s.order.locate(step)
        x, y = self.data.batch(s.order.batch(s.plan.round * s.plan.epochs + epoch, index))
        return torch.from_numpy(x), torch.from_numpy(y)

    def _forward(self, job: jobs.Forward) -> jobs.Smashed:
        s = self._session(job)
        if job.x is None or job.y is None:
            x, y = micro_batches(*self._batch(s, job.step), job.n_micro)[job.micro]
        else:
            x, y = _tensor(job.x), _tensor(job.y)
        out = self._timed(s.stage.forward, (job.step, job.micro), x)
        self._emulate(s, len(x), 1)
        return jobs.Smashed(out.numpy(), y.numpy())

    def _backward(self, job: jobs.Backward) -> np.ndarray | None:
        s = self._session(job)
        g = self._timed(s.stage.backward, (job.step, job.micro), _tensor(job.grad))
        self._emulate(s, len(job.grad), 2)
        return None if g is None else g.detach().contiguous().numpy()

    def _loss(self, job: jobs.Loss) -> jobs.LossResult:
        s = self._session(job)
        grad, res = self._timed(s.stage.loss, _tensor(job.x), _tensor(job.y), job.batch_size)
        self._emulate(s, len(job.x), 3)
        return jobs.LossResult(grad.detach().contiguous().numpy(), res.loss_sum, res.correct, res.n)

    def _step(self, job: jobs.Step) -> None:
        s = self._session(job)
        s.stage.step()
        if s.order is not None:
            self._board_step()

    def _localbatch(self, job: jobs.LocalBatch) -> jobs.BatchStats:
        s = self._session(job)
        x, y = self._batch(s, job.step)
        trainer = LocalTrainer(s.stage.part.module, s.stage.optimizer, s.plan, s.stage.proximal)
        res = self._timed(trainer.train_batch, x, y, min(job.n_micro, len(x)))
        self._emulate(s, len(x), 3)
        self._board_step()
        return jobs.BatchStats(res.loss_sum, res.correct, res.n)

    def _profile(self, job: jobs.Profile) -> tuple[float, ...]:
        """Each block's forward and backward over ``rows`` samples, timed here (the best of three, stretched by
        ``slowdown``), plus its emulated cost."""
        plan = job.plan
        # Seeded and with its own generator: profiling must not move the torch RNG that training draws from.
        model = build_model(plan.model, num_classes=plan.num_classes, input_shape=plan.input_shape, seed=0)
        model.train()
        x = torch.randn(job.rows, *plan.input_shape, generator=torch.Generator().manual_seed(0))
        out: list[float] = []
        for block in model:
            best = float("inf")
            for _ in range(3):
                inp = x.detach().requires_grad_(True)
                t = time.perf_counter()
                y = block(inp)
                y.float().sum().backward()
                best = min(best, time.perf_counter() - t)
            x = y.detach()
            # On virtual time only the emulated cost is charged, so it is the whole profile there.
            real = best * self.slowdown if self.sleep or self.block_ms <= 0 else 0.0
            out.append(real + self._block_s(plan, job.rows, 3))
        return tuple(out)

    def _snapshot(self, job: jobs.Snapshot) -> jobs.StageSnapshot:
        s = self._session(job)
        rng = s.rng if s.rng is not None else torch.get_rng_state()
        return jobs.StageSnapshot(s.stage.part.state(), s.stage.optimizer_state(), rng.numpy().copy())

    def _weights(self, job: jobs.Weights) -> dict[str, np.ndarray]:
        return self._session(job).stage.part.state()

    def _close(self, job: jobs.Close) -> None:
        self.sessions.pop(job.session, None)

    def _evaluate(self, job: jobs.Evaluate) -> jobs.EvalResult:
        if self.test is None or len(self.test) == 0:
            return jobs.EvalResult(None, None)
        ref = job.model
        model = self._eval_models.get(ref)
        if model is None:
            model = self._eval_models[ref] = build_model(ref.model, num_classes=ref.num_classes,
                                                         input_shape=ref.input_shape)
        load_model_state(model, job.state)
        test = self.test

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for i in range(0, len(test), 500):  # a memory-mapped test set is read one chunk at a time
                x, y = test.batch(np.arange(i, min(i + 500, len(test))))
                yield torch.from_numpy(x), torch.from_numpy(y)

        m = evaluate(model, batches(), job.loss)
        return jobs.EvalResult(m.get("accuracy"), m["loss"], len(test), m)
