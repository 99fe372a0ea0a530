"""``mqttfl bench split``: the same batches trained monolithically and split over MQTT, in one run.

(a) Monolithic: :class:`LocalTrainer` in this process on the whole model.
(b) Split: a real fleet (managed Mosquitto, cloud, one edge, one device, each its own process, as deployed)
    trains the same batches with the device holding blocks ``[0, cut)`` and the edge the rest; the epoch
    time is the device's ``T_local`` for the round (first forward to last optimizer step, network waits
    included), read from the cloud's round metrics.

One round per micro-batch count M (after one untimed warm-up round, so first-use costs of torch and the
connections are not charged to either side). Before each round the bench reads the cloud's persisted global
model and replays that round's batches with the same micro-batch cut in process; that replay is both the
monolithic timing for this M and the reference for ``max_abs_diff`` (with BatchNorm, M > 1 changes the
statistics, so each M has its own reference).

Threads: every process gets 1 torch thread by default — the device, the edge, and the monolithic reference —
because in deployment the device part runs on the device's own CPU and the monolithic alternative is that
same device training the whole model: ``ratio`` compares equal per-process budgets. For context the
monolithic epoch is also timed with 2 threads (the whole 2-core machine for one process) as
``monolithic_2threads_s`` / ``ratio_vs_2threads``: the device part is ~85% of VGG-5's compute, so a 1-thread
device cannot beat a 2-thread monolithic run on the same two cores, however well communication overlaps.
``--device-threads``/``--edge-threads``/``--mono-threads`` change the budgets; the machine's load average is
reported too, because other processes on a 2-core box move every timing here. Writes ``results.json`` into
``--out``; a failed run (``run_failed``) stops the bench with exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mqttfl.ml.data import BatchOrder, Dataset, load_digits, synthetic_images
from mqttfl.ml.models import MODELS, build_model, load_model_state, model_state
from mqttfl.ml.stage import LocalTrainer, make_optimizer
from mqttfl.protocol.plan import data_seed
from mqttfl.runtime.persist import load_state
from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results, work_dir
from mqttfl.tools.testbed import FleetSpec, RunFailed, Testbed, make_shards

SEED = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--model", default="vgg5", choices=sorted(MODELS))
    p.add_argument("--cut", type=int, default=2, help="device keeps blocks [0, cut) (FedFly VGG-5: 2)")
    p.add_argument("--batches", type=int, default=20, help="mini-batches per epoch (default 20: one epoch)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--micro", default="1,2,4", help="micro-batch counts M to measure, comma-separated")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--data", choices=("synthetic", "digits"), default="synthetic",
                   help="synthetic CIFAR-shaped images, or the digits resized to 3x32x32")
    p.add_argument("--mono-threads", type=int, default=1)
    p.add_argument("--device-threads", type=int, default=1)
    p.add_argument("--edge-threads", type=int, default=1)
    p.add_argument("--workdir", default="", help="where broker, configs and logs go (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per round")
    add_out_argument(p, "split")


def _data(args: argparse.Namespace, shape: tuple[int, ...]) -> tuple[Dataset, Dataset]:
    n = args.batches * args.batch_size
    if args.data == "digits":
        train, test = load_digits(shape)
        if len(train) < n:
            raise SystemExit(f"digits have {len(train)} training samples, {n} asked")
        return train.subset(np.arange(n)), test
    img = (shape[0], shape[1], shape[2])
    return synthetic_images(n, img, seed=1), synthetic_images(200, img, seed=2)


def _replay(global_state: dict[str, np.ndarray], args: argparse.Namespace, shard: Dataset, rnd: int,
            m: int) -> tuple[dict[str, np.ndarray], float]:
    """The device's batches of round ``rnd``, trained unsplit here: (final state, epoch seconds)."""
    model = build_model(args.model, input_shape=args.shape)
    load_model_state(model, global_state)
    trainer = LocalTrainer(model, make_optimizer(model.parameters(), lr=args.lr, momentum=args.momentum))
    order = BatchOrder(len(shard), args.batch_size, seed=data_seed(SEED, "dev1"))
    batches = [(torch.from_numpy(shard.x[i]), torch.from_numpy(shard.y[i])) for i in order.epoch_batches(rnd)]
    t0 = time.perf_counter()
    for x, y in batches:
        trainer.train_batch(x, y, micro_batches=min(m, len(y)))
    return model_state(model), time.perf_counter() - t0


def _warm_up(args: argparse.Namespace, shard: Dataset) -> None:
    model = build_model(args.model, input_shape=args.shape)
    trainer = LocalTrainer(model, make_optimizer(model.parameters(), lr=args.lr, momentum=args.momentum))
    n = min(args.batch_size, len(shard))
    for _ in range(2):
        trainer.train_batch(torch.from_numpy(shard.x[:n]), torch.from_numpy(shard.y[:n]))


def _diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    args.shape = tuple(MODELS[args.model].input_shape)
    micro = [int(v) for v in str(args.micro).split(",") if v.strip()]
    if not micro or min(micro) < 1:
        raise SystemExit("--micro needs positive integers")
    torch.set_num_threads(args.mono_threads)
    train, test = _data(args, args.shape)
    spec = FleetSpec(devices={"dev1": "edge1"}, model=args.model, input_shape=args.shape, fleet="benchsplit",
                     device_extra={"dev1": {"cut": args.cut}},
                     cloud={"rounds": 0, "autostart": False, "batch_size": args.batch_size, "lr": args.lr,
                            "momentum": args.momentum, "seed": SEED, "deadline_s": float(args.timeout),
                            "micro_batches": 1})
    shard = make_shards(spec, train)["dev1"]
    state_path = root / "state" / "cloud" / "cloud.state"
    split_s: dict[str, float] = {}
    mono_s: dict[str, float] = {}
    diffs: dict[str, float] = {}
    mono2: dict[str, float] = {}
    with Testbed(root, spec, data=(train, test)) as tb:
        tb.prepare()
        tb.connect_operator()
        one = {"MKL_NUM_THREADS": "1"}
        tb.start_node("cloud", env={"OMP_NUM_THREADS": "1", **one})
        tb.start_node("edge1", env={"OMP_NUM_THREADS": str(args.edge_threads), **one})
        tb.start_node("dev1", env={"OMP_NUM_THREADS": str(args.device_threads), **one})
        _warm_up(args, shard)
        tb.wait_online(["cloud", "edge1", "dev1"], timeout=120)
        for rnd, m in enumerate([micro[0], *micro]):  # round 0 warms the fleet up and is not reported
            saved = load_state(state_path)
            g = saved["global"] if saved else model_state(build_model(args.model, input_shape=args.shape,
                                                                      seed=SEED))
            reply = tb.ctl("cloud", "set", rounds=rnd + 1, micro_batches=m, timeout=60)
            if not reply.get("ok"):
                raise RuntimeError(f"cloud refused set: {reply}")
            reply = tb.ctl("cloud", "start", timeout=60)
            if not reply.get("ok"):
                raise RuntimeError(f"cloud refused start: {reply}")

            def round_done(x: Any, r: int = rnd) -> bool:
                d = x.data or {}
                return bool(x.kind == "metrics" and d.get("kind") == "round" and d.get("round") == r)

            msg = tb.wait(round_done, args.timeout, stop_on_run_failed=True)
            assert msg.data is not None
            tb.wait_event("run_complete", 60)
            t_local = float(msg.data["devices"]["dev1"]["T_local"])
            after = load_state(state_path)
            if after is None or int(after["round"]) != rnd + 1:
                raise RuntimeError("the cloud did not persist the round")
            ref, t_mono = _replay(g, args, shard, rnd, m)
            if rnd == 0:
                continue
            if m == 1 and "2" not in mono2:
                torch.set_num_threads(2)
                mono2["2"] = _replay(g, args, shard, rnd, m)[1]
                torch.set_num_threads(args.mono_threads)
            split_s[str(m)] = round(t_local, 4)
            mono_s[str(m)] = round(t_mono, 4)
            diffs[str(m)] = _diff(after["global"], ref)
    mono = mono_s.get("1", min(mono_s.values()))
    best_m = min(split_s, key=lambda k: split_s[k])
    return {
        "model": args.model, "cut": args.cut, "batches": args.batches, "batch_size": args.batch_size,
        "data": args.data, "lr": args.lr, "momentum": args.momentum,
        "monolithic_s": mono, "monolithic_by_m": mono_s, "split_s": split_s,
        "best_m": int(best_m), "ratio": round(split_s[best_m] / mono, 4),
        "ratio_m1": round(split_s["1"] / mono, 4) if "1" in split_s else None,
        "max_abs_diff": diffs,
        "monolithic_2threads_s": round(mono2["2"], 4) if mono2 else None,
        "ratio_vs_2threads": round(split_s[best_m] / mono2["2"], 4) if mono2 else None,
        "threads": {"monolithic": args.mono_threads, "device": args.device_threads, "edge": args.edge_threads},
        "cpus": os.cpu_count(), "loadavg": [round(v, 2) for v in os.getloadavg()],
    }


def run(args: argparse.Namespace) -> int:
    out = out_dir(args)
    try:
        with work_dir(args, "split") as root:
            res = measure(args, root)
    except RunFailed as e:
        print(f"mqttfl bench split: {e}", file=sys.stderr)
        return 1
    t = res["threads"]
    rows = [
        ("model / cut", f"{res['model']} / {res['cut']} ({res['batches']} batches of {res['batch_size']})"),
        ("threads", f"monolithic {t['monolithic']}, device {t['device']} + edge {t['edge']}"),
        ("monolithic epoch", fmt(res["monolithic_s"], "s", 3)),
    ]
    for m, s in res["split_s"].items():
        same_cut = fmt(res["monolithic_by_m"][m], "s", 3)
        rows.append((f"split epoch M={m}",
                     f"{fmt(s, 's', 3)}  (monolithic same cut {same_cut}, max |diff| {res['max_abs_diff'][m]:.2e})"))
    rows += [("ratio (best M)", f"{fmt(res['ratio'], '', 3)} at M={res['best_m']}"),
             ("ratio M=1", fmt(res["ratio_m1"], "", 3)),
             ("monolithic epoch, 2 threads", fmt(res["monolithic_2threads_s"], "s", 3)),
             ("ratio vs 2-thread monolithic", fmt(res["ratio_vs_2threads"], "", 3)),
             ("load average", str(res["loadavg"])),
             ("results", str(save_results(out, res)))]
    emit(res, rows, args.json)
    return 0
