"""``mqttfl bench comm`` at a toy size, for real: the in-memory sections (FedLAMA, strategies) run their fleets
and report the figures the issue names. The real-process sections share their measuring core with
``tests/test_comm_e2e.py`` and their summary with ``tests/test_bench_outputs.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mqttfl.tools.cli import main


def test_comm_bench_in_memory_sections_at_a_toy_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["bench", "comm", "--small", "--sections", "fedlama,strategies", "--json", "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("fedlama_bytes_ratio", "fedlama_acc_delta", "fedlama_phi4_bytes_ratio", "robust_acc_under_attack",
                "robust_best", "fedavg_acc_under_attack", "targets"):
        assert key in r, key
    fl = r["sections"]["fedlama"]
    assert set(fl) == {"fedavg", "phi2", "phi4"} and all(v["rounds"] == 4 for v in fl.values())
    assert fl["phi2"]["bytes"] <= fl["fedavg"]["bytes"]
    st = r["sections"]["strategies"]
    assert set(st["attack"]) == {"fedavg", "median", "trimmed", "krum", "clip"}
    assert json.loads((out / "results.json").read_text()) == r
