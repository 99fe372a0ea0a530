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
   With ``--sites 2`` (the default) each N runs a second time right after, spread over two sites
   (docs/operations.md, "Several sites"): the cloud on a cloud broker, edge1 and its half of the devices on site 1's
   broker, edge2 and the other half on site 2's, each site broker bridged to the cloud broker with the shipped
   ``broker_config/bridge.conf`` (on loopback, without TLS and accounts: mqttfl.tools.sites), each site's devices in
   their own ``mqttfl virtual`` process. The same figures (``bridged``, per N), the brokers' CPU summed and per
   broker (``brokers_cpu_s_per_round``), and what crossed each bridge per round (``bridge_kb_per_round``: up is
   site to cloud, down cloud to site; the kernel's byte counters of the bridge's TCP connection) and in all from
   before the fleet started (``bridge_kb_total``). The per-round figures, like the CPU ones, count from the first
   round's announcement (once the counters are read) to the run's end, divided by the rounds: at a few devices,
   whose rounds last milliseconds, reading the counters can take longer than the rounds.
2. **The in-memory fleet** (``mqttfl.runtime.memory``, as ``mqttfl sim``): classic FL with the CNN on the 8x8
   digits (each client trains the whole model), ``--sim-devices`` (1000) clients on 2 edges, ``--sim-rounds``
   (10) rounds of FedAvg; its wall time (``sim_wall_s_1000x10`` when run at that size) and final accuracy.

Writes ``results.json`` and ``scale.png`` (matplotlib) or ``scale.svg`` into ``--out``. ``--small`` runs N = 5, 10
(on one broker and over two sites) and a 20-client, 2-round simulation (for tests). A failed real-process run
stops the bench with exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--sites", type=int, choices=(1, 2), default=2,
                   help="2: also run every N spread over two site brokers bridged to the cloud's broker "
                        "(the shipped bridge.conf, on loopback); 1: one broker only")
    p.add_argument("--bridge-conf", type=Path, default=None,
                   help="with --sites 2: the site brokers' bridge section instead of broker_config/bridge.conf "
                        "(written for site1, as shipped; TLS and account lines are dropped on loopback), to measure "
                        "what your own topic lines carry")
    p.add_argument("--small", action="store_true", help="toy sizes (tests)")
    p.add_argument("--per-process", type=int, default=500,
                   help="virtual devices per process (default 500: 1,000 devices are two processes, one per core, as "
                        "a thousand boards work in parallel; one process serves its devices on one thread)")
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


SITES = ("site1", "site2")
EDGES = ("edge1", "edge2")  # site i's edge is EDGES[i] when the fleet is spread over SITES


def virtual_run(root: Path, n: int, rounds: int, timeout: float, cloud: dict[str, Any] | None = None,
                sites: int = 1, bridge_conf: Path | None = None, edge: dict[str, Any] | None = None,
                per_process: int | None = None) -> dict[str, Any]:
    """One fleet of ``n`` replaying virtual devices on fresh brokers; see the module docstring. ``sites`` = 1: one
    broker for everything; 2: the cloud on a cloud broker, each edge and its half of the devices on a site
    broker bridged to it (``bridge_conf``, default the shipped bridge.conf)."""
    from mqttfl.ml.models import schema_of
    from mqttfl.protocol.schema import ModelRef
    from mqttfl.tools.broker import Broker, BrokerOptions
    from mqttfl.tools.sites import bridge_bytes, bridged_sites
    from mqttfl.tools.testbed import FleetSpec, Testbed

    schema = schema_of(ModelRef("mlp", (64,), 10))
    spec = FleetSpec(devices={}, extra_edges=EDGES, model="mlp", input_shape=(64,), edge_extra=dict(edge or {}),
                     cloud={"rounds": rounds, "batch_size": 10, "lr": 0.05, "seed": 1, "min_devices": n,
                            "deadline_s": max(60.0, timeout), "run": f"scale-{n}", **(cloud or {})})
    site_brokers: dict[str, Broker] = {}
    on_site: dict[str, Broker] = {}  # the site broker of each edge and virtual devices' process
    with contextlib.ExitStack() as stack:
        if sites == 1:
            broker = Broker(BrokerOptions(), workdir=root / "broker")
            stack.callback(broker.stop)
            brokers = {"broker": broker.start()}
            groups = [("vdev", list(EDGES), n)]  # (process, its edges, its devices)
        else:
            cloud_broker, site_brokers = stack.enter_context(
                bridged_sites(root, list(SITES), bridge_conf=bridge_conf))
            brokers = {"cloud": cloud_broker, **site_brokers}
            # Round-robin over the edges in one broker's run gives edge1 the odd one out; so does this.
            groups = [(f"{s}-dev", [e], k) for s, e, k in zip(SITES, EDGES, (n - n // 2, n // 2), strict=True)]
            on_site |= {e: site_brokers[s] for s, e in zip(SITES, EDGES, strict=True)}
            on_site |= {g: site_brokers[s] for s, (g, _, _) in zip(SITES, groups, strict=True)}
            broker = cloud_broker
        tb = stack.enter_context(Testbed(root, spec, broker=broker, site_brokers=on_site))
        tb.prepare()

        def bridges() -> dict[str, tuple[int, int] | None]:
            return {s: bridge_bytes(b, brokers["cloud"]) for s, b in site_brokers.items()}

        b_start = bridges()
        tb.start(["cloud", *EDGES])
        t0 = time.monotonic()
        for prefix, edges, count in groups:
            if count:
                tb.start_virtual(count, prefix=prefix, edges=edges, mode="replay", section={"cut": schema.n_blocks},
                                 log_level="warning", per_process=per_process)
        tb.wait_event("round_started", timeout)
        online_s = time.monotonic() - t0
        cloud_pid, edge_pids = tb.procs["cloud"].pid, [tb.procs[e].pid for e in EDGES]
        broker_pids = {k: b.proc.pid if b.proc else 0 for k, b in brokers.items()}
        virtual_pids = [p for g, _, count in groups if count for p in process_tree(tb.procs[g].pid)]

        def cpu() -> dict[str, float]:
            return {"cloud": cpu_s(cloud_pid), "edges": sum(cpu_s(p) for p in edge_pids),
                    **{f"broker:{k}": cpu_s(p) for k, p in broker_pids.items()},
                    "virtual": sum(cpu_s(p) for p in virtual_pids)}

        def msgs() -> int:
            return sum(_messages(tb.ctl(x, "status")["result"]["transport"]) for x in ("cloud", *EDGES))

        b0, c0, m0, w0 = bridges(), cpu(), msgs(), time.monotonic()
        if not any(m.kind == "event" and m.data and m.data.get("event") == "run_complete" for m in tb.inbox):
            tb.wait_event("run_complete", timeout)  # unless it came in while the counters were read
        b1, c1, m1, w1 = bridges(), cpu(), msgs(), time.monotonic()
        model_msgs = sum(int(tb.ctl(e, "status")["result"]["transport"].get("tx_model", 0)) for e in EDGES)
        # From the cloud's run log: an operator's inbox keeps only the newest messages of a large fleet.
        log = root / "state" / "cloud" / "runlog.jsonl"
        entries = sorted((e for e in map(json.loads, log.read_text().splitlines()) if e.get("kind") == "round"),
                         key=lambda e: e["round"])
        rss = {"cloud": peak_rss_mb(cloud_pid), "edge": max(peak_rss_mb(p) for p in edge_pids),
               "virtual": sum(peak_rss_mb(p) for p in virtual_pids)}
    round_s = [float(e["round_s"]) for e in entries]
    steady = round_s[1:] or round_s
    done = len(entries)

    def per_round(key: str) -> float:
        return round((c1[key] - c0[key]) / max(done, 1), 3)

    by_broker = {k: per_round(f"broker:{k}") for k in broker_pids}
    out: dict[str, Any] = {
        "devices": n, "sites": sites, "rounds": done, "online_s": round(online_s, 2),
        "round_s": round_s, "round_overhead_s": round(statistics.median(steady), 3),
        "participants": [e["participants"] for e in entries],
        "cloud_cpu_s_per_round": per_round("cloud"), "edge_cpu_s_per_round": per_round("edges"),
        "broker_cpu_s_per_round": round(sum(by_broker.values()), 3), "brokers_cpu_s_per_round": by_broker,
        "virtual_cpu_s_per_round": per_round("virtual"),
        "cloud_peak_rss_mb": round(rss["cloud"], 1), "edge_peak_rss_mb": round(rss["edge"], 1),
        "virtual_peak_rss_mb": round(rss["virtual"], 1),
        "messages_per_s": round((m1 - m0) / max(w1 - w0, 1e-9), 1),
        "edge_model_msgs_per_round": round(model_msgs / max(done, 1), 1),  # group downloads: one per edge
        MODEL_MB_KEY: round(sum(math.prod(s.shape) * 4 for s in schema.specs().values()) / 2**20, 4),  # float32
    }
    if site_brokers:
        # Site -> cloud ("up") and cloud -> site ("down"), from each bridge's TCP connection: per round over the
        # same window as the CPU figures, and in all from before the fleet started (presences included).
        def kb(a: dict[str, tuple[int, int] | None], b: dict[str, tuple[int, int] | None], per: int
               ) -> dict[str, Any]:
            per_site: dict[str, Any] = {}
            for site in site_brokers:
                x, y = a[site], b[site]
                per_site[site] = None if x is None or y is None else {
                    "up": round((y[0] - x[0]) / 1024 / per, 1), "down": round((y[1] - x[1]) / 1024 / per, 1)}
            return per_site

        out["bridge_kb_per_round"] = kb(b0, b1, max(done, 1))
        out["bridge_kb_total"] = kb(b_start, b1, 1)
    return out


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


Series = dict[str, tuple[list[int], list[float]]]  # label -> (N, value)


def panels(res: dict[str, Any]) -> dict[str, Series]:
    """What the plot shows: per panel, one line per broker layout (and per node where it differs)."""
    layouts = [(label, sorted(res.get(key) or [], key=lambda r: r["devices"]))
               for key, label in (("virtual", "one broker"), ("bridged", "two bridged sites"))]
    layouts = [(label, runs) for label, runs in layouts if runs]

    def line(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
        return [r["devices"] for r in runs], [float(r[key]) for r in runs]

    figure = {
        "round time, s (replayed updates)": {label: line(runs, "round_overhead_s") for label, runs in layouts},
        "peak RSS, MB": {f"{node}, {label}": line(runs, f"{node}_peak_rss_mb")
                         for label, runs in layouts for node in ("cloud", "edge")},
        "brokers' CPU s / round (summed)": {label: line(runs, "broker_cpu_s_per_round") for label, runs in layouts},
    }
    bridged = [r for r in sorted(res.get("bridged") or [], key=lambda r: r["devices"])
               if all(kb is not None for kb in (r.get("bridge_kb_per_round") or {None: None}).values())]
    if bridged:
        figure["bridges, MB / round (both sites)"] = {
            way: ([r["devices"] for r in bridged],
                  [sum(kb[way] for kb in r["bridge_kb_per_round"].values()) / 1024 for r in bridged])
            for way in ("up", "down")}
    return figure


def plot(res: dict[str, Any], out: Path) -> Path:
    figure = panels(res)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(figure, out.with_suffix(".svg"))
    fig, axes = plt.subplots(1, len(figure), figsize=(5 * len(figure), 4))
    for ax, (title, series) in zip(axes, figure.items(), strict=True):
        for label, (ns, ys) in series.items():
            ax.plot(ns, ys, marker="o", label=label)
        ax.set_ylabel(title)
        ax.set_xscale("log")
        ax.set_xlabel("virtual devices N")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def _svg(figure: dict[str, Series], path: Path) -> Path:
    """One panel per quantity, a polyline per series over N (log scale), each value printed."""
    w, h, m = 360, 280, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(figure)}" height="{h}" font-size="11">',
             f'<rect width="{w * len(figure)}" height="{h}" fill="white"/>']
    every_n = [n for series in figure.values() for ns, _ in series.values() for n in ns] or [1]
    lo, hi = math.log10(min(every_n)), math.log10(max(every_n))
    for i, (title, series) in enumerate(figure.items()):
        x0 = i * w
        top = max((y for _, ys in series.values() for y in ys), default=1.0) or 1.0
        parts.append(f'<text x="{x0 + 10}" y="16">{title} vs N</text>')
        for j, (label, (ns, ys)) in enumerate(series.items()):
            colour = COLOURS[j % len(COLOURS)]
            parts.append(f'<text x="{x0 + 10}" y="{30 + 12 * j}" font-size="9" fill="{colour}">{label}</text>')
            pts = []
            for n, y in zip(ns, ys, strict=True):
                x = x0 + m + (w - 2 * m) * ((math.log10(n) - lo) / ((hi - lo) or 1.0))
                yy = h - m - (h - 2 * m - 40) * y / top
                pts.append(f"{x:.1f},{yy:.1f}")
                parts.append(f'<text x="{x:.1f}" y="{yy - 4:.1f}" font-size="9" fill="{colour}">{y:.3g}</text>')
                parts.append(f'<text x="{x:.1f}" y="{h - m + 14}" font-size="9">{n}</text>')
            parts.append(f'<polyline points="{" ".join(pts)}" stroke="{colour}" fill="none" stroke-width="1.5"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


# ------------------------------------------------------------------------------------------------ run


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from mqttfl.tools.broker import BrokerError
    from mqttfl.tools.testbed import RunFailed

    sizes = [5, 10] if args.small else [int(v) for v in args.sizes.split(",") if v.strip()]
    rounds = 2 if args.small else args.rounds
    res: dict[str, Any] = {"virtual": [], "bridged": [], "sim": None}
    cloud = {} if args.resume_every is None else {"resume_every": args.resume_every}
    # Each N on one broker, then at once over two sites: the pair side by side under the same load.
    for n in sizes:
        for sites, key in ((1, "virtual"), (2, "bridged")):
            if sites > args.sites:
                continue
            try:
                res[key].append(virtual_run(root / f"n{n}-sites{sites}", n, rounds, timeout=120.0 + 1.0 * n,
                                            cloud=cloud, sites=sites, bridge_conf=args.bridge_conf,
                                            edge={"group_downloads": False} if args.per_device_downloads else {},
                                            per_process=args.per_process))
            except (TimeoutError, BrokerError) as e:  # a round or a broker (or its bridge) that never came
                where = "" if sites == 1 else f" over {sites} bridged sites"
                raise RunFailed({"run": f"scale-{n}", "round": -1, "reason": f"N={n}{where}: {e}"}) from e
    sim_devices, sim_rounds = (20, 2) if args.small else (args.sim_devices, args.sim_rounds)
    if sim_devices > 0:
        res["sim"] = sim_run(sim_devices, sim_rounds)
    return res


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    runs = sorted(res["virtual"], key=lambda r: r["devices"])
    bridged = sorted(res.get("bridged") or [], key=lambda r: r["devices"])
    by_n = {str(r["devices"]): r for r in runs}
    out: dict[str, Any] = {key: {n: r[key] for n, r in by_n.items()} for key in (
        "round_overhead_s", "cloud_peak_rss_mb", "edge_peak_rss_mb", "cloud_cpu_s_per_round",
        "edge_cpu_s_per_round", "broker_cpu_s_per_round", "messages_per_s", "virtual_peak_rss_mb",
        "edge_model_msgs_per_round")}
    # The same figures with the fleet spread over two bridged site brokers, per N.
    out["bridged"] = {str(r["devices"]): r for r in bridged}
    out["round_overhead_s_bridged"] = {str(r["devices"]): r["round_overhead_s"] for r in bridged}
    sim = res.get("sim")
    out["sim"] = sim
    out["sim_wall_s_1000x10"] = sim["wall_s"] if sim and sim["devices"] == 1000 and sim["rounds"] == 10 else None
    if runs:
        small, big = runs[0], runs[-1]
        model_mb = big[MODEL_MB_KEY]
        out["cloud_rss_growth_mb"] = round(big["cloud_peak_rss_mb"] - small["cloud_peak_rss_mb"], 1)
        out["cloud_rss_growth_models"] = round(out["cloud_rss_growth_mb"] / model_mb, 1) if model_mb else None
        out["complete"] = all(p == r["devices"] for r in runs + bridged for p in r["participants"])
    return out


def row(r: dict[str, Any]) -> str:
    """One fleet's figures for the table."""
    text = (f"round {fmt(r['round_overhead_s'], 's', 3)}, cloud {fmt(r['cloud_cpu_s_per_round'], 'CPU s/round', 3)} "
            f"{fmt(r['cloud_peak_rss_mb'], 'MB')}, edges {fmt(r['edge_cpu_s_per_round'], 'CPU s/round', 3)} "
            f"{fmt(r['edge_peak_rss_mb'], 'MB')}, broker {fmt(r['broker_cpu_s_per_round'], 'CPU s/round', 3)}")
    by_broker = r.get("brokers_cpu_s_per_round") or {}
    if len(by_broker) > 1:
        text += " (" + ", ".join(f"{k} {fmt(v, '', 3)}" for k, v in by_broker.items()) + ")"
    text += (f", virtual devices {fmt(r.get('virtual_cpu_s_per_round'), 'CPU s/round', 3)} "
             f"{fmt(r['virtual_peak_rss_mb'], 'MB')}, {fmt(r['messages_per_s'], 'msg/s', 0)}, "
             f"online in {fmt(r['online_s'], 's', 1)}")
    for site, kb in (r.get("bridge_kb_per_round") or {}).items():
        if kb is None:
            text += f", bridge {site} not measured (no ss)"
            continue
        text += f", bridge {site} {fmt(kb['up'], 'KB', 1)} up {fmt(kb['down'], 'KB', 1)} down per round"
    return text


def run(args: argparse.Namespace) -> int:
    import torch

    from mqttfl.tools.broker import BrokerError
    from mqttfl.tools.sites import BRIDGE_CONF, loopback_bridge
    from mqttfl.tools.testbed import RunFailed

    torch.set_num_threads(1)
    out_path = out_dir(args)
    if args.bridge_conf is not None and args.sites == 1:
        print("mqttfl bench scale: --bridge-conf needs --sites 2", file=sys.stderr)
        return 2
    if args.sites > 1:
        try:  # a bridge file that cannot be used is refused before any fleet starts
            loopback_bridge(1883, conf=args.bridge_conf)
        except (BrokerError, OSError) as e:
            print(f"mqttfl bench scale: --bridge-conf: {e}", file=sys.stderr)
            return 2
    try:
        with work_dir(args, "scale") as root:
            res = measure(args, root)
    except RunFailed as e:
        print(f"mqttfl bench scale: {e}", file=sys.stderr)
        return 1
    plot_path = plot(res, out_path / "scale.png")
    summary = summarise(res)
    out = {**summary, "runs": res["virtual"], "plot": str(plot_path), "small": bool(args.small),
           "resume_every": args.resume_every, "loadavg": [round(x, 2) for x in os.getloadavg()],
           "bridge_conf": str(args.bridge_conf or BRIDGE_CONF) if args.sites > 1 else None}
    rows = [(f"N={r['devices']}", row(r)) for r in res["virtual"]]
    rows += [(f"N={r['devices']}, 2 sites", row(r)) for r in res.get("bridged") or []]
    sim = res.get("sim")
    if sim:
        rows.append((f"sim {sim['devices']}x{sim['rounds']}", f"{fmt(sim['wall_s'], 's')} wall, accuracy "
                     f"{sim['final_accuracy']}, {sim['outcome']}"))
    for k in ("cloud_rss_growth_mb", "cloud_rss_growth_models", "complete", "sim_wall_s_1000x10", "loadavg",
              "bridge_conf"):
        rows.append((k, str(out.get(k))))
    rows.append(("plot", str(plot_path)))
    rows.append(("results", str(save_results(out_path, out))))
    emit(out, rows, args.json)
    return 0
