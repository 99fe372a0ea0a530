"""Migration checkpoint core: round trip through the wire format, momentum survives, bad ones refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mqttfl.ml.models import build_model, split_model
from mqttfl.ml.stage import EdgeStage, make_optimizer
from mqttfl.protocol.checkpoint import CHECKPOINT_FORMAT, CheckpointError, EdgeCheckpoint, digest, from_message
from mqttfl.protocol.messages import Plan
from mqttfl.wire.codec import Envelope, decode, encode

CUT = 2


def _edge(seed: int = 0):
    model = build_model("mlp", seed=seed)
    _, part = split_model(model, CUT)
    opt = make_optimizer(part.module.parameters(), lr=0.05, momentum=0.9)
    return model, part, opt, EdgeStage(part, opt)


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 64, generator=g), torch.randint(0, 10, (10,), generator=g)) for _ in range(n)]


def _smashed(model, x):
    with torch.no_grad():
        return model[:CUT](x)


def _capture(part, opt, base) -> EdgeCheckpoint:
    momentum = {k: opt.state[p]["momentum_buffer"].numpy().copy() for k, p in part.named_parameters()}
    return EdgeCheckpoint(device="dev1", migration="m1", plan=Plan(run="r", round=3, model="mlp", input_shape=(64,)),
                          cut=CUT, weights=part.state(), momentum=momentum, base=base, expected=(4, 0), steps=4,
                          loss_sum=1.5, seen=40, n_micro=1, smashed_shape=(64,),
                          rng=torch.get_rng_state().numpy())


def _restore(ck: EdgeCheckpoint):
    model, part, opt, stage = _edge(seed=99)  # different init: everything must come from the checkpoint
    part.load_state(ck.weights)
    for k, p in part.named_parameters():
        opt.state[p]["momentum_buffer"] = torch.from_numpy(np.array(ck.momentum[k]))
    return model, part, opt, stage


def _wire(ck: EdgeCheckpoint) -> tuple[dict, dict]:
    body, tensors = ck.to_message()
    env = decode(encode(Envelope(kind="ckpt", src="edge1", dst="edge2", body=body, tensors=tensors)))
    return env.body, env.tensors


def _reference(part):
    return part.state(), [k for k, _ in part.named_parameters()]


def test_restored_edge_continues_exactly_like_the_original_including_momentum():
    model, part, opt, stage = _edge()
    base = part.state()
    batches = _batches(8)
    for x, y in batches[:4]:
        stage.forward_backward(_smashed(model, x), y, len(x))
        stage.step()
    body, tensors = _wire(_capture(part, opt, base))
    ck = from_message(body, tensors, *_reference(_edge(seed=5)[1]))
    assert ck.expected == (4, 0) and ck.steps == 4 and ck.plan.round == 3
    _, part2, _, stage2 = _restore(ck)
    for x, y in batches[4:]:
        for st in (stage, stage2):
            st.forward_backward(_smashed(model, x), y, len(x))  # same device-side input for both
            st.step()
    a, b = part.state(), part2.state()
    assert all(np.array_equal(a[k], b[k]) for k in a), "migrated edge state diverged from the original"


def test_lost_momentum_would_diverge():
    """The test above would catch a checkpoint that drops the optimizer state."""
    model, part, opt, stage = _edge()
    batches = _batches(6)
    for x, y in batches[:3]:
        stage.forward_backward(_smashed(model, x), y, len(x))
        stage.step()
    ck = _capture(part, opt, part.state())
    ck.momentum = {}
    _, part2, _, stage2 = _edge(seed=99)
    part2.load_state(ck.weights)
    for x, y in batches[3:]:
        for st in (stage, stage2):
            st.forward_backward(_smashed(model, x), y, len(x))
            st.step()
    a, b = part.state(), part2.state()
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def _valid() -> tuple[dict, dict, tuple]:
    model, part, opt, stage = _edge()
    x, y = _batches(1)[0]
    stage.forward_backward(_smashed(model, x), y, len(x))
    stage.step()
    body, tensors = _wire(_capture(part, opt, part.state()))
    return dict(body), {k: np.array(v) for k, v in tensors.items()}, _reference(part)


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
