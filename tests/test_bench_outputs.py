"""Every benchmark writes its files into ``--out`` (default ``bench-results/<bench>``), never into the working
directory, and a failed run stops it with exit 1. The measurements are replaced by canned results here, so the
real argument parsing, plotting and writing run in well under a second."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from mqttfl.tools.bench import async_, comm, data, hetero, migration, pipeline, resilience, scale, split, transport
from mqttfl.tools.cli import main
from mqttfl.tools.sites import BRIDGE_CONF
from mqttfl.tools.testbed import RunFailed

TRANSPORT = {"small_rtt_p50_ms": 1.1, "small_rtt_p99_ms": 3.7, "small_rtt_round_trips": 5, "small_message_bytes": 109,
             "small_rtt_p50_ms_no_nodelay": 88.9, "small_rtt_round_trips_no_nodelay": 2, "codec_mb_per_s": 2493.0,
             "codec_mb_per_s_mean": 1846.0, "codec_tensor_bytes": 1638400, "chunked_mb_per_s": 178.0,
             "chunked_mb_per_s_mean": 170.0, "chunked_ms_per_message": 25.3, "chunked_message_bytes": 4500000,
             "chunked_messages": 1, "chunked_chunk_bytes": 1048576, "chunked_mb_per_s_256k_chunks": 120.0}
SPLIT = {"model": "vgg5", "cut": 2, "batches": 20, "batch_size": 100, "data": "synthetic", "lr": 0.01,
         "momentum": 0.9, "monolithic_s": 2.38, "monolithic_by_m": {"1": 2.38}, "split_s": {"1": 3.56},
         "best_m": 1, "ratio": 1.49, "ratio_m1": 1.49, "max_abs_diff": {"1": 7.5e-9}, "monolithic_2threads_s": None,
         "ratio_vs_2threads": None, "threads": {"monolithic": 1, "device": 1, "edge": 1}, "cpus": 2,
         "loadavg": [0.5, 0.4, 0.3]}
FRACTION = {"samples": 337, "steps_per_round": 40, "t_baseline_s": 4.48, "t_migrate_p50_s": 4.98,
            "t_restart_p50_s": 7.45, "saving_p50": 0.331, "ideal_p50": 0.3333, "t_migrate_p90_s": 4.68,
            "t_restart_p90_s": 9.23, "saving_p90": 0.494, "ideal_p90": 0.4737, "overhead_s": 0.5}
MIGRATION = {"model": "vgg5", "epochs": 10, "per_fraction": {"0.25": FRACTION}, "pause_ms_direct": 63.6,
             "pause_ms_relay": 93.9, "checkpoint_bytes": 6759224, "saving_p50": 0.331, "saving_p90": 0.494,
             "ideal_p50": 0.3333, "ideal_p90": 0.4737, "lossless": True}
EPOCH = {"peak_rss_mb": 300.0, "anon_mb": 40.0, "batch_ms": 0.6, "batches": 200}
DATA = {"csv_rows": 100000, "csv_features": 20, "csv_s": 5.0, "csv_rows_per_s": 20000.0, "png_images": 500,
        "png_images_per_s": 1500.0, "shard_rows": 20000, "shard_mb": 234.4, "mapped": EPOCH,
        "whole": {**EPOCH, "anon_mb": 275.0}}

CRASH = {"restart_to_back_s": 2.26, "kill_to_back_s": 3.26, "round_s_undisturbed": 4.0, "round_s_crashed": 5.86,
         "replayed_steps": 2, "participants": 2, "attempt": 0, "devices": 2}
RESILIENCE = {"memory": {"rss_baseline_mb": 224.7, "rss_peak_mb": 338.8, "rss_after_mb": 236.1, "held_mb": 96,
                         "returned_fraction": 0.9, "expired": 3, "memory_released": 3},
              "model": "mlp", "kill_at": 12, "down_s": 1.0, "resume_every": 4, "resume": CRASH,
              "rejoin": {**CRASH, "replayed_steps": 48}}


def _acc(*seeds: float) -> dict[str, Any]:
    return {"mean": sum(seeds) / len(seeds), "std": 0.01, "seeds": list(seeds)}


def _variant(acc: float, mem: float) -> dict[str, Any]:
    return {"accuracy": acc, "bytes_up_per_round": 1000, "train_mem_mb": mem, "batch_ms": 10.0}


def _cutoff(round_s: float, acc: float) -> dict[str, Any]:
    return {"round_s": round_s, "accuracy": acc, "accuracy_seeds": [acc]}


def _plan_run(round_s: float, cut: int) -> dict[str, Any]:
    return {"round_s": round_s, "predicted_round_s": round_s * 0.9, "cuts": {"dev1": cut}, "T_local": {"dev1": 1.0}}


HETERO = {
    "inclusive": {"strong": 4, "weak": [0, 4], "rounds": 2, "alpha": 0.3, "seeds": 2, "budget": 0.5, "width": 0.65,
                  "train_blocks": 1, "costs": {"full": {"macs_ratio": 1.0, "memory_ratio": 1.0},
                                               "partial1": {"macs_ratio": 0.34, "memory_ratio": 0.29},
                                               "width0.65": {"macs_ratio": 0.44, "memory_ratio": 0.48}},
                  "accuracy": {"strong_only@0": _acc(0.6, 0.62), "strong_only@4": _acc(0.6, 0.62),
                               "partial@4": _acc(0.75, 0.71), "width@4": _acc(0.65, 0.66)}},
    "compressed": {"model": "vgg5", "devices": 6, "rounds": 2, "memory_shape": [3, 32, 32], "memory_batch": 64,
                   "variants": {k: _variant(0.9, 40.0 if k == "int8" else 100.0) for k in hetero.VARIANTS}},
    "cutoffs": {"rounds": 2, "epochs": 5, "slowdown": 4.0, "tau_s": 1.0, "fast_only": _cutoff(2.0, 0.9),
                "no_cutoff": _cutoff(8.0, 0.92), "tau_fast": _cutoff(2.1, 0.9), "tau_1.5x": _cutoff(3.0, 0.91),
                "tau_fast_fednova": _cutoff(2.1, 0.9), "acc_delta_seeds": [-0.02], "time_ratio_seeds": [1.05]},
    "planner": {"planned_vs_fixed": 0.8, "scenarios": {
        "speeds": {"model": "vgg5", "speeds": [1.0, 8.0], "rounds": 4, "best_fixed": "cut1", "planned_vs_fixed": 0.95,
                   "runs": {"cut1": _plan_run(10.0, 1), "cut2": _plan_run(12.0, 2), "planned": _plan_run(9.5, 1)}},
        "links": {"model": "vgg5", "speeds": [1.0, 8.0], "rounds": 4, "best_fixed": "cut2", "planned_vs_fixed": 0.8,
                  "runs": {"cut1": _plan_run(12.0, 1), "cut2": _plan_run(10.0, 2), "planned": _plan_run(8.0, 5)}}}},
}


def _real(acc: float, per_round: int, delta: int) -> dict[str, Any]:
    return {"accuracy": acc, "rounds": 10, "bytes_per_round": per_round, "round_s": 1.4, "tx_bytes": per_round * 5,
            "rx_bytes": per_round * 5, "raw_bytes_act": 100, "enc_bytes_act": 25, "raw_bytes_delta": 1000,
            "enc_bytes_delta": delta}


def _sim(acc: float, total: int) -> dict[str, Any]:
    curve = [[1, total // 2, acc - 0.1], [2, total, acc]]
    return {"accuracy": acc, "outcome": "run_complete", "rounds": 2, "bytes": total, "curve": curve,
            "fedlama": [1.0, 0.6], "bytes_to_target": total}


COMM = {
    "split": {"none": _real(0.95, 4_000_000, 1000), "fp16": _real(0.95, 2_000_000, 1000),
              "int8": _real(0.945, 1_050_000, 1000)},
    "delta": {"none": _real(0.98, 100, 1_000_000), "fp16": _real(0.98, 100, 500_000),
              "int8": _real(0.98, 100, 250_000), "topk": _real(0.972, 100, 26_000)},
    "fedlama": {"fedavg": _sim(0.93, 1000), "phi2": _sim(0.93, 800), "phi4": _sim(0.93, 700)},
    "strategies": {"clean": {"fedavg": _sim(0.96, 1), "krum": _sim(0.95, 1)},
                   "attack": {"fedavg": _sim(0.1, 1), "krum": _sim(0.95, 1)}, "devices": 8,
                   "partition": "dirichlet:0.5", "attack_scale": -10.0, "params": {}},
}


PIPELINE = {'batch_size': 64,
             'batches': 10,
             'block_ms': 40.0,
             'blocks': 12,
             'cpus': 2,
             'dp_vs_equal': 1.8041,
             'layouts': {'s3': [0, 4, 8, 12],
                         's4': [0, 3, 6, 9, 12],
                         'speeds_dp': [0, 1, 5, 12],
                         'speeds_equal': [0, 4, 8, 12]},
             'loadavg': [4.92, 4.78, 4.15],
             'max_abs_diff': 9.313225746154785e-10,
             'max_abs_diff_by_run': {'alone': 1.7462298274040222e-10,
                                     'rebalance': 9.313225746154785e-10,
                                     's2': 1.7462298274040222e-10,
                                     's3': 1.7462298274040222e-10,
                                     's4': 1.7462298274040222e-10,
                                     's4_gpipe': 1.7462298274040222e-10,
                                     'speeds_dp': 1.7462298274040222e-10,
                                     'speeds_equal': 1.7462298274040222e-10},
             'micro_batches': 8,
             'model': 'chain12',
             'predicted_samples_s': {'s3': 106.281, 's4': 128.895, 'speeds_dp': 56.724, 'speeds_equal': 30.38},
             'rebalance': {'after_samples_s': 73.722,
                           'before_samples_s': 100.648,
                           'blocks_after': [0, 6, 8, 12],
                           'blocks_before': [0, 4, 8, 12],
                           'curve': [[1, 0.63772], [2, 1.27363], [3, 1.91928], [4, 2.55268]],
                           'during_samples_s': 40.519,
                           'predicted_samples_s': 70.231,
                           'recovery': 1.0497,
                           'replanned': True,
                           'replanned_at': 9,
                           'slowed_at': 6},
             'rebalance_recovery': 1.0497,
             'speeds': {'dev1': 1.0, 'edge1': 4.0, 'h1': 2.0},
             'speeds_samples_s': {'dp': 58.35, 'equal': 32.343},
             'speedup_s2': 1.6851,
             'speedup_s3': 2.267,
             'speedup_s4': 2.7073,
             'stash_bound': {'1f1b': [7, 5, 3, 1], 'gpipe': [8, 8, 8, 1]},
             'stash_max': {'1f1b': [7, 5, 3, 1], 'gpipe': [8, 8, 8, 1]},
             'stash_within_bound': True,
             'throughput': {'alone': 44.127, 's2': 74.358, 's3': 100.036, 's4': 119.465}}


def _scale_run(n: int, round_s: float, rss: float) -> dict[str, Any]:
    return {"devices": n, "rounds": 3, "online_s": n / 100, "round_s": [round_s * 2, round_s, round_s],
            "round_overhead_s": round_s, "participants": [n, n, n], "cloud_cpu_s_per_round": 0.01 * n,
            "edge_cpu_s_per_round": 0.02 * n, "broker_cpu_s_per_round": 0.005 * n,
            "virtual_cpu_s_per_round": 0.03 * n, "cloud_peak_rss_mb": rss, "edge_peak_rss_mb": rss - 5,
            "virtual_peak_rss_mb": 230.0 + n / 10, "messages_per_s": 100.0 * n, "model_mb": 0.5,
            "edge_model_msgs_per_round": 2.0}


def _bridged_run(n: int, round_s: float, rss: float) -> dict[str, Any]:
    brokers = {"cloud": 0.001 * n, "site1": 0.002 * n, "site2": 0.002 * n}
    return {**_scale_run(n, round_s, rss), "sites": 2, "brokers_cpu_s_per_round": brokers,
            "broker_cpu_s_per_round": 0.005 * n,
            "bridge_kb_per_round": {s: {"up": 38.0 * n, "down": 76.0} for s in ("site1", "site2")}}


SCALE = {"virtual": [_scale_run(10, 0.1, 240.0), _scale_run(100, 0.3, 240.4), _scale_run(1000, 1.5, 240.9)],
         "bridged": [_bridged_run(10, 0.12, 240.0), _bridged_run(100, 0.35, 240.4), _bridged_run(1000, 1.8, 241.0)],
         "sim": {"devices": 1000, "rounds": 10, "outcome": "run_complete", "wall_s": 200.0, "final_accuracy": 0.9,
                 "participants": [1000] * 10}}


def fake_async_run(strategy: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    curve = [[1.0, 0.5], [2.0, 0.92 if strategy == "ecofl" else 0.8], [3.0, 0.95]]
    return {"time_to_target_s": 2.0 if strategy == "ecofl" else 3.0, "final_accuracy": 0.95, "best_accuracy": 0.95,
            "updates": len(curve), "curve": curve}


def canned(bench: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the bench's measuring (fleets, brokers) by a canned result."""
    if bench == "async":
        monkeypatch.setattr(async_, "run_one", fake_async_run)
    else:
        result = {"transport": TRANSPORT, "split": SPLIT, "migration": MIGRATION, "data": DATA,
                  "resilience": RESILIENCE, "comm": COMM, "pipeline": PIPELINE, "hetero": HETERO, "scale": SCALE}[bench]
        module = {"transport": transport, "split": split, "migration": migration, "data": data,
                  "resilience": resilience, "comm": comm, "pipeline": pipeline, "hetero": hetero, "scale": scale}[bench]
        monkeypatch.setattr(module, "measure", lambda *a, **kw: json.loads(json.dumps(result)))


def failing(bench: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: Any, **kw: Any) -> Any:
        raise RunFailed({"run": "bench-x", "round": 0, "reason": "round 0: quorum not met in 1 attempts"})

    module = {"split": split, "migration": migration, "resilience": resilience, "comm": comm,
              "pipeline": pipeline, "hetero": hetero, "scale": scale}.get(bench)
    if module is None:
        monkeypatch.setattr(async_, "run_one", fail)
    else:
        monkeypatch.setattr(module, "measure", fail)


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


@pytest.mark.parametrize("bench", ["transport", "split", "migration", "async", "data", "resilience", "comm",
                                   "pipeline", "hetero", "scale"])
def test_every_bench_writes_its_files_into_the_out_folder_and_nothing_into_the_working_directory(
        bench: str, cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    canned(bench, monkeypatch)
    out = tmp_path / "results" / bench  # created by the bench
    assert main(["bench", bench, "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "results.json").read_text()) == printed
    files = {p.name for p in out.iterdir()}
    if bench in ("async", "comm", "pipeline", "hetero", "scale"):
        # PNG with matplotlib, else the hand-written SVG; the JSON names where it went.
        (plot,) = files - {"results.json"}
        stem = {"async": "async_accuracy", "comm": "comm", "pipeline": "pipeline", "hetero": "hetero",
                "scale": "scale"}[bench]
        assert plot in (f"{stem}.png", f"{stem}.svg") and printed["plot"] == str(out / plot)
        assert (out / plot).stat().st_size > 0
    else:
        assert files == {"results.json"}
    assert list(cwd.iterdir()) == [], "nothing lands in the working directory"


def test_the_data_bench_measures_at_a_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "data", "--json", "--out", str(tmp_path), "--csv-rows", "300", "--images", "3",
                 "--shard-rows", "300"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == set(DATA) and set(r["mapped"]) == set(EPOCH) and r["csv_rows_per_s"] > 0
    assert r["mapped"]["batches"] == r["whole"]["batches"] == 3
    # Loaded whole, the shard is the process's own memory; memory-mapped, it is not.
    assert r["whole"]["anon_mb"] > r["mapped"]["anon_mb"] + 0.5 * r["shard_mb"]


def test_comm_summarises_every_figure_the_issue_asks_for(cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    canned("comm", monkeypatch)
    assert main(["bench", "comm", "--json", "--out", str(tmp_path / "c")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["split_int8_bytes_ratio"] == pytest.approx(1_050_000 / 4_000_000)
    assert r["split_int8_acc_delta"] == pytest.approx(-0.005)
    assert r["delta_topk_bytes_ratio"] == pytest.approx(0.026) and r["delta_topk_acc_delta"] == pytest.approx(-0.008)
    assert r["fedlama_bytes_ratio"] == pytest.approx(0.8) and r["fedlama_acc_delta"] == 0.0
    assert r["robust_acc_under_attack"] == 0.95 and r["robust_best"] == "krum"
    assert r["targets"] == {"split_int8": True, "fedlama_phi2": False, "delta_topk": True, "robust": True}


def test_hetero_summarises_every_figure_the_issue_asks_for(cwd: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    canned("hetero", monkeypatch)
    assert main(["bench", "hetero", "--json", "--out", str(tmp_path / "h")]) == 0
    r = json.loads(capsys.readouterr().out)
    # Per seed: partial - width = 0.10, 0.05; partial - strong only = 0.15, 0.09.
    assert r["acc_partial_minus_width"] == pytest.approx(0.075) and r["acc_partial_minus_width_std"] > 0
    assert r["acc_partial_minus_strong_only"] == pytest.approx(0.12)
    # Two seeds: the 95% interval is 12.706 x std / sqrt(2); for partial - width, 12.706 x 0.0354 / 1.414.
    assert r["acc_partial_minus_width_ci95"] == pytest.approx(12.706 * 0.025, abs=1e-3)
    assert r["planned_vs_fixed"] == r["planned_vs_fixed_links"] == 0.8 and r["planned_vs_fixed_speeds"] == 0.95
    assert r["tau_time_ratio"] == pytest.approx(1.05) and r["tau_acc_delta"] == pytest.approx(-0.02)
    assert r["int8_memory_ratio"] == pytest.approx(0.4)
    # With two seeds neither interval clears zero: no clear margin yet.
    assert r["targets"] == {"partial_beats_width_and_strong_only": False, "planned_vs_fixed": True, "tau": True}


def test_hetero_refuses_an_unknown_planner_scenario_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "hetero", "--planner-scenarios", "speeds,link"])
    assert e.value.code == 2
    assert "unknown scenario ['link']: choose from speeds, links" in capsys.readouterr().err


def test_scale_reports_per_fleet_size_the_figures_the_issue_asks_for(
        cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    canned("scale", monkeypatch)
    assert main(["bench", "scale", "--json", "--out", str(tmp_path / "s")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["round_overhead_s"] == {"10": 0.1, "100": 0.3, "1000": 1.5}
    assert r["cloud_peak_rss_mb"] == {"10": 240.0, "100": 240.4, "1000": 240.9}
    assert r["broker_cpu_s_per_round"]["1000"] == 5.0 and r["messages_per_s"]["100"] == 10000.0
    assert r["sim_wall_s_1000x10"] == 200.0
    assert r["cloud_rss_growth_mb"] == pytest.approx(0.9) and r["cloud_rss_growth_models"] == pytest.approx(1.8)
    assert r["complete"] is True and len(r["runs"]) == 3
    # The same fleets over two bridged site brokers, next to the single broker's figures.
    assert r["round_overhead_s_bridged"] == {"10": 0.12, "100": 0.35, "1000": 1.8}
    assert set(r["bridged"]) == {"10", "100", "1000"}
    assert r["bridged"]["1000"]["brokers_cpu_s_per_round"] == {"cloud": 1.0, "site1": 2.0, "site2": 2.0}
    assert r["bridged"]["1000"]["bridge_kb_per_round"]["site2"] == {"up": 38000.0, "down": 76.0}


def test_the_scale_bench_measures_a_real_broker_at_a_tiny_size(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "scale", "--json", "--small", "--out", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["round_overhead_s"]) == {"5", "10"} and r["complete"] is True
    assert all(v > 0 for v in r["cloud_peak_rss_mb"].values()) and r["sim"]["outcome"] == "run_complete"
    # Spread over two site brokers bridged to the cloud's: every round counted every device (complete), three
    # brokers were measured, and each round's model crossed each bridge to its site's edge and the edge's update
    # came back (their only way between the cloud and the edge).
    assert set(r["round_overhead_s_bridged"]) == {"5", "10"}
    for b in r["bridged"].values():
        assert set(b["brokers_cpu_s_per_round"]) == {"cloud", "site1", "site2"} and b["participants"]
        model_kb = b["model_mb"] * 1024
        assert set(b["bridge_kb_total"]) == set(b["bridge_kb_per_round"]) == {"site1", "site2"}
        for kb in b["bridge_kb_total"].values():
            assert kb["down"] >= b["rounds"] * model_kb and kb["up"] >= b["rounds"] * model_kb
    assert r["sim_wall_s_1000x10"] is None  # not measured at that size


def test_the_shipped_bridge_forwards_only_the_deltas_addressed_to_the_cloud_and_carries_the_round(
        tmp_path: Path) -> None:
    """docs/operations.md, "Bridge capacity": the shipped delta line, measured as the bench does."""
    assert "topic mqttfl/v1/+/delta/+/cloud out 1" in BRIDGE_CONF.read_text().splitlines()
    r = scale.virtual_run(tmp_path / "fleet", 10, 2, timeout=120.0, sites=2)
    assert r["participants"] == [10, 10]  # the edges' updates reached the cloud
    model_kb = r["model_mb"] * 1024
    # Up: each edge's update and small messages, not its five devices' updates (each about a model's size).
    assert all(kb["up"] < 3 * model_kb for kb in r["bridge_kb_per_round"].values()), r["bridge_kb_per_round"]


def test_a_bridge_file_without_its_deployment_lines_is_refused_before_any_fleet_starts(
        cwd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "bridge.conf"
    conf.write_text("topic mqttfl/v1/+/delta/+/cloud out 1\n")
    assert main(["bench", "scale", "--json", "--out", str(tmp_path / "s"), "--bridge-conf", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "--bridge-conf" in err and "address" in err and not (tmp_path / "s" / "results.json").exists()


def test_by_default_the_files_go_to_bench_results_named_after_the_bench(
        cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    canned("async", monkeypatch)
    assert main(["bench", "async"]) == 0
    table = capsys.readouterr().out
    assert [p.name for p in cwd.iterdir()] == ["bench-results"]
    out = cwd / "bench-results" / "async"
    assert "results.json" in {p.name for p in out.iterdir()} and len(list(out.iterdir())) == 2
    assert str(Path("bench-results") / "async" / "results.json") in table


@pytest.mark.parametrize("bench", ["split", "migration", "async", "resilience", "comm", "pipeline", "hetero",
                                   "scale"])
def test_a_failed_run_stops_the_bench_with_exit_1_and_says_why(
        bench: str, cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    failing(bench, monkeypatch)
    out = tmp_path / "results"
    assert main(["bench", bench, "--json", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "quorum not met" in captured.err and f"mqttfl bench {bench}" in captured.err
    assert not (out / "results.json").exists()
