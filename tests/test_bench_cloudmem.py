"""``mqttfl bench cloudmem`` at its toy size: its JSON, its files, and what it measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mqttfl.tools.cli import main


def test_cloudmem_bench_measures_a_few_hundred_bytes_per_device_and_writes_only_into_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "cloudmem", "--small", "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"bytes_per_device", "bytes_per_round", "kept_kb", "peak_kb", "persisted_kb", "cpu_ms_per_round",
            "runs", "plot", "small"} <= set(res)
    assert [r["devices"] for r in res["runs"]] == [5, 60] and all(r["rounds"] == 3 for r in res["runs"])
    # A presence, when it was seen and what it declared: a few hundred bytes. Rounds' per-device records kept in
    # the history used to add ~600 bytes per device and round.
    assert 0 < res["bytes_per_device"] < 1000
    assert res["persisted_kb"]["60"] <= res["persisted_kb"]["5"] * 1.1, "the persisted state does not list devices"
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", Path(res["plot"]).name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
