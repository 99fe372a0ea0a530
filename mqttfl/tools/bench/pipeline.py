"""``mqttfl bench pipeline``: Eco-FL pipelines across a device's helpers, measured in one run through the real broker
with every agent a real process.

One fleet: a managed Mosquitto, the cloud, an edge, the device ``dev1`` with its data and two helpers ``h1``, ``h2``
(device agents with ``[device] serve = ["dev1"]``), the 12-block ``chain12`` model on the digits. Each
measurement is a run of its own (``ctl cloud new-run``, then ``set`` and ``chain`` as an operator would), so each
starts from the model's initial weights and the device profiles its stages afresh:

1. throughput (samples/s over the round's ``T_local``) of the device alone (cut = 12: local training) and of
   S = 2, 3, 4 equal stages (cut 6 without helpers; then ``partition = "equal"`` over the device, its helpers
   and the edge);
2. three stages of speeds 1x, 2x, 4x (device, helper, edge: ``emulate slowdown`` 4, 2, 1): the equal split vs
   the planner's (``partition = "dp"``);
3. three equal stages with rebalancing on, two epochs; at mini-batch ``--slow-at`` the helper is slowed 3x
   (``ctl h1 emulate slowdown=3``): throughput before, while slowed, and after the device re-planned, against
   the planner's prediction for the new speeds (``rebalance_recovery`` = after / predicted);
4. four stages under 1F1B and under GPipe: the most micro-batches each stage stashed, against K_s.

Every run's global model is compared with the unsplit model trained on the same batches in this process
(``max_abs_diff``, the largest over all runs).

Emulated speeds: the agents share two cores here, so compute is emulated, not measured: every block of the model
costs ``--block-ms`` per mini-batch forward and twice that backward, slept by the backend (``[device]
block_ms``, ``[edge] block_ms``) and multiplied by each node's ``slowdown`` (docs/operations.md, "Emulated
devices"). The real compute of the 64-wide blocks is well under a millisecond, so stages run at the speeds
configured rather than at whatever share of the CPU they get. Messaging is real: the broker, the codec, the
transport. Writes ``results.json`` and ``pipeline.png`` (matplotlib) or ``pipeline.svg`` into ``--out``; a failed
run stops the bench with exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mqttfl.ml.data import BatchOrder, Dataset, load_digits
from mqttfl.ml.models import build_model, model_state
from mqttfl.ml.stage import LocalTrainer, make_optimizer
from mqttfl.protocol.plan import data_seed
from mqttfl.protocol.schedule import stash_bound
from mqttfl.runtime.persist import load_state
from mqttfl.runtime.transport import Inbound
from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results, work_dir
from mqttfl.tools.testbed import FleetSpec, RunFailed, Testbed, make_shards

MODEL, SHAPE, BLOCKS, SEED = "chain12", (64,), 12, 3
NODES = ("dev1", "h1", "h2", "edge1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--block-ms", type=float, default=40.0,
                   help="emulated ms of one block's forward over a mini-batch (backward twice that)")
    p.add_argument("--micro", type=int, default=8, help="micro-batches per mini-batch (M)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="mini-batches per epoch of the device's shard")
    p.add_argument("--slow-at", type=int, default=6, help="rebalance run: mini-batch at which the helper slows")
    p.add_argument("--slow", type=float, default=3.0, help="rebalance run: the helper's slow-down")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--small", action="store_true", help="a quick check: 4 ms blocks, 6 mini-batches, M = 4")
    p.add_argument("--workdir", default="", help="where broker, configs and logs go (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run")
    add_out_argument(p, "pipeline")


def _replay(args: argparse.Namespace, shard: Dataset, epochs: int) -> dict[str, np.ndarray]:
    """The device's batches of the run trained unsplit here, from the model's initial weights."""
    model = build_model(MODEL, input_shape=SHAPE, seed=SEED)
    trainer = LocalTrainer(model, make_optimizer(model.parameters(), lr=args.lr, momentum=0.9))
    order = BatchOrder(len(shard), args.batch_size, seed=data_seed(SEED, "dev1"))
    for e in range(epochs):
        for idx in order.epoch_batches(e):
            trainer.train_batch(torch.from_numpy(shard.x[idx]), torch.from_numpy(shard.y[idx]),
                                micro_batches=min(args.micro, len(idx)))
    return model_state(model)


def _diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


class Bench:
    def __init__(self, args: argparse.Namespace, tb: Testbed, root: Path, shard: Dataset) -> None:
        self.args, self.tb, self.root, self.shard = args, tb, root, shard
        self.diffs: dict[str, float] = {}
        self.speeds = dict.fromkeys(NODES, 1.0)

    def _ok(self, node: str, cmd: str, **kw: Any) -> Any:
        reply = self.tb.ctl(node, cmd, timeout=60, **kw)
        if not reply.get("ok"):
            raise RuntimeError(f"{node} refused {cmd} {kw}: {reply}")
        return reply.get("result")

    def speed(self, **speeds: float) -> None:
        for node in NODES:
            want = speeds.get(node, 1.0)
            if self.speeds[node] != want:
                self._ok(node, "emulate", slowdown=want)
                self.speeds[node] = want

    def run(self, name: str, *, helpers: list[str], cut: int = -1, partition: str = "equal",
            schedule: str = "1f1b", epochs: int = 1, rebalance: float = 0.0, slow: tuple[str, int, float] | None = None
            ) -> dict[str, Any]:
        """One run of one round; returns its device report, pipeline layouts and per-mini-batch metrics."""
        tb, args = self.tb, self.args
        run_id = self._ok("cloud", "new-run")["run"]
        self._ok("cloud", "set", cut=cut, partition=partition, pipeline_schedule=schedule, epochs=epochs,
                 rebalance_threshold=rebalance, micro_batches=args.micro, batch_size=args.batch_size, rounds=1)
        self._ok("cloud", "chain", device="dev1", helpers=helpers)
        slowed: list[int] = []

        def slow_down(m: Inbound) -> None:
            d = m.data or {}
            if slow is not None and not slowed and m.kind == "metrics" and d.get("kind") == "pipeline_step" \
                    and d.get("run") == run_id and d.get("step", 0) >= slow[1]:
                slowed.append(int(d["step"]))
                tb.send_ctl(slow[0], "emulate", slowdown=slow[2])
                self.speeds[slow[0]] = slow[2]

        self._ok("cloud", "start")
        msg = tb.wait(lambda x: x.kind == "metrics" and (x.data or {}).get("kind") == "round"
                      and (x.data or {}).get("run") == run_id, args.timeout, on_message=slow_down,
                      stop_on_run_failed=True)
        tb.wait_event("run_complete", 60, run=run_id)
        assert msg.data is not None
        report = msg.data["devices"]["dev1"]
        mine = [m.data for m in tb.inbox if m.kind == "metrics" and m.src == "dev1" and m.data
                and m.data.get("run") == run_id]
        layouts = [d for d in mine if d.get("kind") == "pipeline"]
        steps = [d for d in mine if d.get("kind") == "pipeline_step"]
        state = load_state(self.root / "state" / "cloud" / "cloud.state")
        if state is None:
            raise RuntimeError("the cloud persisted nothing")
        self.diffs[name] = _diff(state["global"], _replay(args, self.shard, epochs))
        return {"report": report, "layouts": layouts, "steps": steps, "slowed_at": slowed[0] if slowed else None,
                "samples_s": report["seen"] / report["T_local"]}


def _batch_s(steps: list[dict[str, Any]], first: int, last: int) -> float:
    t = {m["step"]: m["elapsed_s"] for m in steps}
    return (t[last] - t[first]) / max(last - first, 1)


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    if args.small:
        args.block_ms, args.batches, args.micro, args.slow_at = 4.0, 6, 4, 2
    torch.set_num_threads(1)
    train, test = load_digits(SHAPE)
    train = train.subset(np.arange(min(len(train), args.batches * args.batch_size)))
    emulated = {"block_ms": args.block_ms}
    spec = FleetSpec(devices={"dev1": "edge1"}, model=MODEL, input_shape=SHAPE, fleet="benchpipe",
                     cloud={"rounds": 1, "autostart": False, "batch_size": args.batch_size, "lr": args.lr,
                            "momentum": 0.9, "seed": SEED, "deadline_s": float(args.timeout),
                            "micro_batches": args.micro},
                     helpers={"h1": ("dev1",), "h2": ("dev1",)}, device_extra={"dev1": dict(emulated)},
                     edge_extra=dict(emulated), helper_extra={"h1": dict(emulated), "h2": dict(emulated)})
    shard = make_shards(spec, train)["dev1"]
    with Testbed(root, spec, data=(train, test)) as tb:
        tb.prepare()
        tb.start()
        tb.wait_online(["cloud", *NODES], timeout=120)
        b = Bench(args, tb, root, shard)
        b.run("warm-up", helpers=["h1", "h2"])  # every node's first training pays torch's first-use costs
        b.diffs.clear()
        alone = b.run("alone", helpers=[], cut=BLOCKS)
        s2 = b.run("s2", helpers=[], cut=BLOCKS // 2)
        s3 = b.run("s3", helpers=["h1"])
        s4 = b.run("s4", helpers=["h1", "h2"])
        gpipe = b.run("s4_gpipe", helpers=["h1", "h2"], schedule="gpipe")
        b.speed(dev1=4.0, h1=2.0, edge1=1.0)  # stage speeds 1x, 2x, 4x
        equal = b.run("speeds_equal", helpers=["h1"])
        dp = b.run("speeds_dp", helpers=["h1"], partition="dp")
        b.speed()
        reb = b.run("rebalance", helpers=["h1"], partition="dp", epochs=2, rebalance=0.15,
                    slow=("h1", args.slow_at, args.slow))
        b.speed()
    base = alone["samples_s"]
    s = args.micro
    res: dict[str, Any] = {
        "model": MODEL, "blocks": BLOCKS, "block_ms": args.block_ms, "micro_batches": s, "batch_size": args.batch_size,
        "batches": args.batches,
        "throughput": {k: round(v["samples_s"], 3) for k, v in (("alone", alone), ("s2", s2), ("s3", s3), ("s4", s4))},
        "speedup_s2": round(s2["samples_s"] / base, 4), "speedup_s3": round(s3["samples_s"] / base, 4),
        "speedup_s4": round(s4["samples_s"] / base, 4),
        "layouts": {k: v["layouts"][0]["blocks"] if v["layouts"] else None
                    for k, v in (("s3", s3), ("s4", s4), ("speeds_equal", equal), ("speeds_dp", dp))},
        "predicted_samples_s": {k: v["layouts"][0]["predicted_samples_s"]
                                for k, v in (("s3", s3), ("s4", s4), ("speeds_equal", equal), ("speeds_dp", dp))
                                if v["layouts"]},
        "speeds": {"dev1": 1.0, "h1": 2.0, "edge1": 4.0},
        "speeds_samples_s": {"equal": round(equal["samples_s"], 3), "dp": round(dp["samples_s"], 3)},
        "dp_vs_equal": round(dp["samples_s"] / equal["samples_s"], 4),
        "stash_max": {name: [max(m["stash"][k] for m in run["steps"]) for k in range(4)]
                      for name, run in (("1f1b", s4), ("gpipe", gpipe))},
        "stash_bound": {"1f1b": [stash_bound(4, s, k) for k in range(4)],
                        "gpipe": [stash_bound(4, s, k, "gpipe") for k in range(3)] + [1]},
        "max_abs_diff": max(b.diffs.values()), "max_abs_diff_by_run": b.diffs,
        "cpus": os.cpu_count(), "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    res["stash_within_bound"] = all(m <= k for m, k in zip(res["stash_max"]["1f1b"], res["stash_bound"]["1f1b"],
                                                           strict=True))
    res["rebalance"] = _rebalance(reb, args)
    res["rebalance_recovery"] = res["rebalance"].get("recovery")
    return res


def _rebalance(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    steps, layouts = run["steps"], run["layouts"]
    moves = [m for m in layouts[1:] if str(m.get("reason", "")).startswith("slowest stage")]
    slow, last = run["slowed_at"], max(m["step"] for m in steps)
    out: dict[str, Any] = {"slowed_at": slow, "blocks_before": layouts[0]["blocks"] if layouts else None}
    if slow is None or not moves:
        return {**out, "replanned": False}
    move = moves[0]
    at = move["step"]
    per = args.batch_size
    before = per / _batch_s(steps, 1, slow)
    during = per / _batch_s(steps, slow + 1, at) if at > slow + 1 else None
    after = per / _batch_s(steps, at, last)
    predicted = move["predicted_samples_s"]
    return {**out, "replanned": True, "replanned_at": at, "blocks_after": move["blocks"],
            "before_samples_s": round(before, 3), "during_samples_s": None if during is None else round(during, 3),
            "after_samples_s": round(after, 3), "predicted_samples_s": predicted,
            "recovery": round(after / predicted, 4) if predicted else None,
            "curve": [[m["step"], m["elapsed_s"]] for m in steps]}


# ------------------------------------------------------------------------------------------------ plot


def plot(res: dict[str, Any], out: Path) -> Path:
    bars = [("samples/s: alone, S=2, 3, 4", [(k, float(v)) for k, v in res["throughput"].items()]),
            ("speeds 1x/2x/4x: equal vs DP", [(k, float(v)) for k, v in res["speeds_samples_s"].items()]),
            ("peak stash per stage: 1F1B, GPipe", [(f"{n} s{k}", float(v)) for n in ("1f1b", "gpipe")
                                                   for k, v in enumerate(res["stash_max"][n])])]
    reb = res.get("rebalance", {})
    curve = reb.get("curve", [])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(bars, curve, reb, out.with_suffix(".svg"))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (title, rows) in zip(axes, bars, strict=False):
        ax.bar(range(len(rows)), [r[1] for r in rows])
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=45)
        ax.set_title(title, fontsize=9)
    ax = axes[3]
    ax.plot([c[1] for c in curve], [c[0] for c in curve], marker=".")
    if reb.get("slowed_at") is not None:
        ax.axhline(reb["slowed_at"], color="red", linestyle=":", label="helper slowed 3x")
    if reb.get("replanned_at") is not None:
        ax.axhline(reb["replanned_at"], color="green", linestyle="--", label="re-planned")
    ax.set_xlabel("seconds")
    ax.set_ylabel("mini-batches done")
    ax.set_title("rebalancing", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _svg(bars: list[tuple[str, list[tuple[str, float]]]], curve: list[list[float]], reb: dict[str, Any],
         path: Path) -> Path:
    w, h, m = 330, 300, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * 4}" height="{h}" font-size="11">',
             f'<rect width="{w * 4}" height="{h}" fill="white"/>']
    for i, (title, rows) in enumerate(bars):
        x0 = i * w
        parts.append(f'<text x="{x0 + 10}" y="16">{title}</text>')
        top = max((r[1] for r in rows), default=1.0) or 1.0
        bw = (w - 2 * m) / max(len(rows), 1)
        for k, (label, v) in enumerate(rows):
            bh = (h - 2 * m - 30) * v / top
            bx = x0 + m + k * bw
            parts.append(f'<rect x="{bx:.1f}" y="{h - m - bh:.1f}" width="{bw - 4:.1f}" height="{bh:.1f}" '
                         f'fill="#1f77b4"/>')
            parts.append(f'<text x="{bx:.1f}" y="{h - m - bh - 3:.1f}" font-size="8">{v:.3g}</text>')
            parts.append(f'<text x="{bx:.1f}" y="{h - m + 12 + 10 * (k % 2)}" font-size="8">{label}</text>')
    x0 = 3 * w
    parts.append(f'<text x="{x0 + 10}" y="16">rebalancing: mini-batches done vs seconds</text>')
    if curve:
        tmax = max(c[1] for c in curve) or 1.0
        smax = max(c[0] for c in curve) or 1.0

        def xy(step: float, t: float) -> str:
            return f"{x0 + m + (w - 2 * m) * t / tmax:.1f},{h - m - (h - 2 * m) * step / smax:.1f}"

        parts.append(f'<polyline points="{" ".join(xy(c[0], c[1]) for c in curve)}" stroke="#1f77b4" fill="none"/>')
        for key, color in (("slowed_at", "#d62728"), ("replanned_at", "#2ca02c")):
            if reb.get(key) is not None:
                y = h - m - (h - 2 * m) * reb[key] / smax
                parts.append(f'<line x1="{x0 + m}" x2="{x0 + w - m}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                             f'stroke-dasharray="4"/>')
                parts.append(f'<text x="{x0 + w - m - 70}" y="{y - 3:.1f}" fill="{color}" font-size="9">{key}</text>')
        parts.append(f'<text x="{x0 + m}" y="{h - 8}">0 .. {tmax:.1f} s</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


# ------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    out = out_dir(args)
    try:
        with work_dir(args, "pipeline") as root:
            res = measure(args, root)
    except RunFailed as e:
        print(f"mqttfl bench pipeline: {e}", file=sys.stderr)
        return 1
    res["plot"] = str(plot(res, out / "pipeline.png"))
    reb = res["rebalance"]
    thr = res["throughput"]
    rows = [
        ("model / emulation", f"{res['model']} ({res['blocks']} blocks), {res['block_ms']} ms per block and "
                              f"mini-batch forward, M = {res['micro_batches']}, batch {res['batch_size']}"),
        ("samples/s alone / S=2 / S=3 / S=4", " / ".join(fmt(thr[k], "", 1) for k in ("alone", "s2", "s3", "s4"))),
        ("speedup S=2 / S=3 / S=4", " / ".join(fmt(res[f"speedup_s{k}"], "x", 2) for k in (2, 3, 4))),
        ("speeds 1x/2x/4x: equal / DP", f"{fmt(res['speeds_samples_s']['equal'], '', 1)} / "
                                        f"{fmt(res['speeds_samples_s']['dp'], '', 1)} samples/s "
                                        f"(blocks {res['layouts']['speeds_equal']} / {res['layouts']['speeds_dp']})"),
        ("dp_vs_equal", fmt(res["dp_vs_equal"], "x", 3)),
        ("rebalance: before / during / after / predicted",
         f"{reb.get('before_samples_s')} / {reb.get('during_samples_s')} / {reb.get('after_samples_s')} / "
         f"{reb.get('predicted_samples_s')} samples/s (blocks {reb.get('blocks_before')} -> "
         f"{reb.get('blocks_after')} at mini-batch {reb.get('replanned_at')})"),
        ("rebalance_recovery", fmt(res["rebalance_recovery"], "", 3)),
        ("stash per stage 1F1B / bound", f"{res['stash_max']['1f1b']} / {res['stash_bound']['1f1b']}"),
        ("stash per stage GPipe", str(res["stash_max"]["gpipe"])),
        ("max_abs_diff (all runs)", f"{res['max_abs_diff']:.2e}"),
        ("load average", str(res["loadavg"])),
        ("plot", res["plot"]),
        ("results", str(save_results(out, res))),
    ]
    emit(res, rows, args.json)
    return 0
