"""Who takes part in a run, in memory: nodes whose model (by fingerprint) or data do not fit the run refuse it,
say why and are left out; round 0 waits for the devices the config names; client sampling picks each round's
devices, seeded, and reports them; the cloud keeps each round's model and lists its runs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from mqttfl.ml.data import Dataset
from mqttfl.ml.models import schema_of
from mqttfl.protocol.schema import ModelRef, ModelSchema
from mqttfl.runtime.memory import MemoryFleet
from mqttfl.tools.testbed import FleetSpec, make_shards
from tests import reference
from tests.pair.common import BASE_CLOUD, TOL, assert_reference, digits, fleet_of, max_abs_diff, round_entries, spec

USER = "tests.user_model:tiny_mlp"


def other_version(ref: ModelRef) -> ModelSchema:
    """How a node with the next release of the user's package builds the run's model."""
    return schema_of(replace(ref, model="tests.user_model:tiny_mlp_v2"))


def user_fleet(devices: dict[str, str], *, schemas: dict[str, Any] | None = None, **cloud: Any
               ) -> tuple[FleetSpec, MemoryFleet]:
    s = FleetSpec(devices=devices, model=USER, input_shape=(64,), cloud={**BASE_CLOUD, **cloud})
    train, test = digits()
    shards = make_shards(s, train)
    fleet = MemoryFleet(seed=0)
    section = {"model": USER, "input_shape": [64], "min_devices": len(devices), **s.cloud}
    fleet.add_cloud(test=test, **section)
    for e in s.edges:
        fleet.add_edge(e, **({"schemas": schemas[e]} if schemas and e in schemas else {}))
    for d, e in sorted(devices.items()):
        fleet.add_device(d, edge=e, data=shards[d], **({"schemas": schemas[d]} if schemas and d in schemas else {}))
    return s, fleet


def test_a_device_with_another_version_of_the_model_refuses_naming_the_tensor_and_the_run_goes_on() -> None:
    s, fleet = user_fleet({"dev1": "edge1", "dev2": "edge1", "dev3": "edge2"}, schemas={"dev2": other_version},
                          wait_for=["dev1", "dev2", "dev3"], min_devices=1, rounds=3)
    fleet.start()
    fleet.run_to_end(max_time=600)
    (refusal,) = fleet.events("model_mismatch", node="dev2")
    assert refusal["level"] == "error" and refusal["run"] == "r1"
    assert "'0.0.weight': block 0 float32[16, 64] here, block 0 float32[8, 64] there" in refusal["reason"]
    assert refusal["expected"] == schema_of(ModelRef(USER, (64,), 10)).fingerprint != refusal["fingerprint"]
    status = fleet.status("dev2")
    assert status["refused"]["run"] == "r1" and "0.0.weight" in status["refused"]["reason"]
    (noted,) = fleet.events("node_refused", node="cloud")
    assert noted["refusing"] == "dev2" and "0.0.weight" in noted["reason"]
    entries = round_entries(fleet)
    # Round 0 counts dev2 missing without waiting for a deadline; later rounds leave it out.
    assert entries[0]["missing"] == ["dev2"] and entries[0]["round_s"] < 1.0
    assert [e["sampled"] for e in entries[1:]] == [["dev1", "dev3"]] * 2
    assert fleet.machine("dev2").rounds_done == 0
    assert_reference(fleet, s, rounds=[["dev1", "dev3"]] * 3)


def test_an_edge_with_another_version_of_the_model_refuses_and_its_devices_are_left_out() -> None:
    s, fleet = user_fleet({"dev1": "edge1", "dev2": "edge2"}, schemas={"edge2": other_version},
                          wait_for=["dev1", "dev2"], min_devices=1)
    fleet.start()
    fleet.run_to_end(max_time=600)
    (refusal,) = fleet.events("model_mismatch", node="edge2")
    assert "0.0.weight" in refusal["reason"]
    assert fleet.events("node_refused", node="cloud")[0]["refusing"] == "edge2"
    entries = round_entries(fleet)
    assert entries[0]["missing"] == ["dev2"] and entries[1]["sampled"] == ["dev1"]
    assert_reference(fleet, s, rounds=[["dev1"]] * 2)


def test_a_device_whose_labels_do_not_fit_the_plan_refuses_it() -> None:
    train, test = digits()
    # Round 0 with both (wait_for); later rounds go on with the one left (min_devices).
    s = spec({"dev1": "edge1", "dev2": "edge1"}, cloud={"wait_for": ["dev1", "dev2"], "min_devices": 1})
    shards = make_shards(s, train)
    shards["dev2"] = Dataset(shards["dev2"].x, np.where(shards["dev2"].y == 9, 11, shards["dev2"].y))
    fleet = MemoryFleet.from_spec(s, shards, test)
    fleet.start()
    fleet.run_to_end(max_time=600)
    (refusal,) = fleet.events("data_mismatch", node="dev2")
    assert "labels go up to 11 but the run has num_classes = 10" in refusal["reason"]
    entries = round_entries(fleet)
    assert entries[0]["missing"] == ["dev2"] and entries[1]["sampled"] == ["dev1"]
    assert fleet.drops(reason="bad_labels") == []


def test_round_zero_waits_for_the_named_devices() -> None:
    s = spec({"dev1": "edge1", "dev2": "edge1"}, extra_edges=("edge2",),
             cloud={"wait_for": ["dev3"], "rounds": 1, "min_devices": 1})
    fleet = fleet_of(s)
    fleet.run_for(30.0)
    assert fleet.events("round_started") == []
    waiting = fleet.events("waiting_for_devices")
    assert waiting and waiting[-1]["missing"] == ["dev3"] and waiting[-1]["until"] is None
    fleet.add_device("dev3", edge="edge2", data=digits()[0].subset(np.arange(40)))
    fleet.start()  # dev3 comes up late
    fleet.run_to_end(max_time=600)
    (started,) = fleet.events("round_started")
    assert started["sampled"] == ["dev1", "dev2", "dev3"] and started["ts"] >= 30.0


def test_round_zero_starts_without_a_named_device_once_the_grace_period_is_over() -> None:
    s = spec({"dev1": "edge1", "dev2": "edge1"}, cloud={"wait_for": ["dev1", "dev9"], "start_grace_s": 20.0,
                                                       "rounds": 1, "min_devices": 2})
    fleet = fleet_of(s)
    fleet.run_to_end(max_time=600)
    (started,) = fleet.events("round_started")
    assert 20.0 <= started["ts"] < 21.0 and started["sampled"] == ["dev1", "dev2"]
    (without,) = fleet.events("starting_without")
    assert without["devices"] == ["dev9"]


DEVICES6 = {f"dev{i}": f"edge{1 + i % 2}" for i in range(1, 7)}


@pytest.mark.parametrize(("cloud", "k"), [({"sample_size": 2}, 2), ({"sample_fraction": 0.5}, 3)])
def test_client_sampling_trains_a_seeded_subset_each_round_and_reports_it(cloud: dict[str, Any], k: int) -> None:
    s = spec(DEVICES6, cloud={**cloud, "rounds": 3})
    fleet = fleet_of(s)
    fleet.run_to_end(max_time=600)
    entries = round_entries(fleet)
    picked = [e["sampled"] for e in entries]
    assert all(len(p) == k and e["eligible"] == 6 for p, e in zip(picked, entries, strict=True))
    assert len({tuple(p) for p in picked}) > 1, "rounds draw afresh"
    assert [e["sampled"] for e in fleet.events("round_started")] == picked
    assert [sorted(e["devices"]) for e in entries] == picked, "only the sampled devices trained"
    assert_reference(fleet, s, rounds=picked)
    again = fleet_of(s)
    again.run_to_end(max_time=600)
    assert [e["sampled"] for e in round_entries(again)] == picked, "the same seed picks the same devices"
    other = fleet_of(spec(DEVICES6, cloud={**cloud, "rounds": 3, "seed": 8}))
    other.run_to_end(max_time=600)
    assert [e["sampled"] for e in round_entries(other)] != picked


def test_the_cloud_keeps_each_rounds_model_marks_the_best_and_lists_its_runs() -> None:
    s = spec({"dev1": "edge1", "dev2": "edge2"}, cloud={"rounds": 3})
    fleet = fleet_of(s)
    fleet.run_to_end(max_time=600)
    entries = round_entries(fleet)
    best_round = max(range(3), key=lambda r: (entries[r]["accuracy"], -r))
    assert sorted(k[1] for k in fleet.models if k[0] == "r1" and k[1] != "best") == [0, 1, 2]
    best = fleet.models[("r1", "best")]
    assert best.round == best_round and best.info["metrics"]["accuracy"] == entries[best_round]["accuracy"]
    assert max_abs_diff(fleet.models[("r1", 2)].state, fleet.global_state()) == 0.0
    assert max_abs_diff(best.state, reference.reference_global(s, digits()[0], best_round + 1)) <= TOL
    runs = fleet.command("cloud", "runs")["result"]
    assert runs["current"] == "r1"
    (r1,) = runs["runs"]
    assert (r1["state"], r1["completed"], r1["rounds"]) == ("done", 3, 3)
    assert r1["best"] == {"round": best_round, "metric": "accuracy", "value": entries[best_round]["accuracy"]}
    assert fleet.command("cloud", "new-run", run="r2")["ok"]
    fleet.run_until(lambda: fleet.events("run_complete", run="r2"), max_time=600)
    listed = fleet.command("cloud", "runs")["result"]["runs"]
    assert [(r["run"], r["state"], r["completed"]) for r in listed] == [("r1", "done", 3), ("r2", "done", 3)]
    assert fleet.persisted("cloud")["runs"]["r1"]["best"]["round"] == best_round
