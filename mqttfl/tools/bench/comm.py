"""``mqttfl bench comm``: fewer bytes and other aggregation rules, measured side by side in one run.

1. **Split mode** (real broker and processes): VGG-5 cut after block 2 on the digits (3x32x32), 4 devices on 2
   edges, FedFly's training settings; activations and gradients as ``none``, ``fp16`` and ``int8``. Bytes per
   round are everything the devices sent and received (their transport counters at the end, over the rounds);
   accuracy is the cloud's test accuracy after the last round.
2. **Delta compression** (real broker and processes): classic FL (every device trains the whole CNN on the 8x8
   digits), 4 devices on 2 edges; deltas as ``none``, ``fp16``, ``int8`` and ``topk`` (1% with error
   feedback). Delta bytes are the tensor bytes the devices' deltas took on the wire (``enc_bytes_delta``).
3. **FedLAMA** (in memory, ``mqttfl.runtime.memory``: many clients on virtual time; the same machines, codec and
   byte counters): the CNN, 16 devices, FedAvg vs FedLAMA with phi = 2 and 4. Bytes are the model and delta
   tensor bytes in both directions on every link. ``fedlama_bytes_ratio``: bytes until a run first reaches
   FedAvg's final accuracy, FedLAMA (phi = 2) over FedAvg (the same rule for both); ``fedlama_acc_delta``: final
   accuracies after the same number of rounds (the same local steps).
4. **Strategies** (in memory): the CNN on non-IID shards (Dirichlet 0.5), 8 devices; final accuracy of every
   synchronous strategy, and with one poisoning device (``attack_scale``, default -10: its delta scaled and
   flipped) for FedAvg and the robust rules. ``robust_acc_under_attack``: the best robust rule's accuracy under
   attack; ``robust_gap``: that minus clean FedAvg's.

Writes ``results.json`` and ``comm.png`` (matplotlib) or ``comm.svg`` into ``--out``. ``--small`` runs every
section at a toy size (for tests). A failed real-process run stops the bench with exit 1; a run that fails in
memory (FedAvg under attack diverges, its deltas are refused as non-finite) is reported with its last accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results, work_dir

SECTIONS = ("split", "delta", "fedlama", "strategies")
ROBUST = ("median", "trimmed", "krum", "clip")
CLEAN = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fednova", *ROBUST)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--split-rounds", type=int, default=10, help="rounds of the split runs (VGG-5)")
    p.add_argument("--delta-rounds", type=int, default=40, help="rounds of the delta-compression runs")
    p.add_argument("--topk-ratio", type=float, default=0.01, help="fraction of a delta top-k sends")
    p.add_argument("--lama-rounds", type=int, default=30, help="rounds of the FedLAMA runs")
    p.add_argument("--lama-devices", type=int, default=16, help="devices of the FedLAMA runs")
    p.add_argument("--strategy-rounds", type=int, default=40, help="rounds of the strategy runs")
    p.add_argument("--attack-scale", type=float, default=-10.0, help="the poisoning device's delta factor")
    p.add_argument("--small", action="store_true", help="every section at a toy size (tests)")
    add_out_argument(p, "comm")
    p.add_argument("--workdir", help="keep configs, logs and state here (default: a temp dir, removed)")


# ------------------------------------------------------------------------------------------------ fleets


def _cnn_cut() -> int:
    from mqttfl.ml.models import schema_of
    from mqttfl.protocol.schema import ModelRef

    return schema_of(ModelRef("cnn", (1, 8, 8), 10)).n_blocks


def real_run(root: Path, broker: Any, spec: Any, data: Any, timeout: float) -> dict[str, Any]:
    """Every agent a process: accuracy, bytes per round and the devices' summed transport counters at the end;
    ``nodes``: every device's and edge's own counters, ``metrics``: the cloud's round metrics."""
    from mqttfl.tools.testbed import Testbed

    with Testbed(root, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_event("run_complete", timeout)
        nodes = {n: tb.ctl(n, "status")["result"]["transport"] for n in [*spec.devices, *spec.edges]}
        metrics = tb.round_metrics()
    total = {k: sum(int(nodes[d].get(k, 0)) for d in spec.devices)
             for k in ("tx_bytes", "rx_bytes", "raw_bytes_act", "enc_bytes_act", "raw_bytes_delta", "enc_bytes_delta")}
    rounds = max(1, len(metrics))
    return {"accuracy": metrics[-1]["accuracy"] if metrics else None, "rounds": len(metrics),
            "bytes_per_round": round((total["tx_bytes"] + total["rx_bytes"]) / rounds),
            "round_s": round(sum(m["round_s"] for m in metrics) / rounds, 3), **total, "nodes": nodes,
            "metrics": metrics}


def sim_run(spec: Any, shards: Any, test: Any, deadline_s: float = 120.0) -> dict[str, Any]:
    """In memory: accuracy and cumulative model + delta tensor bytes after every round."""
    from mqttfl.runtime.memory import MemoryFleet, Stalled

    fleet = MemoryFleet.from_spec(spec, shards, test, seed=int(spec.cloud.get("seed", 0)), strict=False)
    fleet.start()
    curve: list[list[float]] = []
    outcome = "run_complete"

    def traffic() -> int:
        return sum(fleet.counts(n)["enc_bytes_model"] + fleet.counts(n)["enc_bytes_delta"] for n in fleet.nodes)

    def ended() -> Any:
        return next((e for e in fleet.event_log if e["event"] in ("run_complete", "run_failed")), None)

    while True:
        try:
            fleet.run_until(lambda: len(fleet.metrics("round", node="cloud")) > len(curve) or ended(),
                            max_time=20 * deadline_s)
        except Stalled:
            outcome = "stalled"
            break
        entries = fleet.metrics("round", node="cloud")
        while len(curve) < len(entries):
            acc = entries[len(curve)]["accuracy"]
            curve.append([len(curve) + 1, traffic(), acc if acc is not None else 0.0])
        if ended() is not None:
            outcome = ended()["event"]
            break
    entries = fleet.metrics("round", node="cloud")
    return {"accuracy": curve[-1][2] if curve else None, "outcome": outcome, "rounds": len(curve),
            "bytes": curve[-1][1] if curve else 0, "curve": curve,
            "fedlama": [e.get("fedlama", {}).get("traffic_ratio") for e in entries]}


def _bytes_to(curve: list[list[float]], target: float) -> float | None:
    return next((b for _, b, a in curve if a >= target), None)


# ------------------------------------------------------------------------------------------------ sections


def split_section(args: argparse.Namespace, root: Path, broker: Any) -> dict[str, Any]:
    from mqttfl.ml.data import load_digits
    from mqttfl.tools.testbed import FleetSpec

    shape = (64,) if args.small else (3, 32, 32)
    data = load_digits(shape)
    devices = {"dev1": "edge1"} if args.small else {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2", "dev4": "edge2"}
    out: dict[str, Any] = {}
    for enc in ("none", "int8") if args.small else ("none", "fp16", "int8"):
        cloud = {"rounds": args.split_rounds, "run": f"comm-split-{enc}", "act_encoding": enc, "grad_encoding": enc,
                 "seed": 1}
        spec = FleetSpec(devices=dict(devices), model="mlp" if args.small else "vgg5", input_shape=shape,
                         cloud=cloud, fleet=f"comm-split-{enc}")
        out[enc] = _brief(real_run(root / f"split-{enc}", broker, spec, data, 300 + 120 * args.split_rounds))
    return out


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("nodes", "metrics")}


def delta_section(args: argparse.Namespace, root: Path, broker: Any) -> dict[str, Any]:
    from mqttfl.ml.data import load_digits
    from mqttfl.tools.testbed import FleetSpec

    data = load_digits((1, 8, 8))
    devices = {"dev1": "edge1"} if args.small else {"dev1": "edge1", "dev2": "edge1", "dev3": "edge2", "dev4": "edge2"}
    out: dict[str, Any] = {}
    for enc in ("none", "topk") if args.small else ("none", "fp16", "int8", "topk"):
        cloud = {"rounds": args.delta_rounds, "run": f"comm-delta-{enc}", "delta_encoding": enc, "lr": 0.05,
                 "batch_size": 32, "topk_ratio": args.topk_ratio, "seed": 1}
        spec = FleetSpec(devices=dict(devices), model="cnn", input_shape=(1, 8, 8), cloud=cloud,
                         fleet=f"comm-delta-{enc}", device_extra={d: {"cut": _cnn_cut()} for d in devices})
        out[enc] = _brief(real_run(root / f"delta-{enc}", broker, spec, data, 300 + 30 * args.delta_rounds))
    return out


def _sim_spec(n: int, rounds: int, partition: str, **cloud: Any) -> Any:
    from mqttfl.tools.testbed import FleetSpec

    devices = {f"dev{i + 1}": f"edge{i % 2 + 1}" for i in range(n)}
    section = {"rounds": rounds, "batch_size": 32, "lr": 0.05, "seed": 1, "run": "comm", "deadline_s": 60.0,
               "max_attempts": 1, **cloud}
    return FleetSpec(devices=devices, model="cnn", input_shape=(1, 8, 8), partition=partition, cloud=section,
                     data_seed=1, device_extra={d: {"cut": _cnn_cut()} for d in devices})


def fedlama_section(args: argparse.Namespace) -> dict[str, Any]:
    from mqttfl.ml.data import load_digits
    from mqttfl.tools.testbed import make_shards

    train, test = load_digits((1, 8, 8))
    n = 4 if args.small else args.lama_devices
    out: dict[str, Any] = {}
    for name, phi in (("fedavg", 0), ("phi2", 2), ("phi4", 4)):
        spec = _sim_spec(n, args.lama_rounds, "iid", fedlama_phi=phi)
        out[name] = sim_run(spec, make_shards(spec, train), test)
    target = out["fedavg"]["accuracy"]
    for r in out.values():
        r["bytes_to_target"] = _bytes_to(r["curve"], target) if target is not None else None
    return out


def strategies_section(args: argparse.Namespace) -> dict[str, Any]:
    from mqttfl.ml.data import load_digits
    from mqttfl.tools.testbed import make_shards

    train, test = load_digits((1, 8, 8))
    n = 4 if args.small else 8
    params = {"trim_beta": 0.125, "krum_f": 1, "krum_m": max(1, n - 2), "server_lr": 0.01}
    clean, attack = {}, {}
    for s in ("fedavg", *ROBUST) if args.small else CLEAN:
        spec = _sim_spec(n, args.strategy_rounds, "dirichlet:0.5", strategy=s, **params)
        clean[s] = sim_run(spec, make_shards(spec, train), test)
    for s in ("fedavg", *ROBUST):
        spec = _sim_spec(n, args.strategy_rounds, "dirichlet:0.5", strategy=s, **params)
        spec.device_extra["dev1"]["attack_scale"] = args.attack_scale
        # The rules under test, not the plausibility bound (max_update_norm), which would refuse the scaled delta.
        spec.cloud["max_update_norm"] = 0.0
        attack[s] = sim_run(spec, make_shards(spec, train), test)
    return {"clean": clean, "attack": attack, "devices": n, "partition": "dirichlet:0.5",
            "attack_scale": args.attack_scale, "params": params}


# ------------------------------------------------------------------------------------------------ summary


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _diff(a: Any, b: Any) -> float | None:
    return round(a - b, 4) if a is not None and b is not None else None


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if "split" in res:
        sp = res["split"]
        for enc in ("fp16", "int8"):
            if enc in sp:
                s[f"split_{enc}_bytes_ratio"] = _ratio(sp[enc]["bytes_per_round"], sp["none"]["bytes_per_round"])
                s[f"split_{enc}_acc_delta"] = _diff(sp[enc]["accuracy"], sp["none"]["accuracy"])
    if "delta" in res:
        dl = res["delta"]
        for enc in ("fp16", "int8", "topk"):
            if enc in dl:
                s[f"delta_{enc}_bytes_ratio"] = _ratio(dl[enc]["enc_bytes_delta"], dl["none"]["enc_bytes_delta"])
                s[f"delta_{enc}_acc_delta"] = _diff(dl[enc]["accuracy"], dl["none"]["accuracy"])
    if "fedlama" in res:
        fl = res["fedlama"]
        for name, key in (("phi2", "fedlama"), ("phi4", "fedlama_phi4")):
            s[f"{key}_bytes_ratio"] = _ratio(fl[name]["bytes_to_target"], fl["fedavg"]["bytes_to_target"])
            s[f"{key}_total_bytes_ratio"] = _ratio(fl[name]["bytes"], fl["fedavg"]["bytes"])
            s[f"{key}_acc_delta"] = _diff(fl[name]["accuracy"], fl["fedavg"]["accuracy"])
    if "strategies" in res:
        st = res["strategies"]
        robust = {k: v["accuracy"] for k, v in st["attack"].items() if k in ROBUST and v["accuracy"] is not None}
        best = max(robust, key=lambda k: robust[k]) if robust else None
        clean = st["clean"]["fedavg"]["accuracy"]
        s["robust_acc_under_attack"] = robust.get(best) if best else None
        s["robust_best"] = best
        s["robust_gap"] = _diff(s["robust_acc_under_attack"], clean)
        s["fedavg_acc_under_attack"] = st["attack"]["fedavg"]["accuracy"]
        s["fedavg_clean_acc"] = clean
    s["targets"] = {
        "split_int8": _met(s.get("split_int8_bytes_ratio"), 0.3, s.get("split_int8_acc_delta"), -0.01),
        "fedlama_phi2": _met(s.get("fedlama_bytes_ratio"), 0.6, s.get("fedlama_acc_delta"), -0.01),
        "delta_topk": _met(s.get("delta_topk_bytes_ratio"), 0.05, s.get("delta_topk_acc_delta"), -0.02),
        "robust": None if s.get("robust_gap") is None else bool(
            s["robust_gap"] >= -0.02 and (s["fedavg_acc_under_attack"] or 0.0) < (s["fedavg_clean_acc"] or 0) - 0.02),
    }
    return s


def _met(ratio: Any, max_ratio: float, delta: Any, min_delta: float) -> bool | None:
    if ratio is None or delta is None:
        return None
    return bool(ratio <= max_ratio and delta >= min_delta)


# ------------------------------------------------------------------------------------------------ plot


def plot(res: dict[str, Any], out: Path) -> Path:
    panels = []
    if "split" in res:
        panels.append(("split: MB per round / accuracy", [(k, v["bytes_per_round"] / 1e6, v["accuracy"])
                                                          for k, v in res["split"].items()]))
    if "delta" in res:
        panels.append(("deltas: MB sent by devices / accuracy", [(k, v["enc_bytes_delta"] / 1e6, v["accuracy"])
                                                                 for k, v in res["delta"].items()]))
    if "strategies" in res:
        st = res["strategies"]
        panels.append(("accuracy: clean / under attack", [(k, st["clean"][k]["accuracy"] or 0.0,
                                                            (st["attack"].get(k) or {}).get("accuracy"))
                                                           for k in st["clean"]]))
    curves = {k: v["curve"] for k, v in res.get("fedlama", {}).items()}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(panels, curves, out.with_suffix(".svg"))
    n = len(panels) + (1 if curves else 0)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5 * max(n, 1), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=False):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="first")
        ax.bar([x + 0.2 for x in xs], [r[2] or 0.0 for r in rows], width=0.4, label="second")
        ax.set_xticks(list(xs), [r[0] for r in rows], rotation=45)
        ax.set_title(title, fontsize=9)
    if curves:
        ax = axes[0][len(panels)]
        for name, c in curves.items():
            ax.plot([p[1] / 1e6 for p in c], [p[2] for p in c], label=name)
        ax.set_xlabel("model + delta MB")
        ax.set_ylabel("test accuracy")
        ax.set_title("FedLAMA vs FedAvg", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _svg(panels: list[tuple[str, list[tuple[str, float, Any]]]], curves: dict[str, list[list[float]]],
         path: Path) -> Path:
    """Bars (two per variant, each scaled to its own maximum, the value printed) and FedLAMA's curves."""
    w, h, m = 360, 300, 40
    n = len(panels) + (1 if curves else 0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * max(n, 1)}" height="{h}" font-size="11">',
             f'<rect width="{w * max(n, 1)}" height="{h}" fill="white"/>']
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
    for i, (title, rows) in enumerate(panels):
        x0 = i * w
        parts.append(f'<text x="{x0 + 10}" y="16">{title}</text>')
        tops = [max((abs(float(r[j] or 0.0)) for r in rows), default=1.0) or 1.0 for j in (1, 2)]
        bw = (w - 2 * m) / max(len(rows), 1)
        for k, row in enumerate(rows):
            for j in (1, 2):
                if row[j] is None:
                    continue
                v = float(row[j])
                bh = (h - 2 * m - 30) * abs(v) / tops[j - 1]
                bx = x0 + m + k * bw + (j - 1) * bw / 2
                parts.append(f'<rect x="{bx:.1f}" y="{h - m - bh:.1f}" width="{bw / 2 - 2:.1f}" height="{bh:.1f}" '
                             f'fill="{colors[j - 1]}"/>')
                parts.append(f'<text x="{bx:.1f}" y="{h - m - bh - 3:.1f}" font-size="8">{v:.3g}</text>')
            parts.append(f'<text x="{x0 + m + k * bw:.1f}" y="{h - m + 14}" font-size="9">{row[0]}</text>')
    if curves:
        x0 = len(panels) * w
        parts.append(f'<text x="{x0 + 10}" y="16">FedLAMA vs FedAvg: accuracy vs model + delta bytes</text>')
        bmax = max((p[1] for c in curves.values() for p in c), default=1.0) or 1.0
        for k, (name, c) in enumerate(curves.items()):
            pts = " ".join(f"{x0 + m + (w - 2 * m) * p[1] / bmax:.1f},{h - m - (h - 2 * m) * p[2]:.1f}" for p in c)
            parts.append(f'<polyline points="{pts}" stroke="{colors[k % 4]}" fill="none" stroke-width="1.5"/>')
            parts.append(f'<text x="{x0 + w - 90}" y="{m + 14 * k}" fill="{colors[k % 4]}">{name}</text>')
        parts.append(f'<text x="{x0 + m}" y="{h - 8}">0 .. {bmax / 1e6:.0f} MB</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


# ------------------------------------------------------------------------------------------------ run


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from mqttfl.tools.broker import Broker, BrokerOptions

    if args.small:
        args.split_rounds, args.delta_rounds, args.lama_rounds, args.strategy_rounds = 1, 2, 4, 2
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    res: dict[str, Any] = {}
    broker = None
    if {"split", "delta"} & set(sections):
        broker = Broker(BrokerOptions(persistence=True), workdir=root / "broker")
        broker.start()
    try:
        if "split" in sections:
            res["split"] = split_section(args, root, broker)
        if "delta" in sections:
            res["delta"] = delta_section(args, root, broker)
    finally:
        if broker is not None:
            broker.stop()
    if "fedlama" in sections:
        res["fedlama"] = fedlama_section(args)
    if "strategies" in sections:
        res["strategies"] = strategies_section(args)
    return res


def run(args: argparse.Namespace) -> int:
    import torch

    from mqttfl.tools.testbed import RunFailed

    torch.set_num_threads(1)  # what every agent uses; the in-memory fleets match them
    out_path = out_dir(args)
    try:
        with work_dir(args, "comm") as root:
            res = measure(args, root)
    except RunFailed as e:
        print(f"mqttfl bench comm: {e}", file=sys.stderr)
        return 1
    plot_path = plot(res, out_path / "comm.png")
    summary = summarise(res)
    out = {**summary, "sections": res, "plot": str(plot_path), "small": bool(args.small)}
    rows = [(k, fmt(v, "", 4) if isinstance(v, float) else str(v)) for k, v in summary.items() if k != "targets"]
    rows += [(f"target {k}", str(v)) for k, v in summary["targets"].items()]
    rows.append(("plot", str(plot_path)))
    rows.append(("results", str(save_results(out_path, out))))
    emit(out, rows, args.json)
    return 0
