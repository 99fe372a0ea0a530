"""``mqttfl sim``: the real machines in one process on virtual time, as a user runs it."""

from __future__ import annotations

import json

import pytest

from mqttfl.tools.cli import main


def test_sim_trains_a_fleet_and_reports_every_round(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sim", "--devices", "4", "--edges", "2", "--model", "cnn", "--rounds", "3",
               "--latency-ms", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["outcome"] == "run_complete"
    assert [h["step"] for h in out["history"]] == [0, 1, 2]
    assert out["final_accuracy"] > 0.6  # chance is 0.1
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    # Every round moved the model to each edge and, on group downloads (the default), once from each edge to its
    # two devices; one delta per device and edge up, at least.
    assert out["messages"]["tx_model"] == 3 * (2 + 2) and out["messages"]["tx_delta"] >= 3 * (4 + 2)
    # Virtual time follows the configured latency: each round crosses several links.
    assert out["virtual_s"] >= 3 * 4 * 0.005


def test_sim_is_deterministic_for_a_seed(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["sim", "--devices", "3", "--model", "mlp", "--rounds", "2", "--mode", "async", "--json"]
    main(args)
    first = json.loads(capsys.readouterr().out)
    main(args)
    second = json.loads(capsys.readouterr().out)
    assert first["history"] == second["history"] and first["messages"] == second["messages"]


def test_sim_takes_any_cloud_and_device_key(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sim", "--devices", "4", "--model", "cnn", "--rounds", "2", "--cut", "4", "--json",
               "--cloud", "fedlama_phi=2", "--cloud", "strategy=trimmed", "--device", "delta_encoding=int8"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["outcome"] == "run_complete" and len(out["history"]) == 2
    with pytest.raises(SystemExit):
        main(["sim", "--cloud", "no-equals-sign"])
