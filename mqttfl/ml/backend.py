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

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mqttfl.ml import local as variants
from mqttfl.ml.data import BatchOrder, DataSource
from mqttfl.ml.models import Part, build_model, load_model_state
from mqttfl.ml.stage import LocalTrainer, Proximal, Stage, evaluate, loss_sum, make_optimizer, micro_batches
from mqttfl.protocol import stage as jobs
from mqttfl.protocol.plan import TASKS, Plan, data_seed

PROFILE_REPEATS = 3  # a block's time is the median of these (after one warm-up pass)


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
    saved: variants.SavedBytes | None = None  # the activations stored for backward, as they are stored
    frozen: torch.nn.Module | None = None  # a partial model's input side: run without autograd
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    precision: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def hooks(self) -> contextlib.AbstractContextManager[Any]:
        return self.saved.hooks() if self.saved is not None else contextlib.nullcontext()


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
        if self.slowdown > 1.0 and self.sleep:
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

    def _open(self, job: jobs.Open) -> jobs.Opened | None:
        plan, local = job.plan, job.local
        model = build_model(plan.model, num_classes=plan.num_classes, input_shape=plan.input_shape)
        frozen = local.frozen(len(model)) if local is not None else 0
        if frozen and job.start != 0:
            raise ValueError("a partial model trains the whole model's output side locally (start 0)")
        if frozen >= job.stop:
            raise ValueError(f"a partial model with {frozen} frozen blocks of {job.stop} trains nothing")
        Part(model, job.start, job.stop).load_state(job.state)
        part = Part(model, max(job.start, frozen), job.stop)
        prefix = None
        if frozen:
            # EmbracingFL: the input side runs in eval mode without autograd, so it stores no activations and its
            # weights and statistics stay exactly as they came.
            prefix = torch.nn.Sequential(*(model[i] for i in range(frozen))).eval().requires_grad_(False)
        masks: dict[str, np.ndarray] = {}
        if local is not None and local.train == "pruned":
            masks = variants.prune_masks(model, local.prune, local.prune_by)
        elif local is not None and local.train == "width":
            masks = variants.width_masks(model, local.width)
        own = set(part.keys())
        masks = {k: m for k, m in masks.items() if k in own}
        mask_tensors = variants.install_masks(model, masks) if masks else {}
        precision = local.precision if local is not None else "fp32"
        if precision == "int8":
            variants.quantise_int8(part.module)
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
        saved = variants.SavedBytes([p for p in model.parameters()], int8=precision == "int8")
        self.sessions[job.session] = _Session(plan, stage, model, order, rng, saved, prefix, mask_tensors,
                                              variants.precision_context(precision))
        return jobs.Opened({k: m.astype(bool) for k, m in masks.items()}) if masks else None

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
        with s.hooks():
            out = self._timed(s.stage.forward, (job.step, job.micro), x)
        self._emulate(s, len(x), 1)
        return jobs.Smashed(out.numpy(), y.numpy())

    def _backward(self, job: jobs.Backward) -> np.ndarray | None:
        s = self._session(job)
        with s.hooks():
            g = self._timed(s.stage.backward, (job.step, job.micro), _tensor(job.grad))
        self._emulate(s, len(job.grad), 2)
        return None if g is None else g.detach().contiguous().numpy()

    def _loss(self, job: jobs.Loss) -> jobs.LossResult:
        s = self._session(job)
        with s.hooks():
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

        def train() -> Any:
            inputs = x
            if s.frozen is not None:
                with torch.no_grad():
                    inputs = s.frozen(x)
            with s.precision(), s.hooks():
                return trainer.train_batch(inputs, y, min(job.n_micro, len(x)))

        res = self._timed(train)
        if s.masks:
            variants.apply_masks(s.model, s.masks)
        self._emulate(s, len(x), 3)
        self._board_step()
        return jobs.BatchStats(res.loss_sum, res.correct, res.n)

    def _memory(self, job: jobs.Memory) -> int:
        """Weights and buffers of the whole model, gradients and optimizer state of what trains, and the peak of
        the activations stored for backward."""
        s = self._session(job)
        weights = sum(t.numel() * t.element_size() for t in [*s.model.parameters(), *s.model.buffers()])
        trained = [p for _, p in s.stage.part.named_parameters() if p.requires_grad]
        grads = sum(p.numel() * p.element_size() for p in trained)
        opt = 0
        if s.stage.optimizer is not None:
            for state in s.stage.optimizer.state.values():
                opt += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        return int(weights + grads + opt + (s.saved.peak if s.saved is not None else 0))

    def _profile(self, job: jobs.Profile) -> jobs.BlockProfile:
        """Each block's forward + backward time on ``rows`` samples (a mini-batch of the plan's size by default;
        synthetic inputs: the time does not depend on the values), stretched by ``slowdown`` as the stages run
        them, plus its emulated cost (``block_ms``), and its training memory: weights, gradients, optimizer state
        and the activations it stores for backward."""
        plan = job.plan
        # Seeded and with its own generator: profiling must not move the torch RNG that training draws from.
        model = build_model(plan.model, num_classes=plan.num_classes, input_shape=plan.input_shape, seed=0)
        model.train()
        b = job.rows or plan.batch_size
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((b, *plan.input_shape), generator=gen)
        if TASKS.get(plan.loss) == "classification":
            y = torch.randint(0, plan.num_classes, (b,), generator=gen)
        else:
            y = torch.rand((b, plan.num_classes), generator=gen).round()
        slots = {"sgd": 1 if plan.momentum > 0 else 0, "adam": 2, "adamw": 2}.get(plan.optimizer, 1)
        n = len(model)
        times: list[list[float]] = [[] for _ in range(n)]
        stored = [0] * n
        for rep in range(PROFILE_REPEATS + 1):
            outs = []
            inp = x
            for i in range(n):
                a = inp.detach().requires_grad_(i > 0)
                saved = variants.SavedBytes(list(model[i].parameters()))
                t0 = time.monotonic()
                with saved.hooks():
                    out = model[i](a)
                outs.append((a, out, time.monotonic() - t0))
                stored[i] = saved.peak
                inp = out
            grad: torch.Tensor | None = None
            for i in range(n - 1, -1, -1):
                a, out, fwd = outs[i]
                t0 = time.monotonic()
                if i == n - 1:
                    (loss_sum(plan.loss, out, y) / b).backward()
                else:
                    out.backward(grad)
                if rep:
                    times[i].append(fwd + time.monotonic() - t0)
                grad = a.grad
            model.zero_grad(set_to_none=True)
        block_bytes = []
        for i in range(n):
            params = list(model[i].parameters())
            tensors = sum(t.numel() * t.element_size() for t in [*params, *model[i].buffers()])
            trainable = sum(p.numel() * p.element_size() for p in params)
            block_bytes.append(int(tensors + (1 + slots) * trainable + stored[i]))
        # Measured, stretched by ``slowdown`` as ``_timed`` stretches the stages' jobs (computed, not slept); on
        # virtual time with an emulated cost only that cost is charged, so it is the whole profile there.
        real = [statistics.median(t) * self.slowdown if self.sleep or self.block_ms <= 0 else 0.0 for t in times]
        return jobs.BlockProfile(tuple(r + self._block_s(plan, b, 3) for r in real), tuple(block_bytes))

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
