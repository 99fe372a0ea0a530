"""``mqttfl monitor``: FleetView's bookkeeping from hand-made messages, and the command against a real fleet."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mqttfl.runtime.transport import Inbound
from mqttfl.tools.broker import Broker
from mqttfl.tools.monitor import FleetView
from mqttfl.tools.testbed import FleetSpec
from mqttfl.tools.testbed import Testbed as LocalFleet  # not "Test*": pytest would try to collect it
from mqttfl.wire.topics import Topic
from tests.helpers import ignore_sigint

NOW = 1_800_000_000.0


def msg(kind: str, src: str, data: dict[str, Any] | None, *, retained: bool = False) -> Inbound:
    return Inbound(Topic("f", kind, src, "all"), None, data, retained, 0.0)


def status(src: str, role: str, state: str, ts: float = NOW, **fields: Any) -> dict[str, Any]:
    return {"state": state, "node": src, "role": role, "boot": 1, "ts": ts, **fields}


def agent_metrics(src: str, role: str, ts: float, tx: int, rx: int, dropped: int = 0, **fields: Any) -> dict[str, Any]:
    transport = {"tx_bytes": tx, "rx_bytes": rx, **({"dropped": dropped} if dropped else {})}
    return {"node": src, "role": role, "ts": ts, "kind": "agent", "transport": transport, **fields}


# --- FleetView ---------------------------------------------------------------------------------------------


def test_retained_status_gives_role_state_round_and_an_age_from_its_own_timestamp() -> None:
    v = FleetView("f")
    v.update(msg("status", "dev1", status("dev1", "device", "offline", ts=NOW - 600, round=None),
                 retained=True), now=NOW)
    v.update(msg("status", "cloud", status("cloud", "cloud", "running", round=3), retained=True), now=NOW + 1)
    rows = {r["node"]: r for r in v.rows(now=NOW + 2)}
    assert rows["dev1"]["role"] == "device" and rows["dev1"]["state"] == "offline"
    assert rows["dev1"]["age_s"] == 602.0  # the node went away ten minutes ago, not when we subscribed
    assert rows["cloud"]["state"] == "running" and rows["cloud"]["round"] == 3 and rows["cloud"]["age_s"] == 2.0


def test_live_messages_count_as_seen_when_they_arrive() -> None:
    v = FleetView("f")
    v.update(msg("status", "edge1", status("edge1", "edge", "idle", ts=NOW - 50)), now=NOW)  # sender clock skew
    assert v.rows(now=NOW + 1)[0]["age_s"] == 1.0
    v.update(msg("metrics", "edge1", agent_metrics("edge1", "edge", NOW, 0, 0)), now=NOW + 5)
    assert v.rows(now=NOW + 5)[0]["age_s"] == 0.0


def test_cloud_round_metrics_give_accuracy_loss_and_rounds_per_minute() -> None:
    v = FleetView("f")
    v.update(msg("metrics", "cloud", {"node": "cloud", "role": "cloud", "kind": "round", "round": 0,
                                      "accuracy": 0.5, "loss": 1.2, "round_s": 20.0, "wall_s": 25.0}), now=NOW)
    row = v.rows(now=NOW)[0]
    assert (row["accuracy"], row["loss"], row["rounds_min"]) == (0.5, 1.2, 3.0)  # one round: 60 / round_s
    v.update(msg("metrics", "cloud", {"node": "cloud", "role": "cloud", "kind": "round", "round": 1,
                                      "accuracy": 0.7, "loss": 0.9, "round_s": 10.0, "wall_s": 55.0}), now=NOW)
    row = v.rows(now=NOW)[0]
    assert (row["accuracy"], row["loss"], row["rounds_min"]) == (0.7, 0.9, 2.0)  # 1 round in 30 s of wall
    # A new run starts the rate over instead of mixing two runs.
    v.update(msg("metrics", "cloud", {"node": "cloud", "role": "cloud", "kind": "round", "round": 0,
                                      "accuracy": 0.1, "round_s": 6.0, "wall_s": 7.0}), now=NOW)
    assert v.rows(now=NOW)[0]["rounds_min"] == 10.0


def test_accuracy_in_the_clouds_status_shows_when_the_monitor_started_after_the_run() -> None:
    v = FleetView("f")
    v.update(msg("status", "cloud", status("cloud", "cloud", "done", round=5, accuracy=0.93), retained=True),
             now=NOW)
    assert v.rows(now=NOW)[0]["accuracy"] == 0.93


def test_agent_metrics_give_bytes_per_second_and_drops() -> None:
    v = FleetView("f")
    v.update(msg("metrics", "dev1", agent_metrics("dev1", "device", 100.0, 1000, 1000, rounds_done=2)), now=NOW)
    row = v.rows(now=NOW)[0]
    assert row["bytes_s"] is None and row["drops"] == 0 and row["rounds_done"] == 2  # one sample: no rate
    v.update(msg("metrics", "dev1", agent_metrics("dev1", "device", 110.0, 51000, 11000, dropped=3)), now=NOW)
    row = v.rows(now=NOW)[0]
    assert row["bytes_s"] == 6000.0 and row["drops"] == 3
    # The agent restarted: its counters went back to zero. No negative rate; the next interval is measured.
    v.update(msg("metrics", "dev1", agent_metrics("dev1", "device", 200.0, 10, 10)), now=NOW)
    assert v.rows(now=NOW)[0]["bytes_s"] == 6000.0
    v.update(msg("metrics", "dev1", agent_metrics("dev1", "device", 210.0, 1010, 10)), now=NOW)
    assert v.rows(now=NOW)[0]["bytes_s"] == 100.0


def test_dropped_events_count_as_drops_before_the_next_metrics_report() -> None:
    v = FleetView("f")
    v.update(msg("metrics", "edge1", agent_metrics("edge1", "edge", 1.0, 0, 0, dropped=1)), now=NOW)
    for _ in range(3):
        v.update(msg("event", "edge1", {"event": "dropped", "level": "warning", "node": "edge1", "role": "edge",
                                        "ts": NOW, "reason": "malformed", "detail": "bad", "topic": "t"}), now=NOW)
    row = v.rows(now=NOW)[0]
    assert row["drops"] == 3 and row["last_event"] == "dropped"
    assert v.events[-1] == {"ts": NOW, "node": "edge1", "event": "dropped", "level": "warning",
                            "reason": "malformed", "detail": "bad", "topic": "t"}


def test_recent_events_are_bounded_and_keep_the_newest() -> None:
    v = FleetView("f", max_events=5)
    for i in range(12):
        v.update(msg("event", "cloud", {"event": "round_started", "level": "info", "node": "cloud",
                                        "role": "cloud", "ts": NOW + i, "round": i}), now=NOW + i)
    assert [e["round"] for e in v.events] == [7, 8, 9, 10, 11]


def test_rows_list_cloud_then_edges_then_devices_and_ignore_binary_messages() -> None:
    v = FleetView("f")
    for node, role in (("dev2", "device"), ("edge1", "edge"), ("operator", "operator"), ("dev1", "device"),
                       ("cloud", "cloud")):
        v.update(msg("status", node, status(node, role, "idle"), retained=True), now=NOW)
    v.update(msg("model", "cloud", None), now=NOW)
    v.update(msg("act", "dev9", None), now=NOW)
    assert [r["node"] for r in v.rows(now=NOW)] == ["cloud", "edge1", "dev1", "dev2", "operator"]


def test_a_pipelined_devices_chain_plan_stage_times_bubble_and_stash_show() -> None:
    v = FleetView("f")
    layout = {"kind": "pipeline", "node": "dev1", "role": "device", "chain": ["dev1", "h1", "edge1"],
              "blocks": [0, 4, 8, 12], "epoch": 1, "predicted_ms": [60.0, 60.0, 60.0], "predicted_bubble": 0.2,
              "micro_batches": 8, "stash_bound": [5, 3, 1], "reason": "round start"}
    v.update(msg("metrics", "dev1", layout), now=NOW)
    for step, elapsed in ((1, 0.6), (2, 1.2)):
        v.update(msg("metrics", "dev1", {"kind": "pipeline_step", "node": "dev1", "step": step, "elapsed_s": elapsed,
                                         "stage_ms": [60.0, 60.0, 60.0], "stash": [5, 3, 1]}), now=NOW + step)
    p = v.rows(now=NOW + 3)[0]["pipeline"]
    assert p["chain"] == ["dev1", "h1", "edge1"] and p["stage_ms"] == [60.0, 60.0, 60.0]
    assert p["bubble"] == 0.2  # 1 - 8 x 180 ms / (3 stages x 600 ms)
    text = v.render(now=NOW + 3)
    assert "pipelines" in text and "h1 [4,8) 60.0/60.0 ms 3/3" in text and "bubble 0.2" in text


def test_the_last_rounds_costs_per_device_class_show_as_a_table() -> None:
    v = FleetView("lab")
    weak = {"devices": 3, "T_local": 1.5, "T_upload": 0.01, "T_global": 0.2, "T_download": 0.02, "T": 1.73,
            "T_max": 2.0, "peak_rss_mb": 310.5, "train_mem_mb": 0.8, "bytes_up": 61_560, "bytes_down": 2_000_000,
            "energy_j": 9.5, "cutoffs": 1}
    v.update(msg("metrics", "cloud", {"node": "cloud", "role": "cloud", "kind": "round", "round": 4,
                                      "classes": {"weak": weak, "default": {**weak, "energy_j": None}}}), now=NOW)
    lines = v.render(now=NOW).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("device classes (round 4"))
    assert lines[at + 2].split()[:3] == ["CLASS", "DEVICES", "T_LOCAL"]
    assert lines[at + 3].split() == ["default", "3", "1.5", "0.01", "0.2", "0.02", "1.73", "2", "310", "0.8", "0.06",
                                     "2.00", "-", "1"]
    assert lines[at + 4].split()[0] == "weak" and lines[at + 4].split()[-2] == "9.5"
    assert v.snapshot(now=NOW)["classes"]["weak"] == weak




def test_render_and_snapshot_show_every_node() -> None:
    v = FleetView("lab")
    v.update(msg("status", "cloud", status("cloud", "cloud", "running", round=2), retained=True), now=NOW)
    v.update(msg("status", "dev1", status("dev1", "device", "offline"), retained=True), now=NOW)
    v.update(msg("metrics", "cloud", {"node": "cloud", "role": "cloud", "kind": "round", "round": 1,
                                      "accuracy": 0.8125, "round_s": 30.0, "wall_s": 61.0}), now=NOW)
    v.update(msg("event", "cloud", {"event": "round_started", "level": "info", "node": "cloud", "role": "cloud",
                                    "ts": NOW, "round": 2, "edges": {"edge1": ["dev1"]}}), now=NOW)
    text = v.render(now=NOW + 3)
    lines = text.splitlines()
    assert lines[0].startswith("fleet lab: 2 nodes, 1 online")
    assert lines[2].split() == ["NODE", "ROLE", "STATE", "ROUND", "SEEN", "ACCURACY", "THROUGHPUT", "DROPS",
                                "LAST", "EVENT"]
    cloud_line = next(line for line in lines if line.startswith("cloud "))
    assert cloud_line.split() == ["cloud", "cloud", "running", "2", "3.0s", "0.8125", "2.00", "rnd/min", "0",
                                  "round_started"]
    assert any(line.startswith("dev1 ") and "offline" in line for line in lines)
    assert any("round_started" in line and 'edges={"edge1":["dev1"]}' in line for line in lines)
    snap = json.loads(json.dumps(v.snapshot(now=NOW + 3)))
    assert set(snap["nodes"]) == {"cloud", "dev1"} and snap["fleet"] == "lab"
    assert snap["nodes"]["cloud"]["accuracy"] == 0.8125 and snap["events"][0]["event"] == "round_started"


# --- mqttfl monitor against a real fleet ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_up(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """cloud, edge1 and dev1 (MLP on digits) connected and idle: the cloud waits for a start command."""
    spec = FleetSpec(devices={"dev1": "edge1"}, model="mlp", input_shape=(64,),
                     cloud={"rounds": 1, "autostart": False}, fleet=f"mon-{os.getpid()}")
    tb = LocalFleet(tmp_path_factory.mktemp("monitor"), spec, broker=broker)
    try:
        tb.prepare()
        tb.start()
        states: dict[str, str] = {}

        def all_up(m: Inbound) -> bool:
            if m.kind == "status" and m.data is not None:
                states[m.src] = str(m.data.get("state"))
            return all(states.get(n) not in (None, "starting", "offline") for n in ("cloud", "edge1", "dev1"))

        tb.wait(all_up, 90)
        yield tb
    finally:
        tb.stop()


def monitor_cmd(tb: LocalFleet, *argv: str) -> list[str]:
    return [sys.executable, "-m", "mqttfl.tools.cli", "monitor", "--fleet", tb.spec.fleet, "--host", tb.broker.host,
            "--port", str(tb.broker.port), *argv]


@pytest.mark.timeout(150)
def test_monitor_once_json_lists_every_node_with_role_and_state(fleet_up: LocalFleet) -> None:
    r = subprocess.run(monitor_cmd(fleet_up, "--once", "--json", "--interval", "1"),
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    assert snap["fleet"] == fleet_up.spec.fleet and isinstance(snap["events"], list)
    nodes = snap["nodes"]
    assert {n: (nodes[n]["role"], nodes[n]["state"]) for n in ("cloud", "edge1", "dev1")} == {
        "cloud": ("cloud", "idle"), "edge1": ("edge", "idle"), "dev1": ("device", "idle")}
    assert nodes["cloud"]["round"] == 0 and nodes["cloud"]["accuracy"] is None
    for n in ("cloud", "edge1", "dev1"):
        assert nodes[n]["age_s"] is not None and nodes[n]["age_s"] < 120 and nodes[n]["drops"] == 0
    # The monitor is not a fleet member: it left no presence behind.
    assert "monitor" not in nodes


@pytest.mark.timeout(150)
def test_monitor_live_mode_redraws_the_table_and_exits_0_on_ctrl_c(fleet_up: LocalFleet) -> None:
    p = subprocess.Popen(monitor_cmd(fleet_up, "--interval", "0.3"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint)
    lines: queue.Queue[str] = queue.Queue()
    assert p.stdout is not None
    stdout = p.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    try:
        headers = 0
        deadline = time.monotonic() + 30
        seen_nodes: set[str] = set()
        while headers < 2:  # two draws: the table is redrawn, not printed once
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"only {headers} tables within 30 s") from None
            if line.startswith(f"fleet {fleet_up.spec.fleet}:"):
                headers += 1
            words = line.split()
            if words and words[0] in ("cloud", "edge1", "dev1"):
                seen_nodes.add(words[0])
        assert seen_nodes == {"cloud", "edge1", "dev1"}
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_large_fleet_is_summarised_by_state_with_its_slowest_and_offline_devices() -> None:
    v = FleetView("big")
    v.update(msg("status", "cloud", status("cloud", "cloud", "running", round=3), retained=True), now=NOW)
    v.update(msg("status", "edge1", status("edge1", "edge", "idle"), retained=True), now=NOW)
    for i in range(1, 61):
        state = "offline" if i % 20 == 0 else ("training" if i % 3 == 0 else "idle")
        v.update(msg("status", f"dev{i}", status(f"dev{i}", "device", state), retained=True), now=NOW)
    costs = {f"dev{i}": {"T_total": i / 10, "edge": "edge1"} for i in range(1, 58)}
    v.update(msg("metrics", "cloud", {"node": "cloud", "role": "cloud", "kind": "round", "round": 2,
                                      "devices": costs, "round_s": 6.0, "wall_s": 20.0}), now=NOW)
    sm = v.summary()
    assert sm["devices"] == 60 and sm["by_state"] == {"idle": 38, "offline": 3, "training": 19}
    assert [x["node"] for x in sm["slowest"]] == ["dev57", "dev56", "dev55", "dev54", "dev53"]
    assert sm["offline"] == ["dev20", "dev40", "dev60"] and sm["round"] == 2
    text = v.render(now=NOW, max_rows=40)
    assert not any(re.match(r"dev\d+ ", line) for line in text.splitlines())  # no row per device
    assert "devices: 60 (idle 38, offline 3, training 19)" in text
    assert "slowest in round 2: dev57 5.70s, dev56 5.60s" in text and "offline: dev20 dev40 dev60" in text
    assert any(line.startswith("edge1 ") for line in text.splitlines())
    # Below the threshold every device keeps its row; the JSON snapshot always has every node and the summary.
    assert sum(bool(re.match(r"dev\d+ ", line)) for line in v.render(now=NOW, max_rows=100).splitlines()) == 60
    snap = v.snapshot(now=NOW)
    assert len(snap["nodes"]) == 62 and snap["summary"] == sm
