"""A device class's local model in torch (docs/algorithms.md, "Heterogeneous devices"): frozen blocks, pruning and
width masks (width = HeteroFL's slim network), reduced precision, training memory, block profiles; and masked
updates on the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mqttfl.ml import local as variants
from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.data import Dataset, load_digits
from mqttfl.ml.models import initial_state, schema_of
from mqttfl.ml.stage import LocalTrainer, make_optimizer
from mqttfl.protocol import stage
from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.hetero import DeviceClass, LocalModel, compact, expand
from mqttfl.protocol.plan import Plan, Training
from mqttfl.protocol.schema import ModelRef
from mqttfl.wire.encoding import ENCODINGS, encoded_bytes
from tests.reference import one_thread


def _data(shape: tuple[int, ...]) -> Dataset:
    train, _ = load_digits(shape)
    return train.subset(np.arange(160))


def _run(model: str, shape: tuple[int, ...], local: LocalModel | None, steps: int = 4
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], stage.Opened | None, int, TorchBackend]:
    """(start, end weights, Open's result, training memory, backend) of a device training ``steps`` batches."""
    plan = Plan.of(Training(model=model, input_shape=shape, batch_size=40, lr=0.1, momentum=0.9), run="t", round=0)
    ref = ModelRef(model, shape, 10)
    start = initial_state(ref, 3)
    backend = TorchBackend("dev1", data=_data(shape))
    with one_thread():
        opened = backend.run(stage.Open("s", plan, 0, schema_of(ref).n_blocks, start, data=True, local=local))
        for i in range(steps):
            backend.run(stage.LocalBatch("s", i, 1))
        end = backend.run(stage.Weights("s"))
        mem = backend.run(stage.Memory("s"))
    return start, end, opened, mem, backend


def test_a_partial_model_keeps_its_frozen_blocks_bit_identical_and_leaves_them_out_of_its_weights() -> None:
    start, end, opened, mem, backend = _run("vgg5", (3, 16, 16), LocalModel(train="partial", train_blocks=2))
    assert opened is None
    assert sorted({k.split(".")[0] for k in end}) == ["3", "4"]
    frozen = backend.sessions["s"].frozen
    assert frozen is not None and not frozen.training  # BatchNorm statistics of the frozen side do not move
    for key, value in backend.sessions["s"].model.state_dict().items():
        if int(key.split(".")[0]) < 3 and value.is_floating_point():
            assert np.array_equal(value.numpy(), start[key]), key
    assert any(not np.array_equal(end[k], start[k]) for k in end)
    _, _, _, full_mem, _ = _run("vgg5", (3, 16, 16), None)
    assert mem < 0.5 * full_mem  # no activations stored for the frozen convolutions


@pytest.mark.parametrize("by", ["weight", "channel"])
def test_pruned_entries_stay_zero_and_the_ratio_holds(by: str) -> None:
    local = LocalModel(train="pruned", prune=0.75, prune_by=by)
    start, end, opened, _, _ = _run("cnn", (1, 8, 8), local)
    assert opened is not None and opened.masks
    assert "3.0.weight" not in opened.masks  # the output layer is never pruned
    for key, m in opened.masks.items():
        assert np.all(end[key][~m] == 0.0), key
        if key.endswith("weight"):
            if by == "weight":
                assert int(m.sum()) == round(0.25 * m.size)
            else:
                rows = m.reshape(m.shape[0], -1)
                assert np.all(rows.all(axis=1) | ~rows.any(axis=1))  # whole output channels
                assert int(rows.all(axis=1).sum()) == round(0.25 * m.shape[0])
        assert np.any(end[key][m] != start[key][m]), key
    # The largest entries were kept.
    w, m = np.abs(start["1.0.weight"]), opened.masks["1.0.weight"]
    if by == "weight":
        assert w[m].min() >= w[~m].max()


def test_channel_pruning_drops_the_batchnorm_of_the_dropped_channels_with_them() -> None:
    # Averaged in, a dropped channel's statistics (those of a constant zero) would drive the global model's running
    # variance of that channel towards zero, while the global model still computes it: its output blows up.
    start, end, opened, _, backend = _run("vgg5", (3, 16, 16), LocalModel(train="pruned", prune=0.5,
                                                                          prune_by="channel"))
    assert opened is not None
    conv = opened.masks["0.0.weight"]
    channels = conv.reshape(conv.shape[0], -1).all(axis=1)
    assert 0 < channels.sum() < len(channels)
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert np.array_equal(opened.masks[f"0.1.{key}"], channels), key
    assert np.all(end["0.1.running_var"][~channels] == 0.0) and np.all(end["0.1.weight"][~channels] == 0.0)
    assert not any(k.startswith("3.") and k.endswith("running_var") for k in opened.masks)  # no BatchNorm there


def _slim_mlp(width: float) -> nn.Sequential:
    hidden = [max(1, math.ceil(width * h)) for h in (128, 64, 32, 16)]
    widths = [64, *hidden]
    blocks: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        blocks.append(nn.Sequential(*([nn.Flatten()] if i == 0 else []), nn.Linear(a, b), nn.Sigmoid()))
    blocks.append(nn.Sequential(nn.Linear(widths[-1], 10)))
    return nn.Sequential(*blocks)


def test_width_reduction_trains_exactly_as_heterofls_slim_network() -> None:
    start, end, opened, _, _ = _run("mlp", (64,), LocalModel(train="width", width=0.5), steps=3)
    assert opened is not None
    slim = _slim_mlp(0.5)
    sizes = {k: tuple(v.shape) for k, v in slim.state_dict().items()}
    with torch.no_grad():
        for k, p in slim.state_dict().items():
            p.copy_(torch.from_numpy(start[k][tuple(slice(0, n) for n in sizes[k])]))
    t = Training(model="mlp", input_shape=(64,), batch_size=40, lr=0.1, momentum=0.9)
    trainer = LocalTrainer(slim, make_optimizer(slim.parameters(), t), t)
    from mqttfl.ml.data import BatchOrder
    from mqttfl.protocol.plan import data_seed

    data = _data((64,))
    order = BatchOrder(len(data), 40, seed=data_seed(0, "dev1"))
    with one_thread():
        for i in range(3):
            x, y = data.batch(order.batch(0, i))
            trainer.train_batch(torch.from_numpy(x), torch.from_numpy(y))
    for k, v in slim.state_dict().items():
        window = tuple(slice(0, n) for n in sizes[k])
        np.testing.assert_allclose(end[k][window], v.numpy(), atol=2e-6)
        assert opened.masks[k][window].all() and int(opened.masks[k].sum()) == v.numel()


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_reduced_precision_trains_fp32_master_weights(precision: str) -> None:
    start, end, _, mem, backend = _run("vgg5", (3, 16, 16), LocalModel(precision=precision))
    assert all(v.dtype == np.float32 for v in end.values())
    assert max(float(np.abs(end[k] - start[k]).max()) for k in end) > 1e-4
    _, _, _, full_mem, _ = _run("vgg5", (3, 16, 16), None)
    assert mem < full_mem  # activations stored in 16 or 8 bits
    if precision == "int8":
        saved = backend.sessions["s"].saved
        assert saved is not None and saved.int8


def test_fake_quant_lands_on_the_int8_grid_and_passes_gradients_straight_through() -> None:
    x = torch.randn(1000, requires_grad=True)
    q = variants.fake_quant(x)
    scale = float(x.detach().abs().max()) / 127
    steps = q.detach() / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and float(steps.abs().max()) <= 127 + 1e-4
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # type: ignore[arg-type]


def test_a_profile_measures_every_block() -> None:
    plan = Plan.of(Training(model="vgg5", input_shape=(3, 16, 16), batch_size=20), run="t", round=0)
    res = TorchBackend("edge1").run(stage.Profile("profile", plan))
    assert len(res.block_s) == len(res.block_bytes) == 5
    assert all(t > 0 for t in res.block_s) and all(b > 0 for b in res.block_bytes)
    # The first convolution's stored activations dominate the classifier's memory.
    assert res.block_bytes[0] > res.block_bytes[4]


def test_masked_updates_travel_as_kept_values_and_packed_masks() -> None:
    rng = np.random.default_rng(0)
    specs = schema_of(ModelRef("mlp", (64,), 10)).specs()
    delta = {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in specs.items()}
    masks = {"1.0.weight": rng.random(specs["1.0.weight"].shape) < 0.3}
    tensors, packed = compact(delta, masks)
    assert tensors["1.0.weight"].ndim == 1 and tensors["1.0.weight"].size == int(masks["1.0.weight"].sum())
    dense, got = expand(tensors, packed, specs, "d")
    np.testing.assert_array_equal(got["1.0.weight"], masks["1.0.weight"].astype(np.float32))
    np.testing.assert_array_equal(dense["1.0.weight"], np.where(masks["1.0.weight"], delta["1.0.weight"], 0))
    np.testing.assert_array_equal(dense["0.1.bias"], delta["0.1.bias"])
    with pytest.raises(ProtocolError, match="carries"):
        expand({**tensors, "1.0.weight": tensors["1.0.weight"][:-1]}, packed, specs, "d")
    with pytest.raises(ProtocolError, match="bytes"):
        expand(tensors, {"1.0.weight": packed["1.0.weight"][:-1]}, specs, "d")
    sent = [*tensors.values(), *packed.values()]
    for name in ("none", "fp16", "topk"):
        wire = ENCODINGS[name].encode({str(i): t for i, t in enumerate(sent)})
        assert encoded_bytes(name, sent) == sum(v.nbytes for v in wire.values()), name


def test_class_tables_are_checked_by_name() -> None:
    assert DeviceClass.of("weak", {"train": "partial", "tau_s": 3}).local() == LocalModel(train="partial", tau_s=3.0)
    with pytest.raises(ValueError, match="unknown keys"):
        DeviceClass.of("weak", {"trian": "partial"})
    with pytest.raises(ValueError, match="train must be one of"):
        DeviceClass.of("weak", {"train": "half"})
    with pytest.raises(ValueError, match="prune"):
        DeviceClass.of("weak", {"train": "pruned", "prune": 1.0})
    assert LocalModel().plain and not LocalModel(tau_s=1.0).plain and not LocalModel(tau_s=1.0).local_only
    assert LocalModel(precision="bf16").local_only
