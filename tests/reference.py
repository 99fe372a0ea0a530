"""The unsplit reference every split, migrated or in-memory run is compared with (split step = local step).

It replays what each device does — its shard, its batch order, its micro-batch cut — with ``LocalTrainer``
on the whole model, and takes flat FedAvg (weights = samples) over the devices, from the cloud's seed.

It trains with one torch thread, as the agents do: a convolution summed in another order rounds differently,
and on the digits (whole regions of equal pixels) that flips max-pooling ties, which training then amplifies
far past the tolerance (2.6e-3 after two rounds of the CNN).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

import numpy as np
import torch

from mqttfl.fl.aggregate import apply_delta, delta, weighted_average
from mqttfl.ml.data import BatchOrder, Dataset
from mqttfl.ml.models import build_model, load_model_state, model_state
from mqttfl.ml.stage import LocalTrainer, make_optimizer
from mqttfl.protocol.cloud.roles import ROLE_KEYS
from mqttfl.protocol.cloud.settings import CloudSettings
from mqttfl.protocol.plan import Training, data_seed, round_lr
from mqttfl.tools.testbed import FleetSpec, make_shards

TOL = 1e-5


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_like_device(global_state: Mapping[str, np.ndarray], spec: FleetSpec, shard: Dataset, node: str,
                      rnd: int) -> dict[str, np.ndarray]:
    """What device ``node`` ends round ``rnd`` with, trained unsplit in this process."""
    with one_thread():
        return _train(global_state, spec, shard, node, rnd)


def training_of(spec: FleetSpec) -> tuple[Training, int]:
    """The run's training settings as the cloud reads them from the spec, and the schedule's horizon."""
    s = CloudSettings.from_section({"model": spec.model, "input_shape": list(spec.input_shape),
                                    **{k: v for k, v in spec.cloud.items() if k not in ROLE_KEYS}})
    return s.training, s.rounds if s.mode == "sync" else s.max_versions


def _train(global_state: Mapping[str, np.ndarray], spec: FleetSpec, shard: Dataset, node: str,
           rnd: int) -> dict[str, np.ndarray]:
    t, horizon = training_of(spec)
    # The plan of round rnd: the cloud stamps the schedule's learning rate into it.
    t = replace(t, lr=round_lr(t, rnd, horizon))
    model = build_model(spec.model, input_shape=spec.input_shape, num_classes=t.num_classes)
    load_model_state(model, global_state)
    trainer = LocalTrainer(model, make_optimizer(model.parameters(), t), t)
    order = BatchOrder(len(shard), t.batch_size, seed=data_seed(t.seed, node))
    for e in range(t.epochs):
        for idx in order.epoch_batches(rnd * t.epochs + e):
            trainer.train_batch(torch.from_numpy(shard.x[idx]), torch.from_numpy(shard.y[idx]),
                                micro_batches=min(t.micro_batches, len(idx)))
    return model_state(model)


def initial_global(spec: FleetSpec) -> dict[str, np.ndarray]:
    t, _ = training_of(spec)
    return model_state(build_model(spec.model, input_shape=spec.input_shape, num_classes=t.num_classes, seed=t.seed))


def reference_global(spec: FleetSpec, train: Dataset, rounds: int | Iterable[Iterable[str]], *,
                     participants: Iterable[str] | None = None, start: Mapping[str, np.ndarray] | None = None,
                     first_round: int = 0) -> dict[str, np.ndarray]:
    """Flat FedAvg over the devices; ``rounds``: a count (``participants``, by default every device, take part
    in each) or, per round, the devices that take part."""
    shards = make_shards(spec, train)
    every = sorted(participants if participants is not None else spec.devices)
    per_round = [every] * rounds if isinstance(rounds, int) else [sorted(r) for r in rounds]
    g = dict(start) if start is not None else initial_global(spec)
    for rnd, devices in enumerate(per_round, start=first_round):
        items = [(delta(train_like_device(g, spec, shards[d], d, rnd), g), float(len(shards[d]))) for d in devices]
        g = apply_delta(g, weighted_average(items))
    return g


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


def hetero_reference(spec: FleetSpec, train: Dataset, classes: Mapping[str, Mapping[str, object]],
                     steps: Mapping[str, list[int]] | None = None, rounds: int = 1) -> dict[str, np.ndarray]:
    """Rounds of devices training their class's model (docs/algorithms.md, "Heterogeneous devices"): each device
    replayed with the torch backend (its class's local model; ``steps``: per round, the mini-batches a cutoff left
    it), then
    the masked mean over all devices, each weighted by the examples it processed per epoch, applied to the
    global model. This is what the edges' means and the cloud's mean of them must come to."""
    from mqttfl.fl.aggregate import masked_average
    from mqttfl.ml.backend import TorchBackend
    from mqttfl.protocol import stage
    from mqttfl.protocol.hetero import DeviceClass
    from mqttfl.protocol.plan import Plan, round_steps

    t, horizon = training_of(spec)
    shards = make_shards(spec, train)
    g = initial_global(spec)
    n = len(build_model(spec.model, input_shape=spec.input_shape, num_classes=t.num_classes))
    with one_thread():
        for rnd in range(rounds):
            plan = Plan.of(replace(t, lr=round_lr(t, rnd, horizon)), run="reference", round=rnd)
            items = []
            for d in sorted(spec.devices):
                cls = spec.device_extra.get(d, {}).get("class")
                local = DeviceClass.of(str(cls), classes[str(cls)]).local() if cls in classes else None
                backend = TorchBackend(d, data=shards[d])
                opened = backend.run(stage.Open("s", plan, 0, n, g, data=True, local=local))
                cut_short = (steps or {}).get(d)
                total = cut_short[rnd] if cut_short else round_steps(len(shards[d]), plan)
                seen = sum(backend.run(stage.LocalBatch("s", i, 1)).n for i in range(total))
                weights = backend.run(stage.Weights("s"))
                masks = {k: m.astype(np.float32) for k, m in (opened.masks if opened else {}).items()}
                samples = len(shards[d]) if not cut_short else min(len(shards[d]), seen // t.epochs)
                items.append((delta(weights, {k: g[k] for k in weights}), masks, float(samples)))
            zeros = {k: np.zeros_like(v) for k, v in g.items()}
            g = apply_delta(g, masked_average(items, zeros))
    return g
