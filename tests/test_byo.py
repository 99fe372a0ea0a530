"""Bring your own model and data, take the trained model home (README, "Your own model and data"), end to end with
real processes and the commands a user types.

A package that is not part of mqttfl (written here, on the agents' PYTHONPATH) defines the model; a CSV file holds
the data. ``mqttfl data split`` makes the shards, a cloud, two edges and four devices train the model by its
``module:function`` reference with Adam and client sampling (three devices a round), the devices evaluate the
global model on their held-out splits (federated evaluation), one device runs another version of the package and
is refused with the tensor that differs, and ``mqttfl export`` writes the final model, which plain PyTorch loads
and scores exactly as the cloud reported (so does ``mqttfl predict``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec, Testbed, write_toml

pytestmark = pytest.mark.timeout(300)

DEVICES = {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2", "dev4": "edge2"}
MODEL = '''
from torch import nn


def classifier(input_shape, num_classes):
    (d,) = input_shape
    return [nn.Sequential(nn.Linear(d, {width}), nn.ReLU()),
            nn.Sequential(nn.Linear({width}, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, num_classes))]


classifier.default_cut = 1
'''


def user_package(root: Path, width: int) -> Path:
    pkg = root / "greenhouse"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODEL.replace("{width}", str(width)))
    return root


def sensor_csv(path: Path, rows: int = 1500) -> None:
    """Readings of six sensors and the state an operator labelled: three overlapping clusters."""
    rng = np.random.default_rng(4)
    centres = rng.normal(scale=2.0, size=(3, 6))
    label = rng.integers(0, 3, size=rows)
    x = centres[label] + rng.normal(size=(rows, 6))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_air", "t_soil", "rh", "lux", "co2", "ph", "station", "state"])
        for i in range(rows):
            w.writerow([*(f"{v:.4f}" for v in x[i]), f"gh{i % 5}", ["dry", "ok", "wet"][label[i]]])


REPO = Path(__file__).resolve().parent.parent


def path_env(*paths: Path) -> dict[str, str]:
    """This environment with PYTHONPATH set to ``paths`` (a user's package, and mqttfl where the tool needs it)."""
    return {**os.environ, "PYTHONPATH": ":".join(map(str, paths))}


def cli(*args: Any, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "mqttfl.tools.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env or path_env(REPO), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_a_users_model_and_csv_train_in_a_fleet_and_the_exported_model_scores_what_the_cloud_reported(
    tmp_path: Path, broker: Broker, fleet: str
) -> None:
    v1, v2 = user_package(tmp_path / "pkg-v1", 32), user_package(tmp_path / "pkg-v2", 48)
    sensor_csv(tmp_path / "greenhouse.csv")
    split = cli("data", "split", tmp_path / "greenhouse.csv", "--out", tmp_path / "shards", "--label", "state",
                "--drop", "station", "--devices", ",".join(DEVICES), "--partition", "dirichlet:1.0",
                "--eval-fraction", "0.2", "--standardize", "--seed", "1")
    meta = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert meta["classes"] == ["dry", "ok", "wet"] and 'loss = "cross_entropy"' in split.stdout

    root = tmp_path / "fleet"
    spec = FleetSpec(devices=dict(DEVICES), model="greenhouse.models:classifier", input_shape=(6,), fleet=fleet)
    tb = Testbed(root, spec, broker=broker)
    common = {"fleet": fleet, "state_dir": str(root / "state"), "mqtt": {"host": broker.host, "port": broker.port}}
    # The [cloud] keys mqttfl data printed, and the run's choices.
    cloud = {**meta["cloud"], "model": "greenhouse.models:classifier", "rounds": 6, "optimizer": "adam", "lr": 0.01,
             "batch_size": 32, "seed": 2, "sample_size": 3, "fed_eval_every": 3, "min_devices": 2,
             "wait_for": list(DEVICES), "keep_models": 2, "run": "greenhouse-1", "edges": ["edge1", "edge2"]}
    tb.configs["cloud"] = write_toml(root / "cloud.toml", {"node": "cloud", **common, "cloud": cloud})
    for e in ("edge1", "edge2"):
        tb.configs[e] = write_toml(root / f"{e}.toml", {"node": e, **common, "edge": {}})
    for d, e in DEVICES.items():
        shard = meta["shards"][d]
        tb.configs[d] = write_toml(root / f"{d}.toml", {"node": d, **common, "device": {
            "edge": e, "data": shard["data"], "eval_data": shard["eval_data"]}})
    for node in ("cloud", "edge1", "dev1"):
        assert "valid" in cli("config", "check", tb.role_of(node), tb.configs[node]).stdout
    try:
        tb.connect_operator()
        for node in ["cloud", "edge1", "edge2", *DEVICES]:
            # Every node has the user's package installed; dev4 has another version of it.
            pkg = v2 if node == "dev4" else v1
            tb.start_node(node, env={"PYTHONPATH": f"{pkg}:{REPO}"})
        end = tb.wait_event("run_complete", 240)
        rounds = {m["round"]: m for m in tb.round_metrics()}
        events = [m.data for m in tb.inbox if m.kind == "event" and m.data]

        # A custom model by reference trained on the CSV's shards, with the task's metrics.
        assert sorted(rounds) == list(range(6)) and end["accuracy"] == rounds[5]["accuracy"] > 0.8
        # The other version is refused with the tensor that differs, and left out of the run.
        refusal = next(e for e in events if e["event"] == "model_mismatch")
        assert refusal["node"] == "dev4" and "'0.0.weight': block 0 float32[48, 6] here, block 0 float32[32, 6] " \
            "there" in refusal["reason"]
        assert any(e["event"] == "node_refused" and e["refusing"] == "dev4" for e in events)
        # Client sampling: three of the four in round 0 (dev4 among them, refusing), then the three others.
        assert rounds[0]["sampled"] == ["dev1", "dev2", "dev4"] and rounds[0]["eligible"] == 4
        assert rounds[0]["missing"] == ["dev4"] and rounds[0]["participants"] == 2
        assert all(rounds[r]["sampled"] == ["dev1", "dev2", "dev3"] for r in range(1, 6))
        # Federated evaluation after rounds 2 and 5, weighted over the held-out splits of the devices asked.
        feds = [m.data for m in tb.inbox if m.kind == "metrics" and (m.data or {}).get("kind") == "federated_eval"]
        assert [f["round"] for f in feds] == [2, 5]
        held = {d: meta["shards"][d]["eval_samples"] for d in ("dev1", "dev2", "dev3")}
        assert all(f["n"] == sum(held.values()) and f["missing"] == [] for f in feds)
        assert {d: v["n"] for d, v in feds[1]["devices"].items()} == held and feds[1]["accuracy"] > 0.8

        # Take the model home: export the last round and load it in plain PyTorch, then with mqttfl predict.
        state = root / "state"
        cli("export", state, "--out", tmp_path / "export", env=path_env(v1, REPO))
        exported = json.loads((tmp_path / "export" / "model.json").read_text())
        assert (exported["run"], exported["round"]) == ("greenhouse-1", 5)
        plain = textwrap.dedent(f"""
            import numpy as np, torch
            from greenhouse.models import classifier
            model = torch.nn.Sequential(*classifier((6,), 3))
            model.load_state_dict(torch.load({str(tmp_path / 'export' / 'model.pt')!r}, weights_only=True))
            model.eval()
            test = np.load({meta['cloud']['test_data']!r})
            with torch.no_grad():
                pred = model(torch.from_numpy(test["x"])).argmax(1).numpy()
            print((pred == test["y"]).mean())
        """)
        out = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=120,
                             env=path_env(v1), check=True).stdout
        assert round(float(out), 5) == rounds[5]["accuracy"]
        predicted = json.loads(cli("predict", tmp_path / "export", meta["cloud"]["test_data"], "--json",
                                   "--out", tmp_path / "pred.npy").stdout)
        assert predicted["accuracy"] == rounds[5]["accuracy"] == exported["metrics"]["accuracy"]
        assert np.load(tmp_path / "pred.npy").shape == (meta["test_samples"],)
        # The best round is kept apart, and the run is listed with it.
        cli("export", state, "--round", "best", "--out", tmp_path / "best", env=path_env(v1, REPO))
        best = json.loads((tmp_path / "best" / "model.json").read_text())
        assert best["metrics"]["accuracy"] == max(r["accuracy"] for r in rounds.values())
        listed = json.loads(cli("ctl", "cloud", "runs", "--json", "--fleet", fleet, "--port", broker.port).stdout)
        (run,) = listed["result"]["runs"]
        assert run["run"] == "greenhouse-1" and run["state"] == "done" and run["best"]["round"] == best["round"]
        kept = sorted(p.name for p in (state / "cloud" / "runs" / "greenhouse-1").glob("*.model"))
        assert kept == ["best.model", "round-000004.model", "round-000005.model"], "keep_models = 2, and the best"
    finally:
        tb.stop()
