"""Migration checkpoint core: round trip through the wire format, optimizer state survives, bad ones refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mqttfl.ml.models import Part, build_model, schema_of
from mqttfl.ml.stage import Stage, make_optimizer
from mqttfl.protocol.checkpoint import CHECKPOINT_FORMAT, CheckpointError, EdgeCheckpoint, digest, from_message
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import ModelRef
from mqttfl.wire.codec import Envelope, decode, encode

CUT = 2
REF = ModelRef("mlp", (64,), 10)


def _edge(seed: int = 0):
    model = build_model("mlp", seed=seed)
    part = Part(model, CUT, len(model))
    return model, part, Stage(part, make_optimizer(part.module.parameters(), lr=0.05, momentum=0.9))


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 64, generator=g), torch.randint(0, 10, (10,), generator=g)) for _ in range(n)]


def _smashed(model, x):
    with torch.no_grad():
        return model[:CUT](x)


def _train(stage: Stage, model, batches) -> None:
    for x, y in batches:
        stage.loss(_smashed(model, x), y, len(x))
        stage.step()


def _capture(stage: Stage, base) -> EdgeCheckpoint:
    return EdgeCheckpoint(device="dev1", migration="m1", plan=Plan(run="r", round=3, model="mlp", input_shape=(64,)),
                          cut=CUT, weights=stage.part.state(), optimizer=stage.optimizer_state(), base=base,
                          expected=(4, 0), steps=4, loss_sum=1.5, seen=40, n_micro=1,
                          rng=torch.get_rng_state().numpy())


def _restore(ck: EdgeCheckpoint):
    model, part, stage = _edge(seed=99)  # different init: everything must come from the checkpoint
    part.load_state(ck.weights)
    stage.load_optimizer_state(ck.optimizer)
    return stage


def _wire(ck: EdgeCheckpoint) -> tuple[dict, dict]:
    body, tensors = ck.to_message()
    env = decode(encode(Envelope(kind="ckpt", src="edge1", dst="edge2", body=body, tensors=tensors)))
    return env.body, env.tensors


def _reference():
    return schema_of(REF).specs(CUT)


def test_restored_edge_continues_exactly_like_the_original_including_momentum():
    model, part, stage = _edge()
    base = part.state()
    batches = _batches(8)
    _train(stage, model, batches[:4])
    body, tensors = _wire(_capture(stage, base))
    ck = from_message(body, tensors, "m1", _reference())
    assert ck.expected == (4, 0) and ck.steps == 4 and ck.plan.round == 3
    assert ck.optimizer and all(k.endswith("|momentum_buffer") for k in ck.optimizer)
    stage2 = _restore(ck)
    for st in (stage, stage2):
        _train(st, model, batches[4:])  # same device-side input for both
    a, b = stage.part.state(), stage2.part.state()
    assert all(np.array_equal(a[k], b[k]) for k in a), "migrated edge state diverged from the original"


def test_lost_momentum_would_diverge():
    """The test above would catch a checkpoint that drops the optimizer state."""
    model, part, stage = _edge()
    batches = _batches(6)
    _train(stage, model, batches[:3])
    ck = _capture(stage, part.state())
    ck.optimizer = {}
    stage2 = _restore(ck)
    for st in (stage, stage2):
        _train(st, model, batches[3:])
    a, b = stage.part.state(), stage2.part.state()
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def _valid() -> tuple[dict, dict, tuple]:
    model, part, stage = _edge()
    _train(stage, model, _batches(1))
    body, tensors = _wire(_capture(stage, part.state()))
    return dict(body), {k: np.array(v) for k, v in tensors.items()}, ("m1", _reference())


def test_checkpoint_with_bad_checksum_is_refused():
    body, tensors, ref = _valid()
    key = next(k for k in tensors if k.startswith("w/"))
    tensors[key].reshape(-1)[0] += 1.0
    with pytest.raises(CheckpointError) as e:
        from_message(body, tensors, *ref)
    assert e.value.code == "checksum"


def test_checkpoint_with_wrong_format_version_is_refused():
    body, tensors, ref = _valid()
    body["format"] = CHECKPOINT_FORMAT + 1
    with pytest.raises(CheckpointError) as e:
        from_message(body, tensors, *ref)
    assert e.value.code == "bad_version"


def test_checkpoint_with_wrong_shapes_is_refused_even_with_a_matching_checksum():
    body, tensors, ref = _valid()
    key = next(k for k in tensors if k.startswith("w/") and tensors[k].ndim == 2)
    tensors[key] = np.zeros((3, 3), dtype=np.float32)
    body["sha256"] = digest(tensors)
    with pytest.raises(CheckpointError) as e:
        from_message(body, tensors, *ref)
    assert e.value.code == "bad_shape"


def test_checkpoint_with_nan_weights_is_refused():
    body, tensors, ref = _valid()
    key = next(k for k in tensors if k.startswith("w/"))
    tensors[key].reshape(-1)[0] = np.nan
    body["sha256"] = digest(tensors)
    with pytest.raises(CheckpointError) as e:
        from_message(body, tensors, *ref)
    assert e.value.code == "non_finite"


def test_checkpoint_not_at_a_mini_batch_boundary_is_refused():
    body, tensors, ref = _valid()
    body["expected"] = [3, 1]
    with pytest.raises(CheckpointError) as e:
        from_message(body, tensors, *ref)
    assert e.value.code == "bad_field"


def test_optimizer_state_for_a_parameter_the_model_lacks_is_refused():
    body, tensors, ref = _valid()
    tensors["o/9.9.weight|momentum_buffer"] = np.zeros(3, np.float32)
    body["sha256"] = digest(tensors)
    with pytest.raises(CheckpointError) as e:
        from_message(body, tensors, *ref)
    assert e.value.code == "bad_shape"
