"""``mqttfl demo``: the FedFly testbed on one machine.

A managed Mosquitto, one cloud, two edges and four devices, each agent its own process, training VGG-5 cut
after the second conv block (SGD lr 0.01, momentum 0.9, batch 100 in 4 micro-batches) on scikit-learn's digits
resized to 3x32x32. Progress comes from the cloud's metrics and events, exactly what ``mqttfl monitor`` shows; one
device moves to the other edge mid-training (FedFly migration) unless ``--no-migration``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mqttfl.runtime.transport import Inbound
from mqttfl.tools.testbed import FleetSpec, RunFailed, Testbed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--model", default="vgg5", choices=["vgg5", "cnn", "mlp"])
    p.add_argument("--micro-batches", type=int, default=4,
                   help="micro-batches per mini-batch (default 4: the device computes while its activations travel, "
                        "and holds at most 3 of 4 micro-batches' activations, within 350 MiB for VGG-5 at batch 100)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--data", default="digits", help="digits | synthetic | cifar10:PATH (a local CIFAR-10 copy)")
    p.add_argument("--no-migration", action="store_true", help="do not move a device mid-training")
    p.add_argument("--workdir", help="keep configs, logs and state here (default: a temp dir, removed)")
    p.add_argument("--timeout", type=float, default=900.0)


def _input_shape(model: str) -> tuple[int, ...]:
    return {"vgg5": (3, 32, 32), "cnn": (1, 28, 28), "mlp": (64,)}[model]


def load_data(spec: str, shape: tuple[int, ...]) -> Any:
    from mqttfl.ml.data import load_digits, synthetic_images

    if spec == "digits":
        return load_digits(shape)
    if spec == "synthetic":
        img = (shape[0], shape[1], shape[2])  # synthetic data are images
        return synthetic_images(2000, img, seed=1), synthetic_images(500, img, seed=2)
    if spec.startswith("cifar10:"):
        from mqttfl.ml.cifar import load_cifar10

        return load_cifar10(spec.split(":", 1)[1])
    raise SystemExit(f"unknown --data {spec!r}")


class Progress:
    """Prints what an operator would watch: rounds, accuracy, events."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.migrations: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def __call__(self, m: Inbound) -> None:
        d = m.data or {}
        if m.kind == "metrics" and d.get("kind") == "round":
            acc = d.get("accuracy")
            self.say(f"round {d['round']:>3}  accuracy {acc if acc is None else f'{acc:.4f}'}  "
                     f"loss {d.get('loss')}  {d.get('participants')} devices  {d.get('round_s', 0):.1f}s")
        elif m.kind == "metrics" and d.get("kind") == "version":
            self.say(f"version {d.get('version'):>3}  group {d.get('group')}  staleness {d.get('staleness')}  "
                     f"accuracy {d.get('accuracy')}")
        elif m.kind == "metrics" and d.get("kind") == "groups":
            self.say(f"groups {d.get('groups')}")
        elif m.kind == "event" and d.get("event") in ("migration_done", "migration_failed", "migration_fallback"):
            self.migrations.append(d)
            self.say(f"{d['event']}: {d.get('device')} {d.get('source')} -> {d.get('destination')} "
                     f"pause {d.get('pause_ms')} ms, {d.get('checkpoint_bytes')} checkpoint bytes")
        elif m.kind == "event" and d.get("level") in ("warning", "error"):
            self.say(f"{m.src}: {d.get('event')} {d.get('reason', '')} {d.get('detail', '')}".rstrip())


def run(args: argparse.Namespace) -> int:
    shape = _input_shape(args.model)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mqttfl-demo-"))
    progress = Progress(quiet=args.json)
    cloud: dict[str, Any] = {"rounds": args.rounds, "micro_batches": args.micro_batches, "epochs": args.epochs,
                             "deadline_s": 300.0, "quorum": 0.75,
                             # A fresh run id each time: a reused --workdir starts a new run, not the finished one.
                             "run": f"demo-{int(time.time())}"}
    if args.mode == "async":
        cloud.update(mode="async", strategy="ecofl", max_versions=args.rounds * 3)
    spec = FleetSpec(model=args.model, input_shape=shape, cloud=cloud)
    progress.say(f"preparing data and configs in {workdir}")
    tb = Testbed(workdir, spec, data=load_data(args.data, shape))
    summary: dict[str, Any] = {}
    t0 = time.monotonic()  # wall time counts the fleet's start-up too
    try:
        tb.prepare()
        progress.say(f"broker on 127.0.0.1:{tb.broker.port}; starting cloud, edges {spec.edges}, "
                     f"devices {sorted(spec.devices)}")
        # The cloud and the edges first, as a deployment has them running when boards join: a device's cold start
        # is then its own (seven processes importing torch at once on a small machine measure the machine).
        tb.start(["cloud", *spec.edges])
        tb.wait_online(["cloud", *spec.edges], timeout=120)
        tb.start(sorted(spec.devices))
        summary = follow(tb, args, progress, started=t0)
    finally:
        tb.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return exit_status(summary)


def follow(tb: Testbed, args: argparse.Namespace, progress: Progress, *, started: float | None = None
           ) -> dict[str, Any]:
    """Watch the fleet's run to its end, moving dev1 to edge2 mid-training, and summarise it. A failed run ends
    the watch as soon as the cloud reports it (``run_failed`` in the summary), not at ``args.timeout``."""
    t0 = time.monotonic() if started is None else started
    state = {"moved": args.no_migration or args.mode == "async"}

    def on_message(m: Inbound) -> None:
        progress(m)
        d = m.data or {}
        # Move dev1 to edge2 while it trains round 2 (FedFly: a device changes edge mid-training); the
        # move happens at its next mini-batch boundary.
        if not state["moved"] and m.kind == "status" and m.src == "dev1" and d.get("state") == "training" \
                and d.get("round") == 2:
            state["moved"] = True
            progress.say("moving dev1 from edge1 to edge2 (direct edge-to-edge transfer)")
            tb.send_ctl("dev1", "move", edge="edge2")

    failed: dict[str, Any] | None = None
    try:
        done = tb.wait_event("run_complete", args.timeout, on_message=on_message)
    except RunFailed as e:
        done, failed = {}, e.event
        progress.say(f"run failed: {failed.get('reason')}")
    wall = time.monotonic() - t0
    rounds = tb.round_metrics()
    versions = [m.data for m in tb.inbox if m.kind == "metrics" and m.data and m.data.get("kind") == "version"]
    steps = rounds if args.mode == "sync" else versions
    final = steps[-1] if steps else {}
    final_acc = done.get("accuracy", final.get("accuracy"))
    per_device = [dv for r in steps for dv in (r.get("devices") or {}).values() if isinstance(dv, dict)]
    lean = device_footprint(tb, steps)
    return {
        "mode": args.mode, "model": args.model, "data": args.data, "rounds": len(steps),
        "final_accuracy": final_acc, "wall_s": round(wall, 2),
        "run_failed": None if failed is None else str(failed.get("reason")),
        "bytes_total": sum(int(dv.get("bytes_up", 0)) + int(dv.get("bytes_down", 0)) for dv in per_device),
        "device_peak_rss_mb": max((d["peak_rss_mb"] for d in lean.values()), default=0),
        "device_cold_start_s": max((d["cold_start_s"] or 0 for d in lean.values()), default=None),
        "devices": lean,
        "migrations": progress.migrations,
        "history": [{"step": r.get("round" if args.mode == "sync" else "version"), "accuracy": r.get("accuracy"),
                     "seconds": r.get("round_s")} for r in steps],
    }


def device_footprint(tb: Testbed, steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per device: cold start (process start to online, from its agent metrics) and peak RSS (the largest its
    round reports and agent metrics gave)."""
    out: dict[str, dict[str, Any]] = {d: {"cold_start_s": None, "peak_rss_mb": 0.0} for d in sorted(tb.spec.devices)}
    for m in tb.inbox:
        d = m.data or {}
        if m.kind == "metrics" and d.get("kind") == "agent" and m.src in out:
            if d.get("cold_start_s") is not None:
                out[m.src]["cold_start_s"] = d["cold_start_s"]
            out[m.src]["peak_rss_mb"] = max(out[m.src]["peak_rss_mb"], float(d.get("peak_rss_mb") or 0))
    for r in steps:
        for dev, cost in (r.get("devices") or {}).items():
            if dev in out and isinstance(cost, dict):
                out[dev]["peak_rss_mb"] = max(out[dev]["peak_rss_mb"], float(cost.get("peak_rss_mb") or 0))
    return out


def exit_status(summary: dict[str, Any]) -> int:
    """0 for a run that completed with an accuracy; 1 for a failed run, even one with rounds done before."""
    return 0 if summary.get("final_accuracy") is not None and not summary.get("run_failed") else 1


def print_summary(s: dict[str, Any]) -> None:
    unit = "round" if s["mode"] == "sync" else "version"
    print(f"\n{unit:>7}  accuracy  seconds")
    for h in s["history"]:
        print(f"{h['step']:>7}  {h['accuracy']:>8}  {h['seconds']:>7}")
    rows = [("mode", s["mode"]), ("model", s["model"]), ("data", s["data"]), (f"{unit}s", s["rounds"]),
            ("final accuracy", s["final_accuracy"]), ("wall time (s)", s["wall_s"]),
            ("bytes on the wire", f"{s['bytes_total']:,}"), ("device peak RSS (MB)", s["device_peak_rss_mb"]),
            ("device cold start (s)", s["device_cold_start_s"]),
            ("migrations", len(s["migrations"]))]
    if s.get("run_failed"):
        rows.append(("run failed", s["run_failed"]))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    sys.stdout.flush()
