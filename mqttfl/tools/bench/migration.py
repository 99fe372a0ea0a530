"""``mqttfl bench migration``: FedFly's experiment on this machine, through the real broker and processes.

One device (holding 25% or 50% of the training data) trains VGG-5 in the FedFly configuration (cut after
the second conv block, batch 100, SGD lr 0.01 momentum 0.9) for several epochs per round. After two
discarded warm-up rounds, each round is one variant, measured on the device's own clock from the round's
first start to its last mini-batch (``T_total``):

- baseline: no move;
- migrate at p: at mini-batch round(p * n) the edge-side state moves to the other edge (direct path) and
  training goes on there;
- restart at p: at the same point the device drops its progress and starts the round over at the other
  edge from the global model (FedFly's baseline);
- relay at 0.5: like migrate, with the checkpoint carried through the device.

saving(p) = 1 - T_migrate / T_restart, next to the ideal p / (1 + p). Restarting redoes a round from the same
global model with the same data order, so every variant leaves the weights of a run with no move at all;
``lossless`` checks exactly that against a second, move-free run. Writes ``results.json`` into ``--out``; a failed
run (``run_failed``) stops the bench with exit 1.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.ml.data import Dataset, load_digits
from mqttfl.runtime.persist import load_state
from mqttfl.runtime.transport import Inbound
from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results
from mqttfl.tools.testbed import FleetSpec, RunFailed, Testbed

VARIANTS: list[tuple[str, float, str]] = [  # (name, p, path), one per round
    # Two discarded rounds first: torch's first-use costs, and both edges building their first replica
    # (a move), would otherwise land in whichever variant comes first.
    ("warm-up", 0.0, ""),
    ("warm-up move", 0.5, "direct"),
    ("baseline", 0.0, ""),
    ("migrate", 0.5, "direct"),
    ("restart", 0.5, "restart"),
    ("migrate", 0.9, "direct"),
    ("restart", 0.9, "restart"),
    ("relay", 0.5, "relay"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")
    p.add_argument("--epochs", type=int, default=10,
                   help="local epochs per round (longer rounds: the fixed overhead matters less)")
    p.add_argument("--fractions", default="0.25,0.5", help="share of the training data on the moving device")
    p.add_argument("--model", default="vgg5", choices=["vgg5", "mlp"], help="mlp: a quick functional check only")
    p.add_argument("--no-lossless-check", action="store_true", help="skip the move-free reference run")
    p.add_argument("--workdir")
    add_out_argument(p, "migration")


def _shape(model: str) -> tuple[int, ...]:
    return (3, 32, 32) if model == "vgg5" else (64,)


def _fraction(train: Dataset, fraction: float) -> Dataset:
    idx = np.random.default_rng(7).permutation(len(train))[: int(round(fraction * len(train)))]
    return train.subset(np.sort(idx))


def _spec(model: str, epochs: int, rounds: int) -> FleetSpec:
    return FleetSpec(devices={"dev1": "edge1"}, extra_edges=("edge1", "edge2"), model=model, input_shape=_shape(model),
                     cloud={"rounds": rounds, "epochs": epochs, "batch_size": 100, "lr": 0.01, "momentum": 0.9,
                            "deadline_s": 600.0, "quorum": 1.0, "run": "bench-migration"})


def _run(root: Path, spec: FleetSpec, data: tuple[Dataset, Dataset], variants: list[tuple[str, float, str]] | None,
         steps_per_round: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, np.ndarray]]:
    tb = Testbed(root, spec, data=data)
    tb.prepare()
    tb.start()
    sent: set[int] = set()
    edge = {"now": "edge1"}

    def on(m: Inbound) -> None:
        d = m.data or {}
        if variants is None or m.kind != "status" or m.src != "dev1" or d.get("state") != "training":
            return
        r = d.get("round")
        if not isinstance(r, int) or r in sent or r >= len(variants):
            return
        sent.add(r)
        name, p, path = variants[r]
        if not path:
            return
        dest = "edge2" if edge["now"] == "edge1" else "edge1"
        edge["now"] = dest
        tb.send_ctl("dev1", "move", edge=dest, path=path, at_step=max(1, int(round(p * steps_per_round))))

    try:
        tb.wait_event("run_complete", 3600, on_message=on)  # RunFailed: the variants' figures do not exist
        events = [m.data for m in tb.inbox if m.kind == "event" and m.data]
        saved = load_state(root / "state" / "cloud" / "cloud.state")
        assert saved is not None, "the cloud persisted no state"
        weights = saved["global"]
        return tb.round_metrics(), events, weights
    finally:
        tb.stop()


def measure(*, model: str = "vgg5", epochs: int = 6, fractions: tuple[float, ...] = (0.25, 0.5),
            lossless_check: bool = True, workdir: Path | None = None) -> dict[str, Any]:
    root = workdir or Path(tempfile.mkdtemp(prefix="mqttfl-bench-migration-"))
    train, test = load_digits(_shape(model))
    out: dict[str, Any] = {"model": model, "epochs": epochs, "per_fraction": {}}
    pauses: dict[str, list[float]] = {"direct": [], "relay": []}
    ckpt_bytes = 0
    lossless = True
    try:
        for fraction in fractions:
            data = (_fraction(train, fraction), test)
            steps = math.ceil(len(data[0]) / 100) * epochs
            spec = _spec(model, epochs, len(VARIANTS))
            metrics, events, weights = _run(root / f"f{fraction}", spec, data, VARIANTS, steps)
            t = {i: float(m["devices"]["dev1"]["T_total"]) for i, m in enumerate(metrics)}
            base = VARIANTS.index(("baseline", 0.0, ""))
            res: dict[str, Any] = {"samples": len(data[0]), "steps_per_round": steps,
                                   "t_baseline_s": round(t[base], 3)}
            for i, (name, p, _) in enumerate(VARIANTS[base + 1:], start=base + 1):
                res[f"t_{name}_p{int(p * 100)}_s"] = round(t[i], 3)
            for p in (0.5, 0.9):
                tag = f"p{int(p * 100)}"
                migrate = t[VARIANTS.index(("migrate", p, "direct"))]
                saving = 1.0 - migrate / t[VARIANTS.index(("restart", p, "restart"))]
                res[f"saving_{tag}"] = round(saving, 4)
                res[f"ideal_{tag}"] = round(p / (1 + p), 4)
            res["overhead_s"] = round(t[base + 1] - t[base], 3)
            for e in events:
                if e.get("event") == "migration_done" and int(e.get("round", 0)) > base:
                    pauses[str(e.get("path"))].append(float(e["pause_ms"]))
                    ckpt_bytes = int(e.get("checkpoint_bytes", 0))
            if lossless_check and fraction == fractions[0]:
                _, _, ref = _run(root / f"ref{fraction}", spec, data, None, steps)
                diff = max(float(np.abs(ref[k] - weights[k]).max()) for k in ref)
                res["max_abs_diff_vs_unmigrated"] = diff
                lossless = lossless and diff == 0.0
            out["per_fraction"][str(fraction)] = res
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    first = out["per_fraction"][str(fractions[-1])]
    out.update(
        pause_ms_direct=round(float(np.median(pauses["direct"])), 2) if pauses["direct"] else None,
        pause_ms_relay=round(float(np.median(pauses["relay"])), 2) if pauses["relay"] else None,
        checkpoint_bytes=ckpt_bytes, saving_p50=first["saving_p50"], saving_p90=first["saving_p90"],
        ideal_p50=round(0.5 / 1.5, 4), ideal_p90=round(0.9 / 1.9, 4),
        lossless=lossless if lossless_check else None,
    )
    return out


def run(args: argparse.Namespace) -> int:
    fractions = tuple(float(f) for f in args.fractions.split(","))
    out = out_dir(args)
    try:
        r = measure(model=args.model, epochs=args.epochs, fractions=fractions,
                    lossless_check=not args.no_lossless_check, workdir=Path(args.workdir) if args.workdir else None)
    except RunFailed as e:
        print(f"mqttfl bench migration: {e}", file=sys.stderr)
        return 1
    rows = [("model / epochs per round", f"{r['model']} / {r['epochs']}"),
            ("pause, direct (median)", fmt(r["pause_ms_direct"], "ms")),
            ("pause, relay (median)", fmt(r["pause_ms_relay"], "ms")),
            ("checkpoint", fmt(r["checkpoint_bytes"], "bytes"))]
    for f, res in r["per_fraction"].items():
        rows += [(f"[{float(f):.0%} of data] baseline round", fmt(res["t_baseline_s"], "s")),
                 ("  migrate / restart at p=0.5", f"{res['t_migrate_p50_s']} s / {res['t_restart_p50_s']} s"),
                 ("  saving at p=0.5 (ideal)", f"{res['saving_p50']:.1%} ({res['ideal_p50']:.1%})"),
                 ("  migrate / restart at p=0.9", f"{res['t_migrate_p90_s']} s / {res['t_restart_p90_s']} s"),
                 ("  saving at p=0.9 (ideal)", f"{res['saving_p90']:.1%} ({res['ideal_p90']:.1%})"),
                 ("  migration overhead", fmt(res["overhead_s"], "s"))]
    rows.append(("lossless (weights equal a move-free run)", str(r["lossless"])))
    rows.append(("results", str(save_results(out, r))))
    emit(r, rows, args.json)
    return 0
