"""``mqttfl bench resilience``: what a bad node and a crashed edge cost, through a real broker and real agents.

Two measurements (docs/design.md, "Trust" and "Edge resume"):

- memory: an idle edge agent, after one complete 16 MB message, receives ``--transfers`` chunked messages
  that never complete (each declares ``--transfer-mb`` and sends ``--held-mb`` of it) from one sender; its
  resident memory is read from /proc before, at the peak, and after the transfers expired (``transfer_idle_s``
  set to a few seconds here). The transport frees them and hands the memory back to the system (malloc_trim).
- edge crash: one edge and two devices train; in round 1 the edge is killed with SIGKILL at the device's
  ``--kill-at`` mini-batch and restarted after ``--down-s``. Per variant: ``resume`` (sessions saved every
  ``--resume-every`` mini-batches, devices go back to the saved boundary) and ``rejoin`` (nothing saved: the
  devices ask the cloud to restart their part). Reported: the time from the edge's restart to every device
  being back (resumed, or asking to rejoin), the crashed round's time next to an undisturbed one, the
  mini-batches trained again, and whether the round kept every device at its first attempt.

Writes ``results.json`` into ``--out``; a failed run (``run_failed``) stops the bench with exit 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mqttfl.ml.data import load_digits
from mqttfl.runtime.transport import Inbound
from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results
from mqttfl.tools.testbed import FleetSpec, RunFailed, Testbed
from mqttfl.wire.chunking import make_chunks
from mqttfl.wire.topics import topic

MIB = 1024 * 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")
    p.add_argument("--transfers", type=int, default=3, help="never-completed chunked messages sent to the edge")
    p.add_argument("--transfer-mb", type=int, default=40, help="the size each of them declares")
    p.add_argument("--held-mb", type=int, default=32, help="how much of each is sent")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn", "vgg5"], help="the crash measurement's model")
    p.add_argument("--kill-at", type=int, default=12, help="the device's mini-batch at which the edge is killed")
    p.add_argument("--down-s", type=float, default=1.0, help="how long the edge stays down")
    p.add_argument("--resume-every", type=int, default=4)
    p.add_argument("--workdir")
    add_out_argument(p, "resilience")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for {pid}")


def _settle(pid: int, seconds: float = 1.0) -> float:
    """RSS once it stops moving (the agent's thread works through its queue)."""
    last, deadline = rss_mb(pid), time.monotonic() + 30.0
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = rss_mb(pid)
        if abs(now - last) < 1.0:
            return now
        last = now
    return last


def measure_memory(root: Path, transfers: int, transfer_mb: int, held_mb: int) -> dict[str, Any]:
    spec = FleetSpec(devices={"dev1": "edge1"}, model="mlp", input_shape=(64,))  # only the edge runs
    tb = Testbed(root, spec)
    try:
        tb.prepare()
        tb.connect_operator()
        proc = tb.start_node("edge1", env={"MQTTFL_LIMITS__TRANSFER_IDLE_S": "3"})
        tb.wait_online(["edge1"], timeout=120)
        op = tb.connect_operator()  # publishes as "operator": one sender, as an attacker would
        # First one complete 16 MB message, as every node of a fleet has received (a model): freeing it raises
        # glibc's mmap threshold, so that later 1 MiB chunks come from the heap, where freed memory stays.
        for f in make_chunks(os.urandom(16 * MIB), MIB):
            op.client.publish(topic(spec.fleet, "delta", "operator", "edge1"), f, qos=1)
        base = _settle(proc.pid)
        for _ in range(transfers):
            frames = make_chunks(os.urandom(transfer_mb * MIB), MIB)
            for f in frames[: held_mb]:
                op.client.publish(topic(spec.fleet, "delta", "operator", "edge1"), f, qos=1)
        peak = _settle(proc.pid)
        deadline = time.monotonic() + 60.0
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            stats = tb.ctl("edge1", "status")["result"]["transport"]
            if stats.get("drop_expired", 0) >= transfers:
                break
            time.sleep(0.5)
        after = _settle(proc.pid)
        return {"rss_baseline_mb": round(base, 1), "rss_peak_mb": round(peak, 1), "rss_after_mb": round(after, 1),
                "held_mb": transfers * held_mb, "returned_fraction": round((peak - after) / max(peak - base, 1e-9), 3),
                "expired": stats.get("drop_expired", 0), "memory_released": stats.get("memory_released", 0)}
    finally:
        tb.stop()


def measure_crash(root: Path, *, model: str, resume_every: int, kill_at: int, down_s: float) -> dict[str, Any]:
    shape = {"mlp": (64,), "cnn": (1, 8, 8), "vgg5": (3, 32, 32)}[model]
    spec = FleetSpec(devices={"dev1": "edge1", "dev2": "edge1"}, model=model, input_shape=shape,
                     device_extra={d: {"step_delay_s": 0.05, "act_timeout_s": 2.0} for d in ("dev1", "dev2")},
                     cloud={"rounds": 3, "batch_size": 16, "lr": 0.05, "seed": 5, "deadline_s": 300.0,
                            "resume_every": resume_every, "run": "bench-resilience"})
    tb = Testbed(root, spec, data=load_digits(shape))
    marks: dict[str, float] = {}

    def watch(m: Inbound) -> None:
        d = m.data or {}
        if m.kind == "event" and d.get("event") in ("round_resumed", "round_rejoin") and "restart" in marks:
            marks.setdefault(f"back_{m.src}", time.monotonic())
            marks["replayed"] = marks.get("replayed", 0) + float(d.get("replayed", 0))

    try:
        tb.prepare()
        tb.start()
        tb.wait_event("round_started", 300, round=1)
        while tb.ctl("dev1", "train_stats")["result"]["step"] < kill_at:
            time.sleep(0.1)
        tb.kill("edge1", signal.SIGKILL)
        marks["kill"] = time.monotonic()
        time.sleep(down_s)
        tb.start_node("edge1")
        marks["restart"] = time.monotonic()
        tb.wait_event("run_complete", 600, on_message=watch)
        for m in tb.inbox:
            watch(m)
        rounds = tb.round_metrics()
    finally:
        tb.stop()
    back = max((v for k, v in marks.items() if k.startswith("back_")), default=float("nan"))
    crashed = next(r for r in rounds if r["round"] == 1)
    calm = [r["round_s"] for r in rounds if r["round"] != 1]
    return {"restart_to_back_s": round(back - marks["restart"], 2), "kill_to_back_s": round(back - marks["kill"], 2),
            "round_s_undisturbed": round(sum(calm) / len(calm), 2), "round_s_crashed": crashed["round_s"],
            "replayed_steps": int(marks.get("replayed", 0)), "participants": crashed["participants"],
            "attempt": crashed["attempt"], "devices": len(spec.devices)}


def measure(*, transfers: int = 3, transfer_mb: int = 40, held_mb: int = 32, model: str = "mlp",
            kill_at: int = 12, down_s: float = 1.0, resume_every: int = 4,
            workdir: Path | None = None) -> dict[str, Any]:
    root = workdir or Path(tempfile.mkdtemp(prefix="mqttfl-bench-resilience-"))
    try:
        out: dict[str, Any] = {"memory": measure_memory(root / "memory", transfers, transfer_mb, held_mb),
                               "model": model, "kill_at": kill_at, "down_s": down_s, "resume_every": resume_every}
        for name, every in (("resume", resume_every), ("rejoin", 0)):
            out[name] = measure_crash(root / name, model=model, resume_every=every, kill_at=kill_at, down_s=down_s)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return out


def run(args: argparse.Namespace) -> int:
    out = out_dir(args)
    try:
        r = measure(transfers=args.transfers, transfer_mb=args.transfer_mb, held_mb=args.held_mb, model=args.model,
                    kill_at=args.kill_at, down_s=args.down_s, resume_every=args.resume_every,
                    workdir=Path(args.workdir) if args.workdir else None)
    except RunFailed as e:
        print(f"mqttfl bench resilience: {e}", file=sys.stderr)
        return 1
    m = r["memory"]
    rows = [(f"edge RSS: baseline / {m['held_mb']} MB held / after expiry",
             f"{m['rss_baseline_mb']} / {m['rss_peak_mb']} / {m['rss_after_mb']} MB"),
            ("memory returned after expiry", f"{m['returned_fraction']:.0%}")]
    for name in ("resume", "rejoin"):
        c = r[name]
        rows += [(f"[{name}] edge restart -> every device back", fmt(c["restart_to_back_s"], "s")),
                 (f"[{name}] crashed round / undisturbed round", f"{c['round_s_crashed']} s / "
                                                                  f"{c['round_s_undisturbed']} s"),
                 (f"[{name}] devices kept, attempt", f"{c['participants']} of {c['devices']}, {c['attempt']}"),
                 (f"[{name}] mini-batches trained again", str(c["replayed_steps"]))]
    rows.append(("results", str(save_results(out, r))))
    emit(r, rows, args.json)
    return 0
