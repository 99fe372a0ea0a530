"""`mqttfl demo` end to end (what `make demo` runs), at a small size: real broker, seven agent processes."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_trains_moves_a_device_and_prints_one_json_summary(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mqttfl.tools.cli", "demo", "--json", "--model", "cnn", "--rounds", "4",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    for key in ("rounds", "final_accuracy", "wall_s", "bytes_total", "device_peak_rss_mb", "migrations"):
        assert key in summary, key
    assert summary["rounds"] == 4
    assert summary["final_accuracy"] > 0.5, "the demo fleet learned"
    assert summary["bytes_total"] > 0 and summary["device_peak_rss_mb"] > 0
    (migration,) = summary["migrations"]
    assert migration["event"] == "migration_done" and migration["device"] == "dev1"
    assert migration["destination"] == "edge2" and migration["pause_ms"] > 0
