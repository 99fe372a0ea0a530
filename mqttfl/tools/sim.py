"""``mqttfl sim``: a whole fleet in one process, on virtual time (``mqttfl.runtime.memory``).

The same device, edge and cloud protocol machines a deployment runs, without a broker or processes: every
message still goes through the wire codec, every round through the same strategies and round policies.
Virtual time follows a per-message link latency and a per-job compute time (``--latency-ms``,
``--compute-ms``), so a run's virtual duration says how the protocol behaves, and its wall time how much CPU the
training costs. Deterministic for a seed. Prints one line per round (or version) and a summary; ``--json``
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mqttfl.tools.demo import load_data
from mqttfl.tools.testbed import FleetSpec, make_shards


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=8, help="number of devices")
    p.add_argument("--edges", type=int, default=2, help="devices are spread round-robin over this many edges")
    p.add_argument("--model", default="cnn", help="vgg5 | cnn | mlp | module:function")
    p.add_argument("--input-shape", default="", help="e.g. 1,8,8 (default: what --data gives the model)")
    p.add_argument("--data", default="digits", help="digits | synthetic | cifar10:PATH")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | imbalanced:FRACTION")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--strategy", default="", help="the [cloud] strategy (default: fedavg sync, ecofl async)")
    p.add_argument("--cut", type=int, default=-1, help="split point of every device (-1: the model's default)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=2.0, help="virtual link latency per message")
    p.add_argument("--compute-ms", type=float, default=1.0, help="virtual compute time per stage job")
    p.add_argument("--cloud", action="append", default=[], metavar="KEY=VALUE",
                   help="any other [cloud] key, e.g. fedlama_phi=2, strategy=krum, delta_encoding=topk (repeatable)")
    p.add_argument("--device", action="append", default=[], metavar="KEY=VALUE",
                   help="a [device] key for every device, e.g. delta_encoding=int8 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _pairs(items: list[str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what} wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)  # numbers, booleans, lists; anything else is a string
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _shape(args: argparse.Namespace) -> tuple[int, ...]:
    if args.input_shape:
        return tuple(int(v) for v in args.input_shape.split(","))
    return {"vgg5": (3, 32, 32), "mlp": (64,)}.get(args.model, (1, 8, 8))


def _total_counts(fleet: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for name in fleet.nodes:
        for k, v in fleet.counts(name).items():
            total[k] = total.get(k, 0) + v
    return total


def run(args: argparse.Namespace) -> int:
    import torch

    from mqttfl.runtime.memory import MemoryFleet

    torch.set_num_threads(1)  # what every agent uses: the results match a real fleet's bit for bit
    shape = _shape(args)
    edges = [f"edge{i + 1}" for i in range(max(1, args.edges))]
    devices = {f"dev{i + 1}": edges[i % len(edges)] for i in range(args.devices)}
    cloud: dict[str, Any] = {"rounds": args.rounds, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                             "mode": args.mode, "run": "sim", "deadline_s": 3600.0}
    if args.strategy:
        cloud["strategy"] = args.strategy
    if args.mode == "async":
        cloud["max_versions"] = args.rounds
    cloud.update(_pairs(args.cloud, "--cloud"))
    device = {**({"cut": args.cut} if args.cut > 0 else {}), **_pairs(args.device, "--device")}
    spec = FleetSpec(devices=devices, model=args.model, input_shape=shape, partition=args.partition,
                     data_seed=args.seed, cloud=cloud, device_extra={d: dict(device) for d in devices})
    train, test = load_data(args.data, shape)
    t0 = time.monotonic()
    fleet = MemoryFleet.from_spec(spec, make_shards(spec, train), test, seed=args.seed,
                                  latency_s=args.latency_ms / 1000, compute_s=args.compute_ms / 1000, strict=False)
    fleet.start()
    end = fleet.run_to_end(max_time=10 * 3600.0)
    wall = time.monotonic() - t0
    steps = fleet.metrics("round" if args.mode == "sync" else "version", node="cloud")
    history = [{"step": m.get("round" if args.mode == "sync" else "version"), "accuracy": m.get("accuracy"),
                "loss": m.get("loss"), "virtual_s": m.get("wall_s")} for m in steps]
    summary = {"mode": args.mode, "model": args.model, "devices": args.devices, "edges": len(edges),
               "outcome": end["event"], "final_accuracy": history[-1]["accuracy"] if history else None,
               "virtual_s": round(fleet.now, 3), "wall_s": round(wall, 3), "history": history,
               "messages": {k: v for k, v in sorted(_total_counts(fleet).items()) if k.startswith("tx_")
                            and k != "tx_bytes"}}
    if args.json:
        print(json.dumps(summary))
    else:
        for h in history:
            print(f"{h['step']:>5}  accuracy {h['accuracy']}  loss {h['loss']}  at {h['virtual_s']} s (virtual)")
        print(f"\n{summary['outcome']}: {args.devices} devices, {len(edges)} edges, final accuracy "
              f"{summary['final_accuracy']}, {summary['virtual_s']} s virtual, {summary['wall_s']} s wall, "
              f"{sum(summary['messages'].values())} messages")
    sys.stdout.flush()
    return 0 if end["event"] == "run_complete" else 1
