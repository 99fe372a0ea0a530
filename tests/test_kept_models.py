"""What the cloud keeps of its runs on disk (docs/operations.md, "Runs"): the last rounds' models and the best,
each run's history, and how ``mqttfl export`` finds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mqttfl.protocol.events import SaveModel
from mqttfl.runtime.persist import save_state
from mqttfl.runtime.runs import RunStore, list_runs, read_model
from mqttfl.tools.export import cloud_folder, pick

INFO = {"model": "mlp", "input_shape": [64], "num_classes": 10, "loss": "cross_entropy", "task": "classification"}


def state(v: float) -> dict[str, np.ndarray]:
    return {"0.1.weight": np.full((2, 2), v, np.float32)}


def test_the_last_rounds_and_the_best_are_kept_per_run_with_the_runs_history(tmp_path: Path) -> None:
    store = RunStore(tmp_path, keep=2)
    for r, best in enumerate([True, False, True, False, False]):
        store.save(SaveModel("r1", r, state(r), {**INFO, "metrics": {"accuracy": r / 10}}, best=best))
        store.history({"kind": "round", "run": "r1", "round": r})
    store.save(SaveModel("r2", 0, state(9), INFO, best=True))
    assert list_runs(tmp_path) == {"r1": {"rounds": [3, 4], "best": True, "history": True},
                                   "r2": {"rounds": [0], "best": True, "history": False}}
    assert read_model(tmp_path, "r1", "last")["round"] == 4
    best = read_model(tmp_path, "r1", "best")
    assert best["round"] == 2 and float(best["state"]["0.1.weight"][0, 0]) == 2.0
    assert read_model(tmp_path, "r1", 3)["info"]["metrics"] == {"accuracy": 0.3}
    with pytest.raises(ValueError, match="kept"):
        read_model(tmp_path, "r1", 1)
    assert len((tmp_path / "runs" / "r1" / "history.jsonl").read_text().splitlines()) == 5


def test_export_finds_the_current_run_and_falls_back_to_the_clouds_state(tmp_path: Path) -> None:
    cloud = tmp_path / "cloud"
    save_state(cloud / "cloud.state", {
        "run": "r3", "round": 2, "global": state(7), "settings": {**INFO, "run": "r3"},
        "history": [{"kind": "round", "run": "r3", "round": 1, "accuracy": 0.8, "loss": 0.5}]})
    assert cloud_folder(tmp_path) == cloud and cloud_folder(cloud) == cloud
    RunStore(cloud, keep=0).save(SaveModel("r3", 1, state(7), INFO, best=True))  # keep_models = 0: only the best
    assert pick(cloud, None, "best")["round"] == 1
    last = pick(cloud, None, "last")
    assert last["round"] == 1 and last["info"]["metrics"] == {"accuracy": 0.8, "loss": 0.5}
    assert float(last["state"]["0.1.weight"][0, 0]) == 7.0
    with pytest.raises(ValueError, match="no model"):
        pick(cloud, "r9", "last")
    with pytest.raises(ValueError, match="no cloud state"):
        cloud_folder(tmp_path / "elsewhere")
