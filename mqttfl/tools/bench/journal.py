"""The node's journal against a file per record (the outbox's and keyed state's earlier format).

Two workloads, each done both ways in the same folder on the same disk:

- outbox: put a must-deliver message, publish it (the barrier), acknowledge it (a virtual device's delta);
  per file: create + fsync + rename + directory fsync, then unlink.
- keyed state: an edge saving ``group`` device sessions between two publishes (the barrier once per group), then
  removing them at the round's end; per file: one atomic write per session and an unlink each.

Reported as operations per second and the speed-up; the load average is recorded next to the figures.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from mqttfl.runtime.journal import Journal
from mqttfl.runtime.outbox import Outbox
from mqttfl.runtime.persist import atomic_write
from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results, work_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--ops", type=int, default=500, help="messages (outbox) and sessions (keyed state) per way")
    p.add_argument("--payload-bytes", type=int, default=75_000, help="size of each message and session")
    p.add_argument("--group", type=int, default=10, help="sessions saved between two barriers (keyed state)")
    p.add_argument("--small", action="store_true", help="toy sizes (tests)")
    p.add_argument("--workdir", help="keep the files here (default: a temp dir, removed)")
    add_out_argument(p, "journal")


def _outbox_files(d: Path, ops: int, payload: bytes) -> float:
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    for i in range(ops):
        path = d / f"{i:08x}.msg"
        atomic_write(path, payload)
        path.unlink()
    return time.perf_counter() - t0


def _outbox_journal(d: Path, ops: int, payload: bytes) -> float:
    box = Outbox(d)
    t0 = time.perf_counter()
    for i in range(ops):
        key = f"{i:08x}"
        box.put(key, "mqttfl/v1/bench/delta/dev/edge", payload, float(i))
        box.sync()  # what Transport.publish does before the message goes out
        box.ack(key)
    box.sync()
    elapsed = time.perf_counter() - t0
    box.journal.close()
    return elapsed


def _keyed_files(d: Path, ops: int, payload: bytes, group: int) -> float:
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    for start in range(0, ops, group):
        names = [d / f"session.dev{i}.state" for i in range(start, min(ops, start + group))]
        for path in names:
            atomic_write(path, payload)
        for path in names:
            path.unlink()
    return time.perf_counter() - t0


def _keyed_journal(d: Path, ops: int, payload: bytes, group: int) -> dict[str, Any]:
    j = Journal(d / "journal.log")
    t0 = time.perf_counter()
    for start in range(0, ops, group):
        names = [f"keyed.session.dev{i}" for i in range(start, min(ops, start + group))]
        for name in names:
            j.put(name, payload)
        j.sync()
        for name in names:
            j.delete(name)
    j.sync()
    elapsed = time.perf_counter() - t0
    stats = j.stats()
    j.close()
    return {"s": elapsed, **stats}


def measure(root: Path, *, ops: int, payload_bytes: int, group: int) -> dict[str, Any]:
    payload = os.urandom(payload_bytes)
    load_before = os.getloadavg()
    ob_files = _outbox_files(root / "outbox-files", ops, payload)
    ob_journal = _outbox_journal(root / "outbox-journal", ops, payload)
    k_files = _keyed_files(root / "keyed-files", ops, payload, group)
    k_journal = _keyed_journal(root / "keyed-journal", ops, payload, group)
    return {
        "ops": ops, "payload_bytes": payload_bytes, "group": group,
        "outbox_files_ops_per_s": round(ops / ob_files, 1), "outbox_journal_ops_per_s": round(ops / ob_journal, 1),
        "outbox_speedup": round(ob_files / ob_journal, 2),
        "keyed_files_ops_per_s": round(ops / k_files, 1), "keyed_journal_ops_per_s": round(ops / k_journal["s"], 1),
        "keyed_speedup": round(k_files / k_journal["s"], 2),
        "keyed_journal_syncs": k_journal["syncs"], "keyed_journal_compactions": k_journal["compactions"],
        "loadavg": [round(x, 2) for x in (*load_before, *os.getloadavg())][:6],
    }


def run(args: argparse.Namespace) -> int:
    out = out_dir(args)
    ops, size = (20, 1000) if args.small else (args.ops, args.payload_bytes)
    with work_dir(args, "journal") as root:
        r = measure(root, ops=ops, payload_bytes=size, group=args.group)
    rows = [("outbox put+publish+ack, file per message", fmt(r["outbox_files_ops_per_s"], "/s", 0)),
            ("outbox put+publish+ack, journal", fmt(r["outbox_journal_ops_per_s"], "/s", 0)),
            ("outbox speed-up", fmt(r["outbox_speedup"], "x")),
            ("keyed state save+remove, file per session", fmt(r["keyed_files_ops_per_s"], "/s", 0)),
            (f"keyed state save+remove, journal (a barrier per {r['group']})",
             fmt(r["keyed_journal_ops_per_s"], "/s", 0)),
            ("keyed state speed-up", fmt(r["keyed_speedup"], "x")),
            ("payload", f"{r['payload_bytes']} bytes, {r['ops']} operations"),
            ("load average before / after", " ".join(str(x) for x in r["loadavg"])),
            ("results", str(save_results(out, r)))]
    emit(r, rows, args.json)
    return 0
