"""`mqttfl demo` end to end (what `make demo` runs), at a small size: real broker, seven agent processes; and the
demo's waiter against a fleet whose run fails."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mqttfl.tools import demo
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import FleetSpec, Testbed


def test_demo_trains_moves_a_device_and_prints_one_json_summary(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mqttfl.tools.cli", "demo", "--json", "--model", "cnn", "--rounds", "4",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    for key in ("rounds", "final_accuracy", "wall_s", "bytes_total", "device_peak_rss_mb", "device_cold_start_s",
                "migrations"):
        assert key in summary, key
    assert summary["rounds"] == 4
    assert summary["final_accuracy"] > 0.5, "the demo fleet learned"
    assert summary["bytes_total"] > 0 and summary["device_peak_rss_mb"] > 0
    # Every device reports its footprint: process start to online, and its peak RSS (figures: README).
    assert set(summary["devices"]) == {"dev1", "dev2", "dev3", "dev4"}
    for d in summary["devices"].values():
        assert 0 < d["cold_start_s"] <= summary["wall_s"] and d["peak_rss_mb"] > 100
    assert summary["device_cold_start_s"] == max(d["cold_start_s"] for d in summary["devices"].values())
    (migration,) = summary["migrations"]
    assert migration["event"] == "migration_done" and migration["device"] == "dev1"
    assert migration["destination"] == "edge2" and migration["pause_ms"] > 0


def test_demo_stops_at_a_failed_run_and_exits_non_zero(tmp_path: Path, broker: Broker, fleet: str) -> None:
    # The run can never reach its quorum: dev1 is online (so min_devices is met and the round starts) but
    # stopped, so it never answers; with max_attempts = 1 the cloud gives the run up after one deadline.
    spec = FleetSpec(devices={"dev1": "edge1"}, model="mlp", input_shape=(64,), fleet=fleet,
                     cloud={"rounds": 3, "autostart": False, "deadline_s": 2.0, "quorum": 1.0, "max_attempts": 1})
    args = argparse.Namespace(mode="sync", model="mlp", data="digits", no_migration=True, timeout=120.0)
    with Testbed(tmp_path, spec, broker=broker) as tb:
        tb.prepare()
        tb.start()
        tb.wait_online(["cloud", "edge1", "dev1"])
        os.kill(tb.procs["dev1"].pid, signal.SIGSTOP)
        try:
            assert tb.ctl("cloud", "start")["ok"]
            t0 = time.monotonic()
            summary = demo.follow(tb, args, demo.Progress(quiet=True))
            waited = time.monotonic() - t0
        finally:
            os.kill(tb.procs["dev1"].pid, signal.SIGCONT)
    assert waited < 30, f"the waiter ran on for {waited:.0f}s after the run failed"
    assert summary["run_failed"] is not None and "quorum not met" in summary["run_failed"]
    assert summary["rounds"] == 0
    assert demo.exit_status(summary) == 1
    # A failed run is a failure even when earlier rounds left an accuracy behind.
    assert demo.exit_status({**summary, "final_accuracy": 0.9}) == 1
    assert demo.exit_status({**summary, "final_accuracy": 0.9, "run_failed": None}) == 0
