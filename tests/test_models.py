"""Model registry and the Part view: cuts at block boundaries, global state keys, exact seeded init."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mqttfl.ml.models import MODELS, Part, build_model, initial_state, load_model_state, model_state, schema_of
from mqttfl.protocol.schema import ModelRef
from tests.helpers import schema


def split_model(model: nn.Sequential, cut: int) -> tuple[Part, Part]:
    return Part(model, 0, cut), Part(model, cut, len(model))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_maps_its_default_input_to_class_logits(name: str) -> None:
    info = schema(name)
    model = build_model(name, seed=0)
    assert len(model) == info.n_blocks
    assert 1 <= info.default_cut < info.n_blocks
    assert model(torch.randn(3, *MODELS[name].input_shape)).shape == (3, 10)
    # The schema describes the real model: its keys, shapes and the activation shape at every cut.
    assert {s.key: s.shape for s in info.specs().values()} == {k: v.shape for k, v in model_state(model).items()}
    x = torch.randn(2, *MODELS[name].input_shape)
    model.eval()
    for cut in range(info.n_blocks + 1):
        assert tuple(model[:cut](x).shape[1:]) == info.activation(cut)


@pytest.mark.parametrize(
    ("name", "shape"), [("vgg5", (1, 8, 8)), ("cnn", (1, 8, 8)), ("cnn", (3, 32, 32)), ("mlp", (1, 8, 8))]
)
def test_models_size_their_layers_from_the_input_shape(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, input_shape=shape, num_classes=7, seed=0)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="vgg5"):
        build_model("resnet-9000")
    with pytest.raises(ValueError, match="cannot load"):
        build_model("tests.user_model:missing", input_shape=(4,))


def test_a_users_model_by_module_function_reference_is_built_and_described() -> None:
    ref = ModelRef("tests.user_model:tiny_mlp", (6,), 3)
    model = build_model(ref.model, input_shape=ref.input_shape, num_classes=ref.num_classes, seed=0)
    assert model(torch.randn(5, 6)).shape == (5, 3)
    s = schema_of(ref)
    assert s.n_blocks == 3 and s.default_cut == 2 and s.activation(1) == (8,)
    assert set(initial_state(ref, seed=0)) == set(s.specs())


def test_the_fingerprint_tells_architectures_apart_and_names_the_first_difference() -> None:
    a = schema_of(ModelRef("mlp", (64,), 10))
    b = schema_of(ModelRef("mlp", (64,), 7))
    assert a.fingerprint == schema_of(ModelRef("mlp", (64,), 10)).fingerprint
    assert a.fingerprint != b.fingerprint
    assert a.difference(a.describe()) is None
    assert "4.0.weight" in str(a.difference(b.describe()))


def test_vgg5_has_fedflys_blocks_and_sends_64x8x8_at_the_default_cut() -> None:
    model = build_model("vgg5", seed=0)
    kinds = [[type(m) for m in block] for block in model]
    conv = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert kinds == [
        [*conv, nn.MaxPool2d],
        [*conv, nn.MaxPool2d],
        conv,
        [nn.Flatten, nn.Linear, nn.ReLU],
        [nn.Linear],
    ]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in (b[0] for b in model[:3])] == [
        (3, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
        (64, 64, (3, 3), (1, 1)),
    ]
    assert (model[3][1].in_features, model[3][1].out_features) == (4096, 128)
    assert (model[4][0].in_features, model[4][0].out_features) == (128, 10)
    device, _ = split_model(model, schema("vgg5").default_cut)
    assert device.module(torch.randn(100, 3, 32, 32)).shape == (100, 64, 8, 8)


def test_vgg5_edge_side_matches_the_measured_parameter_count() -> None:
    _, edge = split_model(build_model("vgg5", seed=0), 2)
    weighted = (m for m in edge.module.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    # FedFly's 562,634 counts the conv and linear layers; BN's 64 scales and 64 shifts come on top.
    assert sum(p.numel() for m in weighted for p in m.parameters()) == 562_634
    assert sum(p.numel() for p in edge.module.parameters()) == 562_634 + 128


def test_same_seed_builds_bit_identical_weights_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = model_state(build_model("vgg5", seed=7))
    assert torch.equal(torch.rand(1), expected_next)
    b = model_state(build_model("vgg5", seed=7))
    c = model_state(build_model("vgg5", seed=8))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.0.weight"], c["0.0.weight"])


def test_part_keys_are_global_and_device_plus_edge_is_the_whole_model() -> None:
    model = build_model("vgg5", seed=0)
    device, edge = split_model(model, 2)
    assert device.keys()[0] == "0.0.weight"
    assert "2.1.running_mean" in edge.keys()
    assert not set(device.keys()) & set(edge.keys())
    full = model_state(model)
    merged = {**device.state(), **edge.state()}
    assert merged.keys() == full.keys()
    assert all(np.array_equal(merged[k], full[k]) for k in full)


def test_state_holds_float_params_and_bn_statistics_but_not_the_batch_counter() -> None:
    state = model_state(build_model("vgg5", seed=0))
    assert {"0.1.running_mean", "0.1.running_var", "0.1.weight"} <= state.keys()
    assert not any(k.endswith("num_batches_tracked") for k in state)
    assert all(v.dtype == np.float32 for v in state.values())


def test_part_module_shares_the_models_blocks() -> None:
    model = build_model("mlp", seed=0)
    device, edge = split_model(model, 2)
    assert device.module[0] is model[0] and edge.module[0] is model[2]
    x = torch.randn(4, 64)
    assert torch.equal(edge.module(device.module(x)), model(x))


def test_state_is_a_copy_not_a_view_of_the_weights() -> None:
    model = build_model("mlp", seed=0)
    device, _ = split_model(model, 2)
    state = device.state()
    state["0.1.weight"][:] = 5.0
    assert not torch.all(model[0][1].weight == 5.0)


def test_load_state_round_trips_and_ignores_other_blocks_keys() -> None:
    source = build_model("vgg5", seed=1)
    target = build_model("vgg5", seed=2)
    _, edge_t = split_model(target, 2)
    device_before = split_model(target, 2)[0].state()
    edge_t.load_state(model_state(source))  # the full state: device keys must be ignored
    assert all(np.array_equal(v, model_state(source)[k]) for k, v in edge_t.state().items())
    device_after = split_model(target, 2)[0].state()
    assert all(np.array_equal(device_before[k], device_after[k]) for k in device_before)
    load_model_state(target, model_state(source))
    x = torch.randn(2, 3, 32, 32)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))


def test_load_state_names_a_missing_key() -> None:
    _, edge = split_model(build_model("mlp", seed=0), 2)
    state = edge.state()
    del state["3.0.bias"]
    with pytest.raises(KeyError, match="3.0.bias"):
        edge.load_state(state)


def test_load_state_rejects_a_shape_mismatch_without_loading_anything() -> None:
    model = build_model("mlp", seed=0)
    before = model_state(model)
    bad = {k: np.zeros_like(v) for k, v in before.items()}
    bad["4.0.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"4\.0\.weight"):
        load_model_state(model, bad)
    after = model_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_the_whole_model_as_one_part_leaves_the_other_side_empty() -> None:
    model = build_model("mlp", seed=0)
    device, edge = split_model(model, 5)
    assert len(device.module) == 5 and edge.keys() == []


def test_a_block_range_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        Part(build_model("mlp", seed=0), 0, 6)
    with pytest.raises(ValueError):
        Part(build_model("mlp", seed=0), 3, 2)


def test_a_model_registered_as_an_entry_point_is_built_by_its_name(tmp_path, monkeypatch) -> None:
    dist = tmp_path / "greenhouse_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: greenhouse-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mqttfl.models]\ngreenhouse = tests.user_model:tiny_mlp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = ModelRef("greenhouse", (6,), 3)
    assert schema_of(ref).fingerprint == schema_of(ModelRef("tests.user_model:tiny_mlp", (6,), 3)).fingerprint
    assert build_model("greenhouse", input_shape=(6,), num_classes=3)(torch.randn(2, 6)).shape == (2, 3)
    with pytest.raises(ValueError, match="greenhouse"):
        build_model("nursery", input_shape=(6,))
