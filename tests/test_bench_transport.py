"""`mqttfl bench transport` runs end to end through its own brokers and reports every figure (no timing limits)."""

from __future__ import annotations

import json
import math

from mqttfl.tools.cli import main

KEYS = {"small_rtt_p50_ms", "small_rtt_p99_ms", "small_rtt_p50_ms_no_nodelay", "codec_mb_per_s", "chunked_mb_per_s"}


def test_bench_transport_json_has_every_figure_as_a_positive_number(capsys, tmp_path):
    rc = main(["bench", "transport", "--json", "--round-trips", "5", "--warmup", "1", "--no-nodelay-round-trips", "2",
               "--codec-iterations", "2", "--chunked-messages", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, "exactly one JSON object"
    r = json.loads(out[0])
    assert json.loads((tmp_path / "results.json").read_text()) == r
    assert KEYS <= set(r)
    for key, value in r.items():
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert r["small_rtt_round_trips"] == 5 and r["chunked_messages"] == 1


def test_bench_transport_prints_a_table_without_json(capsys, tmp_path):
    rc = main(["bench", "transport", "--round-trips", "3", "--warmup", "1", "--no-nodelay-round-trips", "1",
               "--codec-iterations", "1", "--chunked-messages", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert not out.lstrip().startswith("{")
    for label in ("round trip p50", "without TCP_NODELAY", "codec encode+decode", "chunked send"):
        assert label in out, label
