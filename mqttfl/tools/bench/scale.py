"""``mqttfl bench scale``: what a fleet costs the broker, the edges and the cloud as it grows.

1. **Virtual devices over real MQTT** (``mqttfl virtual --mode replay``): for each N (default 10, 100, 1000) a
   fresh Mosquitto, a cloud and two edges as processes, and N devices in one more process (with worker processes
   of 200 devices each beyond that), each its own MQTT client. The model is the digits MLP and the devices replay
   a fixed update (no training), so the round time is the fleet's overhead: announcing the round, sending the
   model to every device, collecting and folding every update, aggregating. Per N: the cloud's round time
   (``round_s``, announcement to close; the median over the rounds after the first), CPU seconds per round of
   the cloud, the edges (summed), the broker and the virtual devices, the cloud's and the edges' peak RSS
   (``VmHWM``), the virtual devices' processes' summed peak RSS, and the messages the cloud and edges sent and
   received per second of rounds.
2. **The in-memory fleet** (``mqttfl.runtime.memory``, as ``mqttfl sim``): classic FL with the CNN on the 8x8
   digits (each client trains the whole model), ``--sim-devices`` (1000) clients on 2 edges, ``--sim-rounds``
   (10) rounds of FedAvg; its wall time (``sim_wall_s_1000x10`` when run at that size) and final accuracy.

Writes ``results.json`` and ``scale.png`` (matplotlib) or ``scale.svg`` into ``--out``. ``--small`` runs N = 5, 10
and a 20-client, 2-round simulation (for tests). A failed real-process run stops the bench with exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results, work_dir

MODEL_MB_KEY = "model_mb"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--sizes", default="10,100,1000", help="comma list of virtual fleet sizes N")
    p.add_argument("--rounds", type=int, default=5, help="rounds per fleet size")
    p.add_argument("--sim-devices", type=int, default=1000, help="clients of the in-memory run (0: skip it)")
    p.add_argument("--sim-rounds", type=int, default=10, help="rounds of the in-memory run")
    p.add_argument("--resume-every", type=int, default=None,
                   help="[cloud] resume_every of the virtual fleets (default: the key's default; 0: edge resume off, "
                        "so edges write no session files)")
    p.add_argument("--small", action="store_true", help="toy sizes (tests)")
    p.add_argument("--per-device-downloads", action="store_true",
                   help="edges announce rounds with one message per device ([edge] group_downloads = false)")
    add_out_argument(p, "scale")
    p.add_argument("--workdir", help="keep configs, logs and state here (default: a temp dir, removed)")


# ------------------------------------------------------------------------------------------------ processes


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``mqttfl virtual`` spreads a large fleet over worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _messages(transport: dict[str, Any]) -> int:
    return sum(int(v) for k, v in transport.items()
               if k.startswith(("tx_", "rx_")) and not k.endswith("_bytes") and "bytes" not in k)


def virtual_run(root: Path, n: int, rounds: int, timeout: float, cloud: dict[str, Any] | None = None,
                edge: dict[str, Any] | None = None) -> dict[str, Any]:
    """One fleet of ``n`` replaying virtual devices on a fresh broker; see the module docstring."""
    from mqttfl.ml.models import schema_of
    from mqttfl.protocol.schema import ModelRef
    from mqttfl.tools.broker import Broker, BrokerOptions
    from mqttfl.tools.testbed import FleetSpec, Testbed

    schema = schema_of(ModelRef("mlp", (64,), 10))
    broker = Broker(BrokerOptions(), workdir=root / "broker")
    broker.start()
    spec = FleetSpec(devices={}, extra_edges=("edge1", "edge2"), model="mlp", input_shape=(64,),
                     edge_extra=dict(edge or {}),
                     cloud={"rounds": rounds, "batch_size": 10, "lr": 0.05, "seed": 1, "min_devices": n,
                            "deadline_s": max(60.0, timeout), "run": f"scale-{n}", **(cloud or {})})
    try:
        with Testbed(root, spec, broker=broker) as tb:
            tb.prepare()
            tb.start(["cloud", "edge1", "edge2"])
            t0 = time.monotonic()
            tb.start_virtual(n, mode="replay", section={"cut": schema.n_blocks}, log_level="warning")
            tb.wait_event("round_started", timeout)
            online_s = time.monotonic() - t0
            cloud_pid, edge_pids = tb.procs["cloud"].pid, [tb.procs[e].pid for e in spec.edges]
            broker_pid, virtual_pids = broker.proc.pid if broker.proc else 0, process_tree(tb.procs["vdev"].pid)

            def cpu() -> dict[str, float]:
                return {"cloud": cpu_s(cloud_pid), "edges": sum(cpu_s(p) for p in edge_pids),
                        "broker": cpu_s(broker_pid), "virtual": sum(cpu_s(p) for p in virtual_pids)}

            def msgs() -> int:
                return sum(_messages(tb.ctl(x, "status")["result"]["transport"]) for x in ("cloud", *spec.edges))

            c0, m0, w0 = cpu(), msgs(), time.monotonic()
            if not any(m.kind == "event" and m.data and m.data.get("event") == "run_complete" for m in tb.inbox):
                tb.wait_event("run_complete", timeout)  # unless it came in while the counters were read
            c1, m1, w1 = cpu(), msgs(), time.monotonic()
            model_msgs = sum(int(tb.ctl(e, "status")["result"]["transport"].get("tx_model", 0)) for e in spec.edges)
            # From the cloud's run log: an operator's inbox keeps only the newest messages of a large fleet.
            log = root / "state" / "cloud" / "runlog.jsonl"
            entries = sorted((e for e in map(json.loads, log.read_text().splitlines()) if e.get("kind") == "round"),
                             key=lambda e: e["round"])
            rss = {"cloud": peak_rss_mb(cloud_pid), "edge": max(peak_rss_mb(p) for p in edge_pids),
                   "virtual": sum(peak_rss_mb(p) for p in virtual_pids)}
    finally:
        broker.stop()
    round_s = [float(e["round_s"]) for e in entries]
    steady = round_s[1:] or round_s
    done = len(entries)
    return {
        "devices": n, "rounds": done, "online_s": round(online_s, 2),
        "round_s": round_s, "round_overhead_s": round(statistics.median(steady), 3),
        "participants": [e["participants"] for e in entries],
        "cloud_cpu_s_per_round": round((c1["cloud"] - c0["cloud"]) / max(done, 1), 3),
        "edge_cpu_s_per_round": round((c1["edges"] - c0["edges"]) / max(done, 1), 3),
        "broker_cpu_s_per_round": round((c1["broker"] - c0["broker"]) / max(done, 1), 3),
        "virtual_cpu_s_per_round": round((c1["virtual"] - c0["virtual"]) / max(done, 1), 3),
        "cloud_peak_rss_mb": round(rss["cloud"], 1), "edge_peak_rss_mb": round(rss["edge"], 1),
        "virtual_peak_rss_mb": round(rss["virtual"], 1),
        "messages_per_s": round((m1 - m0) / max(w1 - w0, 1e-9), 1),
        "edge_model_msgs_per_round": round(model_msgs / max(done, 1), 1),  # group downloads: one per edge
        MODEL_MB_KEY: round(sum(math.prod(s.shape) * 4 for s in schema.specs().values()) / 2**20, 4),  # float32
    }


# ------------------------------------------------------------------------------------------------ in memory


def sim_run(devices: int, rounds: int) -> dict[str, Any]:
    """The CNN on the digits, ``devices`` clients on 2 edges, FedAvg, in memory: wall time and accuracy."""
    from mqttfl.ml.data import load_digits
    from mqttfl.ml.models import schema_of
    from mqttfl.protocol.schema import ModelRef
    from mqttfl.runtime.memory import MemoryFleet
    from mqttfl.tools.testbed import FleetSpec, make_shards

    shape = (1, 8, 8)
    local = {"cut": schema_of(ModelRef("cnn", shape, 10)).n_blocks}  # classic FL: each client trains the whole CNN
    names = [f"dev{i + 1}" for i in range(devices)]
    cloud = {"rounds": rounds, "batch_size": 32, "lr": 0.05, "seed": 0, "run": "sim", "deadline_s": 3600.0}
    spec = FleetSpec(devices={d: f"edge{i % 2 + 1}" for i, d in enumerate(names)}, model="cnn", input_shape=shape,
                     device_extra={d: dict(local) for d in names}, cloud=cloud)
    train, test = load_digits(shape)
    t0 = time.monotonic()
    fleet = MemoryFleet.from_spec(spec, make_shards(spec, train), test, seed=0, strict=False)
    fleet.start()
    end = fleet.run_to_end(max_time=10 * 3600.0)
    wall = time.monotonic() - t0
    entries = fleet.metrics("round", node=fleet.cloud)
    return {"devices": devices, "rounds": len(entries), "outcome": end["event"], "wall_s": round(wall, 2),
            "final_accuracy": entries[-1]["accuracy"] if entries else None,
            "participants": [e["participants"] for e in entries]}


# ------------------------------------------------------------------------------------------------ plot


def plot(res: dict[str, Any], out: Path) -> Path:
    runs = sorted(res["virtual"], key=lambda r: r["devices"])
    ns = [r["devices"] for r in runs]
    series = {"round overhead s": [r["round_overhead_s"] for r in runs],
              "cloud peak RSS MB": [r["cloud_peak_rss_mb"] for r in runs],
              "edge peak RSS MB": [r["edge_peak_rss_mb"] for r in runs]}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(ns, series, out.with_suffix(".svg"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(ns, series["round overhead s"], marker="o")
    axes[0].set_ylabel("round time, s (replayed updates)")
    axes[1].plot(ns, series["cloud peak RSS MB"], marker="o", label="cloud")
    axes[1].plot(ns, series["edge peak RSS MB"], marker="o", label="edge")
    axes[1].set_ylabel("peak RSS, MB")
    axes[1].legend()
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("virtual devices N")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _svg(ns: list[int], series: dict[str, list[float]], path: Path) -> Path:
    """One panel per series: a polyline over N (log scale), each value printed."""
    w, h, m = 320, 260, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(series)}" height="{h}" font-size="11">',
             f'<rect width="{w * len(series)}" height="{h}" fill="white"/>']
    lo, hi = math.log10(min(ns)), math.log10(max(ns))
    for i, (name, ys) in enumerate(series.items()):
        x0, top = i * w, max(ys) or 1.0
        parts.append(f'<text x="{x0 + 10}" y="16">{name} vs N</text>')
        pts = []
        for n, y in zip(ns, ys, strict=True):
            x = x0 + m + (w - 2 * m) * ((math.log10(n) - lo) / ((hi - lo) or 1.0))
            yy = h - m - (h - 2 * m - 20) * y / top
            pts.append(f"{x:.1f},{yy:.1f}")
            parts.append(f'<text x="{x:.1f}" y="{yy - 4:.1f}" font-size="9">{y:.3g}</text>')
            parts.append(f'<text x="{x:.1f}" y="{h - m + 14}" font-size="9">{n}</text>')
        parts.append(f'<polyline points="{" ".join(pts)}" stroke="#1f77b4" fill="none" stroke-width="1.5"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


# ------------------------------------------------------------------------------------------------ run


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from mqttfl.tools.testbed import RunFailed

    sizes = [5, 10] if args.small else [int(v) for v in args.sizes.split(",") if v.strip()]
    rounds = 2 if args.small else args.rounds
    res: dict[str, Any] = {"virtual": [], "sim": None}
    for n in sizes:
        try:
            cloud = {} if args.resume_every is None else {"resume_every": args.resume_every}
            edge = {"group_downloads": False} if args.per_device_downloads else {}
            res["virtual"].append(virtual_run(root / f"n{n}", n, rounds, timeout=120.0 + 1.0 * n, cloud=cloud,
                                              edge=edge))
        except TimeoutError as e:
            raise RunFailed({"run": f"scale-{n}", "round": -1, "reason": f"N={n}: {e}"}) from e
    sim_devices, sim_rounds = (20, 2) if args.small else (args.sim_devices, args.sim_rounds)
    if sim_devices > 0:
        res["sim"] = sim_run(sim_devices, sim_rounds)
    return res


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    runs = sorted(res["virtual"], key=lambda r: r["devices"])
    by_n = {str(r["devices"]): r for r in runs}
    out: dict[str, Any] = {key: {n: r[key] for n, r in by_n.items()} for key in (
        "round_overhead_s", "cloud_peak_rss_mb", "edge_peak_rss_mb", "cloud_cpu_s_per_round",
        "edge_cpu_s_per_round", "broker_cpu_s_per_round", "messages_per_s", "virtual_peak_rss_mb",
        "edge_model_msgs_per_round")}
    sim = res.get("sim")
    out["sim"] = sim
    out["sim_wall_s_1000x10"] = sim["wall_s"] if sim and sim["devices"] == 1000 and sim["rounds"] == 10 else None
    if runs:
        small, big = runs[0], runs[-1]
        model_mb = big[MODEL_MB_KEY]
        out["cloud_rss_growth_mb"] = round(big["cloud_peak_rss_mb"] - small["cloud_peak_rss_mb"], 1)
        out["cloud_rss_growth_models"] = round(out["cloud_rss_growth_mb"] / model_mb, 1) if model_mb else None
        out["complete"] = all(p == r["devices"] for r in runs for p in r["participants"])
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from mqttfl.tools.testbed import RunFailed

    torch.set_num_threads(1)
    out_path = out_dir(args)
    try:
        with work_dir(args, "scale") as root:
            res = measure(args, root)
    except RunFailed as e:
        print(f"mqttfl bench scale: {e}", file=sys.stderr)
        return 1
    plot_path = plot(res, out_path / "scale.png")
    summary = summarise(res)
    out = {**summary, "runs": res["virtual"], "plot": str(plot_path), "small": bool(args.small),
           "resume_every": args.resume_every}
    rows = []
    for r in res["virtual"]:
        rows.append((f"N={r['devices']}", f"round {fmt(r['round_overhead_s'], 's', 3)}, cloud "
                     f"{fmt(r['cloud_cpu_s_per_round'], 'CPU s/round', 3)} {fmt(r['cloud_peak_rss_mb'], 'MB')}, "
                     f"edges {fmt(r['edge_cpu_s_per_round'], 'CPU s/round', 3)} {fmt(r['edge_peak_rss_mb'], 'MB')}, "
                     f"broker {fmt(r['broker_cpu_s_per_round'], 'CPU s/round', 3)}, "
                     f"{fmt(r['messages_per_s'], 'msg/s', 0)}, online in {fmt(r['online_s'], 's', 1)}, "
                     f"virtual process {fmt(r['virtual_peak_rss_mb'], 'MB')}"))
    sim = res.get("sim")
    if sim:
        rows.append((f"sim {sim['devices']}x{sim['rounds']}", f"{fmt(sim['wall_s'], 's')} wall, accuracy "
                     f"{sim['final_accuracy']}, {sim['outcome']}"))
    for k in ("cloud_rss_growth_mb", "cloud_rss_growth_models", "complete", "sim_wall_s_1000x10"):
        rows.append((k, str(summary.get(k))))
    rows.append(("plot", str(plot_path)))
    rows.append(("results", str(save_results(out_path, out))))
    emit(out, rows, args.json)
    return 0
