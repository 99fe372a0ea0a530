"""Runs, end to end with real processes: a restarted cloud keeps its run's settings over an edited cloud.toml
(and says which keys differ); a config naming another run starts that run afresh; ``new-run`` starts a new run
from the config file's settings (docs/operations.md, "Runs")."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqttfl.runtime.persist import load_state
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec, Testbed, write_toml

pytestmark = pytest.mark.timeout(240)

LR = 0.05


@pytest.fixture
def tb(tmp_path: Path, broker: Broker, fleet: str) -> Iterator[Testbed]:
    spec = FleetSpec(devices={"dev1": "edge1"}, model="mlp", input_shape=(64,), fleet=fleet,
                     cloud={"rounds": 1, "lr": LR, "batch_size": 64})
    with Testbed(tmp_path, spec, broker=broker) as bed:
        bed.prepare()
        bed.start()
        yield bed


def edit_cloud_config(tb: Testbed, **changes: Any) -> None:
    path = tb.configs["cloud"]
    data = tomllib.loads(path.read_text())
    data["cloud"].update(changes)
    write_toml(path, data)


def restart_cloud(tb: Testbed) -> None:
    tb.kill("cloud", signal.SIGTERM)
    tb.start_node("cloud")


def cloud_state(tb: Testbed) -> dict[str, Any]:
    state = load_state(tb.root / "state" / "cloud" / "cloud.state")
    assert state is not None
    return state


def test_a_restarted_cloud_keeps_its_runs_settings_over_an_edited_config_and_names_the_keys(tb: Testbed) -> None:
    run = tb.wait_event("run_complete", 120)["run"]
    edit_cloud_config(tb, lr=0.2, rounds=3)
    restart_cloud(tb)
    note = tb.wait_event("settings_from_run", 60)
    assert note["run"] == run and note["level"] == "warning"
    # Each edited key, with the run's value and the file's.
    assert note["differs"] == {"lr": [LR, 0.2], "rounds": [1, 3]}
    status = tb.ctl("cloud", "status")["result"]
    assert (status["run"], status["state"], status["round"], status["rounds"]) == (run, "done", 1, 1)
    # The run goes on with its own settings: one more round asked for, the file's lr still not applied.
    assert tb.ctl("cloud", "start", rounds=2)["ok"]
    assert tb.wait_event("run_complete", 120, run=run)["rounds"] == 2
    state = cloud_state(tb)
    assert state["settings"]["lr"] == LR and state["settings"]["rounds"] == 2
    assert [h["round"] for h in state["history"]] == [0, 1]


def test_a_config_naming_another_run_starts_that_run_afresh(tb: Testbed) -> None:
    first = tb.wait_event("run_complete", 120)["run"]
    edit_cloud_config(tb, run="second", lr=0.2)
    restart_cloud(tb)
    note = tb.wait_event("new_run_from_config", 60)
    assert (note["previous"], note["run"]) == (first, "second")
    done = tb.wait_event("run_complete", 120, run="second")
    assert done["rounds"] == 1
    state = cloud_state(tb)
    assert state["settings"]["run"] == "second" and state["settings"]["lr"] == 0.2
    assert [(h["run"], h["round"]) for h in state["history"]] == [("second", 0)], "nothing of the first run"


def test_ctl_new_run_starts_a_new_run_from_the_config_file_and_the_fleet_trains_it(tb: Testbed) -> None:
    first = tb.wait_event("run_complete", 120)["run"]
    # The finished run's settings drift from the file's; a new run must not inherit them.
    assert tb.ctl("cloud", "set", rounds=5, lr=0.2)["ok"]
    r = subprocess.run([sys.executable, "-m", "mqttfl.tools.cli", "ctl", "cloud", "new-run", "--json",
                        "--fleet", tb.spec.fleet, "--host", tb.broker.host, "--port", str(tb.broker.port)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)["result"]
    new = result["run"]
    assert new != first and result["previous"] == first
    assert (result["round"], result["state"]) == (0, "running")
    done = tb.wait_event("run_complete", 120, run=new)
    assert done["rounds"] == 1, "the config file's rounds, not the 5 set on the old run"
    assert any(m.kind == "event" and (m.data or {}).get("event") == "new_run" and m.data["run"] == new
               and m.data["previous"] == first for m in tb.inbox if m.data)
    status = tb.ctl("cloud", "status")["result"]
    assert (status["run"], status["state"], status["round"], status["rounds"]) == (new, "done", 1, 1)
    state = cloud_state(tb)
    assert state["settings"]["run"] == new and state["settings"]["lr"] == LR and state["settings"]["rounds"] == 1
    assert [(h["run"], h["round"]) for h in state["history"]] == [(new, 0)]
