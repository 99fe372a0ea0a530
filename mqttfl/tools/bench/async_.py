"""``mqttfl bench async``: synchronous FedAvg vs asynchronous group aggregation on a heterogeneous fleet.

8 devices on 4 edges (2 each); dev7 and dev8 emulate 4x slower boards (``slowdown = 4``: each device sleeps
3x its own compute time after every forward/backward, so its compute takes 4x as long). Every device also
spends an emulated board compute time per mini-batch (``--step-delay``, default 50 ms, 200 ms on the slow
ones): eight devices share this machine's two cores, and without it the shared CPU — not the boards — would
set every device's pace, which is not the situation asynchronous aggregation is for. Devices train the whole
model locally by default (cut = number of blocks), so that the slowdown covers all of a device's compute;
``--split`` trains split at cut 1, where the edge's share of the compute is not slowed. Every strategy gets
the same fleet, data split, model (the CNN on 8x8 digits, local SGD lr 0.05, batch 32) and the same wall-time
budget. Time is counted from the end of the first synchronous round with everyone (round 0 in sync mode, the
first profiling round in async mode), so that process start-up and torch warm-up, equal for all and noisy on a
shared machine, are left out; async mode's second profiling round is counted.

Reported per strategy: time to the target test accuracy (null when not reached within the budget), the final
accuracy (the last one measured within the budget), the best accuracy and the number of rounds/versions.
``time_ratio`` = ecofl time-to-target / sync time-to-target; ``acc_delta`` = ecofl final − sync final.
Writes ``results.json`` and accuracy vs wall time per strategy (``async_accuracy.png`` with matplotlib, else a
hand-written ``async_accuracy.svg``) into ``--out``. A failed run (``run_failed``) stops the bench with exit 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results, work_dir

DEVICES = {f"dev{i}": f"edge{(i - 1) // 2 + 1}" for i in range(1, 9)}
SLOW = ("dev7", "dev8")
COLORS = {"sync": "#444444", "ecofl": "#d62728", "fedasync": "#1f77b4", "fedbuff": "#2ca02c", "fedat": "#9467bd"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--strategies", default="sync,ecofl", help="comma list of sync, ecofl, fedasync, fedbuff, fedat")
    p.add_argument("--budget", type=float, default=90.0, help="wall-time budget per strategy, seconds")
    p.add_argument("--target", type=float, default=0.9, help="target test accuracy")
    p.add_argument("--slowdown", type=float, default=4.0, help="compute slowdown of the slow devices")
    p.add_argument("--split", action="store_true",
                   help="split training (cut 1): the edge's share of compute is not slowed down; default: devices "
                        "train the whole model locally, so the slowdown applies to all of a device's compute")
    p.add_argument("--alpha", type=float, default=0.6, help="async mixing weight")
    p.add_argument("--step-delay", type=float, default=0.05,
                   help="emulated board compute per mini-batch, seconds (x slowdown on the slow devices): eight "
                        "devices share this machine's two cores, so without it the shared CPU, not the boards, "
                        "would set everyone's pace; 0 = real compute only")
    p.add_argument("--epochs", type=int, default=1,
                   help="local epochs per round: more makes device compute, rather than messaging, dominate a round")
    add_out_argument(p, "async")
    p.add_argument("--workdir", help="keep configs, logs and state here (default: a temp dir, removed)")


def _spec(strategy: str, args: argparse.Namespace, fleet: str) -> Any:
    from mqttfl.tools.testbed import FleetSpec

    cloud: dict[str, Any] = {"lr": 0.05, "batch_size": 32, "run": f"bench-{strategy}", "deadline_s": 300.0,
                             "epochs": args.epochs}
    if strategy == "sync":
        cloud.update(rounds=100_000)
    else:
        cloud.update(mode="async", strategy=strategy, num_groups=3, max_versions=100_000, alpha=args.alpha,
                     group_deadline_s=60.0, fedbuff_k=3, regroup_every=10)
    from mqttfl.ml.models import schema_of
    from mqttfl.protocol.schema import ModelRef

    cut = 1 if args.split else schema_of(ModelRef("cnn", (1, 8, 8), 10)).n_blocks
    extra = {d: {"cut": cut, "step_delay_s": args.step_delay,
                 **({"slowdown": float(args.slowdown)} if d in SLOW else {})} for d in DEVICES}
    return FleetSpec(devices=dict(DEVICES), model="cnn", input_shape=(1, 8, 8), cloud=cloud, fleet=fleet,
                     device_extra=extra)


def run_one(strategy: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from mqttfl.tools.testbed import Testbed

    curve: list[tuple[float, float]] = []
    t0: list[float] = []
    kind = "round" if strategy == "sync" else "version"
    with Testbed(root / strategy, _spec(strategy, args, f"bench-async-{strategy}")) as tb:
        tb.prepare()
        tb.start()

        def on(m: Any) -> None:
            d = m.data or {}
            if m.kind == "metrics" and d.get("kind") == kind and d.get("accuracy") is not None:
                if not t0:
                    t0.append(m.received)
                curve.append((m.received - t0[0], float(d["accuracy"])))

        tb.wait(lambda m: bool(t0), 600, on_message=on, stop_on_run_failed=True)
        try:
            tb.wait(lambda m: time.monotonic() - t0[0] >= args.budget, args.budget + 5, on_message=on,
                    stop_on_run_failed=True)
        except TimeoutError:
            pass
    curve = [(t, a) for t, a in curve if t <= args.budget]
    reached = next((t for t, a in curve if a >= args.target), None)
    return {"time_to_target_s": None if reached is None else round(reached, 2),
            "final_accuracy": curve[-1][1] if curve else None,
            "best_accuracy": max((a for _, a in curve), default=None),
            "updates": len(curve), "curve": [[round(t, 2), a] for t, a in curve]}


def plot(results: dict[str, dict[str, Any]], path: Path, target: float) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(results, path.with_suffix(".svg"), target)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        xs, ys = [p[0] for p in r["curve"]], [p[1] for p in r["curve"]]
        ax.step(xs, ys, where="post", label=name, color=COLORS.get(name))
    ax.axhline(target, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("wall time since the first round, s")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _svg(results: dict[str, dict[str, Any]], path: Path, target: float) -> Path:
    w, h, m = 640, 360, 40
    tmax = max((p[0] for r in results.values() for p in r["curve"]), default=1.0) or 1.0

    def xy(t: float, a: float) -> str:
        return f"{m + (w - 2 * m) * t / tmax:.1f},{h - m - (h - 2 * m) * a:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<polyline points="{xy(0, target)} {xy(tmax, target)}" stroke="gray" stroke-dasharray="4" fill="none"/>',
             f'<text x="{m}" y="{h - 8}" font-size="12">wall time since the first round (0..{tmax:.0f} s)</text>',
             f'<text x="4" y="{m - 10}" font-size="12">test accuracy (0..1)</text>']
    for i, (name, r) in enumerate(results.items()):
        pts = " ".join(xy(t, a) for t, a in r["curve"])
        color = COLORS.get(name, "black")
        parts.append(f'<polyline points="{pts}" stroke="{color}" fill="none" stroke-width="1.5"/>')
        parts.append(f'<text x="{w - 120}" y="{m + 16 * i}" font-size="12" fill="{color}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


def run(args: argparse.Namespace) -> int:
    from mqttfl.tools.testbed import RunFailed

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    out_path = out_dir(args)
    results: dict[str, dict[str, Any]] = {}
    try:
        with work_dir(args, "async") as root:
            for s in strategies:
                results[s] = run_one(s, args, root)
    except RunFailed as e:
        print(f"mqttfl bench async: {e}", file=sys.stderr)
        return 1
    plot_path = plot(results, out_path / "async_accuracy.png", args.target)
    sync, eco = results.get("sync", {}), results.get("ecofl", {})
    ratio = None
    if sync.get("time_to_target_s") and eco.get("time_to_target_s") is not None:
        ratio = round(eco["time_to_target_s"] / sync["time_to_target_s"], 3)
    delta = None
    if sync.get("final_accuracy") is not None and eco.get("final_accuracy") is not None:
        delta = round(eco["final_accuracy"] - sync["final_accuracy"], 4)
    out = {"time_ratio": ratio, "acc_delta": delta, "target": args.target, "budget_s": args.budget,
           "devices": len(DEVICES), "slow_devices": list(SLOW), "slowdown": args.slowdown, "model": "cnn",
           "training": "split" if args.split else "local",
           "plot": str(plot_path),
           "strategies": {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in results.items()},
           "curves": {k: v["curve"] for k, v in results.items()}}
    rows = [("time_ratio (ecofl/sync time to target)", fmt(ratio)),
            ("acc_delta (ecofl - sync final)", fmt(delta, "", 4))]
    for k, v in results.items():
        rows.append((f"{k}: time to {args.target}", fmt(v["time_to_target_s"], "s")))
        rows.append((f"{k}: final / best accuracy", f"{v['final_accuracy']} / {v['best_accuracy']}"))
        rows.append((f"{k}: rounds or versions", str(v["updates"])))
    rows.append(("plot", str(plot_path)))
    rows.append(("results", str(save_results(out_path, out))))
    emit(out, rows, args.json)
    return 0
