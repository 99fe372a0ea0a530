"""Federated evaluation in memory: devices evaluate the global model on their held-out split when the cloud asks,
and the cloud reports the sample-weighted result, which equals the metric over the union of those splits."""

from __future__ import annotations

import numpy as np
import torch

from mqttfl.ml.data import Dataset
from mqttfl.ml.models import build_model, load_model_state
from mqttfl.ml.stage import evaluate
from mqttfl.protocol.messages import EvalReport, EvaluateModel, OpenEval
from mqttfl.runtime.memory import MemoryFleet, match
from mqttfl.tools.testbed import make_eval_shards, make_shards
from tests.helpers import chunks
from tests.pair.common import MODEL, SHAPE, assert_reference, digits, round_entries, spec

DEVS = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}


def fed_fleet(**cloud: object) -> tuple[object, MemoryFleet, dict[str, Dataset]]:
    s = spec(DEVS, cloud={"fed_eval_every": 2, "rounds": 3, **cloud})
    s.eval_fraction = 0.25
    train, test = digits()
    held_out = make_eval_shards(s, train)
    del held_out["dev3"]  # a device without eval_data is not asked
    fleet = MemoryFleet.from_spec(s, make_shards(s, train), test, eval_shards=held_out)
    fleet.start()
    return s, fleet, held_out


def test_devices_evaluate_the_global_model_and_the_cloud_reports_the_weighted_result() -> None:
    s, fleet, held_out = fed_fleet()
    asks = fleet.watch(match("model", msg_type=OpenEval))
    evaluates = fleet.watch(match("model", msg_type=EvaluateModel))
    reports = fleet.watch(match("delta", msg_type=EvalReport))
    fleet.run_to_end(max_time=600)

    feds = fleet.metrics("federated_eval", node="cloud")
    assert [f["round"] for f in feds] == [1, 2], "every 2 rounds, and after the last"
    assert {(p.dst, p.msg.devices) for p in asks.hits} == {("edge1", ("dev1", "dev2"))}
    assert sorted((p.src, p.dst) for p in evaluates.hits) == [("edge1", "dev1")] * 2 + [("edge1", "dev2")] * 2
    assert {(p.src, p.dst, p.reliable) for p in reports.hits} == {("dev1", "cloud", True), ("dev2", "cloud", True)}
    union = Dataset(np.concatenate([d.x for d in held_out.values()]), np.concatenate([d.y for d in held_out.values()]))
    for fed in feds:
        model = build_model(MODEL, input_shape=SHAPE)
        load_model_state(model, fleet.models[("r1", fed["round"])].state)
        with torch.no_grad():
            direct = evaluate(model, chunks(torch.from_numpy(union.x), torch.from_numpy(union.y)))
        assert fed["n"] == len(union) and fed["missing"] == []
        assert abs(fed["accuracy"] - direct["accuracy"]) < 1e-5 and abs(fed["loss"] - direct["loss"]) < 1e-4
        assert {d: v["n"] for d, v in fed["devices"].items()} == {d: len(v) for d, v in held_out.items()}
    # Beside the central result, in the round's history entry.
    history = fleet.command("cloud", "history")["result"]
    assert history[1]["federated"]["accuracy"] == feds[0]["accuracy"] and "federated" not in history[0]
    assert history[1]["accuracy"] is not None
    # No round starts while an evaluation is open, and training is not changed by it.
    order = [(e["event"], e.get("round")) for e in fleet.event_log if e["event"] in ("evaluation_started",
                                                                                   "round_started")]
    assert order == [("round_started", 0), ("round_started", 1), ("evaluation_started", 1), ("round_started", 2),
                     ("evaluation_started", 2)]
    assert_reference(fleet, s, rounds=3)
    assert fleet.drops() == [] and fleet.job_errors == []


def test_a_device_that_does_not_answer_is_reported_missing_at_the_deadline() -> None:
    s, fleet, held_out = fed_fleet(rounds=2, deadline_s=30.0)
    fleet.drop(match("delta", msg_type=EvalReport, src="dev2"), times=None)
    fleet.run_to_end(max_time=600)
    (fed,) = fleet.metrics("federated_eval", node="cloud")
    assert fed["missing"] == ["dev2"] and fed["n"] == len(held_out["dev1"]) and list(fed["devices"]) == ["dev1"]
    assert fed["eval_s"] >= 30.0
    assert len(round_entries(fleet)) == 2
