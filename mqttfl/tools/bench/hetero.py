"""``mqttfl bench hetero``: heterogeneous devices, measured in one run (docs/algorithms.md, "Heterogeneous devices",
"Deadlines", "Split-point planning").

1. **Weak clients** (InclusiveFL / EmbracingFL, scaled to this machine; in memory, ``mqttfl.runtime.memory``):
   VGG-5 on the digits at 3x16x16 (``--weak-model cnn``: the CNN at 1x8x8), the train set cut into
   ``strong + max(weak)`` Dirichlet(``--alpha``) shards once per seed (most clients, and most data, are weak); a
   fixed set of strong clients trains alone or with the weak ones. A weak client has ``--budget`` f of a strong
   client's training compute and memory (:mod:`mqttfl.tools.bench.weak_budget` counts both on the model): it
   trains either the longest output-side suffix of blocks that fits (partial training: the input side runs
   frozen) or HeteroFL's widest sub-model that fits (width reduction), or stays out (strong only). Every arm of a
   seed gets the same shards and initial model (paired seeds). Accuracy is the mean of the last five rounds' test
   accuracy (non-IID rounds swing); the differences are paired per seed: mean, std and a 95% t-interval over
   ``--weak-seeds``.
2. **Compressed local models**: every device in one class (fp32, pruned per weight and per channel, fp16, bf16,
   int8, width, partial), VGG-5 on the digits at 3x16x16, in memory: accuracy, bytes each device sends per
   round; and on one device in this process, VGG-5 at 3x32x32, batch 64 (the FedFly shape): training memory
   (weights, gradients, optimizer state, the activations stored for backward) and time per mini-batch.
3. **Cutoffs** (Flower's tau; in memory on virtual time): 4 fast and 4 four-times-slower devices, the CNN on
   Dirichlet(0.5) digits, 3 local epochs; round time and accuracy with no cutoff, with tau = the fast devices'
   training time (from a run of the fast devices alone) and with 1.5 x that, and the first again with FedNova.
4. **Planned cuts** (real processes through the broker): VGG-5, four devices on one edge, every run the same
   data: each fixed cut for everyone, then the planner; the measured round time (mean of the rounds after the
   first, which profiles) against the planner's prediction. Two scenarios (``--planner-scenarios``): *speeds*,
   emulated board speeds 1x, 2x, 4x and 8x (``slowdown``), every link direct; *links*, boards at 1x, 2x, 8x and
   16x with the two fast ones behind an emulated 5 MB/s link with 100 ms one way (:mod:`mqttfl.tools.linkproxy`).

JSON (``--json``): ``acc_partial_minus_width`` and ``acc_partial_minus_strong_only`` (at the most weak clients,
the mean paired difference over seeds, with ``_std`` and ``_ci95``: the interval's half-width),
``planned_vs_fixed`` (planned round time / the best fixed cut's, in the links scenario; ``_speeds``, ``_links``:
each scenario's),
``tau_time_ratio`` (round time with tau = the fast devices' time / the fast devices' own round time),
``tau_acc_delta`` (its accuracy minus no cutoff's), ``int8_memory_ratio`` (training memory int8 / fp32), and
every figure behind them. Writes ``results.json`` and ``hetero.svg`` (or ``.png`` with matplotlib) into ``--out``.
``--small`` runs every part at toy sizes (a smoke test). A failed real-process run stops the bench with exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results, work_dir

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "pruned": {"train": "pruned", "prune": 0.5},
    "pruned_channel": {"train": "pruned", "prune": 0.5, "prune_by": "channel"},
    "fp16": {"precision": "fp16"},
    "bf16": {"precision": "bf16"},
    "int8": {"precision": "int8"},
    "width": {"train": "width", "width": 0.5},
    "partial": {"train": "partial", "train_blocks": 2},
}
WEAK = ("partial", "width")
# Student's t, two-sided 95%, by degrees of freedom (past the table: the normal's 1.96).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
SPEEDS = (1.0, 2.0, 4.0, 8.0)
# The "links" scenario: boards as far apart as a Pi Zero from a Pi 4 (1x, 2x, 8x, 16x), the two fast ones behind a
# long, narrower link (5 MB/s, 100 ms one way, as a cellular uplink), the two slow ones next to their edge. No
# single cut suits both: a split costs the first two a round trip per mini-batch, local training costs the last
# two the whole model at 8x and 16x.
LINK_SPEEDS = (1.0, 2.0, 8.0, 16.0)
SHAPED_LINKS: dict[int, tuple[float, float]] = {0: (5e6, 0.1), 1: (5e6, 0.1)}
# Part 4's scenarios: board speeds, and the emulated link (bytes/s, one-way delay s) of each device by index.
SCENARIOS: dict[str, tuple[tuple[float, ...], dict[int, tuple[float, float]]]] = {
    "speeds": (SPEEDS, {}), "links": (LINK_SPEEDS, SHAPED_LINKS)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the in-memory parts (spread over seeds)")
    p.add_argument("--strong", type=int, default=4, help="strong clients (part 1)")
    p.add_argument("--weak", default="0,16", help="weak clients added to them (part 1)")
    p.add_argument("--weak-seeds", type=int, default=5, help="paired seeds of part 1")
    p.add_argument("--budget", type=float, default=0.5,
                   help="a weak client's training compute and memory as a fraction of a strong one's (part 1)")
    p.add_argument("--weak-model", choices=("cnn", "vgg5"), default="vgg5",
                   help="part 1's model: VGG-5 on 3x16x16 digits or the CNN on 1x8x8 (faster)")
    p.add_argument("--width", type=float, default=0.0, help="part 1's width ratio (0: the widest within --budget)")
    p.add_argument("--train-blocks", type=int, default=0,
                   help="part 1's partial suffix in blocks (0: the longest within --budget)")
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew of part 1's shards")
    p.add_argument("--rounds", type=int, default=20, help="rounds of part 1")
    p.add_argument("--planner-rounds", type=int, default=4, help="rounds per run of part 4 (the first profiles)")
    p.add_argument("--skip-planner", action="store_true", help="leave out part 4 (real processes)")
    p.add_argument("--planner-scenarios", type=_scenarios, default="speeds,links",
                   help="part 4's scenarios: speeds (boards of mixed speeds, every link direct), links (the fast "
                        "boards behind a slow link); planned_vs_fixed is the links scenario's")
    p.add_argument("--small", action="store_true", help="every part at a toy size (tests)")
    add_out_argument(p, "hetero")
    p.add_argument("--workdir", help="keep part 4's configs, logs and state here (default: a temp dir, removed)")


def _scenarios(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown or text!r}: choose from {', '.join(SCENARIOS)}")
    return names


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _paired(values: list[float]) -> tuple[float, float, float]:
    """Mean, std and the 95% t-interval's half-width of paired differences."""
    mean, std = _mean_std(values)
    n = len(values)
    t = T95[n - 2] if 1 < n <= len(T95) + 1 else 1.96
    return mean, std, (t * std / n ** 0.5 if n > 1 else 0.0)


def _tail_accuracy(fleet: Any, last: int = 5) -> float:
    accs = [m["accuracy"] for m in fleet.metrics("round", node=fleet.cloud) if m.get("accuracy") is not None]
    tail = accs[-last:]
    return statistics.fmean(tail) if tail else 0.0


def _fleet(spec: Any, shards: Any, test: Any, seed: int, **kw: Any) -> Any:
    from mqttfl.runtime.memory import MemoryFleet

    fleet = MemoryFleet.from_spec(spec, shards, test, seed=seed, strict=False, **kw)
    fleet.start()
    end = fleet.run_to_end(max_time=1e7)
    if end["event"] != "run_complete":
        raise RuntimeError(f"in-memory run failed: {end}")
    return fleet


# ------------------------------------------------------------------------------------------------ 1. weak clients


def inclusive(args: argparse.Namespace) -> dict[str, Any]:
    from mqttfl.ml.data import load_digits
    from mqttfl.ml.models import schema_of
    from mqttfl.protocol.schema import ModelRef
    from mqttfl.tools.bench import weak_budget
    from mqttfl.tools.testbed import FleetSpec, make_shards

    weak_counts = [int(w) for w in args.weak.split(",")]
    model, batch = args.weak_model, 16
    shape = (1, 8, 8) if model == "cnn" else (3, 16, 16)
    costs = weak_budget.costs(model, shape, batch)
    n_blocks = schema_of(ModelRef(model, shape, 10)).n_blocks  # cut = n: weak and strong clients train locally
    fit = weak_budget.match(costs, args.budget)
    width, blocks = args.width or fit["width"], args.train_blocks or fit["train_blocks"]
    if width is None or blocks is None:
        raise RuntimeError(f"nothing fits a weak budget of {args.budget}: {fit}")
    weak = {"partial": {"train": "partial", "train_blocks": blocks}, "width": {"train": "width", "width": width}}
    chosen = {k: costs[k] for k in ("full", f"partial{blocks}", f"width{width}") if k in costs}
    train, test = load_digits(shape)
    out: dict[str, Any] = {"model": model, "shape": list(shape), "strong": args.strong, "weak": weak_counts,
                           "rounds": args.rounds, "alpha": args.alpha, "seeds": args.weak_seeds, "budget": args.budget,
                           "width": width, "train_blocks": blocks,
                           "costs": chosen, "accuracy": {}}
    names = [f"s{i:02d}" for i in range(args.strong)] + [f"w{i:02d}" for i in range(max(weak_counts))]
    for w in weak_counts:
        if w and f"strong_only@{min(weak_counts)}" in out["accuracy"]:
            # The strong clients' shards are the same whatever joins them: strong-only is one figure.
            out["accuracy"][f"strong_only@{w}"] = out["accuracy"][f"strong_only@{min(weak_counts)}"]
        for variant in WEAK if w else ("strong_only",):
            accs = []
            for seed in range(args.weak_seeds):
                everyone = FleetSpec(devices={n: f"edge{i % 2 + 1}" for i, n in enumerate(names)}, model=model,
                                     input_shape=shape, partition=f"dirichlet:{args.alpha}", data_seed=seed)
                shards = make_shards(everyone, train)  # the same shards whoever takes part
                use = names[:args.strong] + ([] if variant == "strong_only" else names[args.strong:][:w])
                cloud = {"rounds": args.rounds, "batch_size": batch, "lr": 0.05, "seed": seed, "run": "bench",
                         "deadline_s": 3600.0, "cut": n_blocks, "classes": {"weak": weak.get(variant, {})}}
                spec = FleetSpec(devices={n: everyone.devices[n] for n in use}, model=model, input_shape=shape,
                                 cloud=cloud, device_extra={n: {"class": "weak"} for n in use if n.startswith("w")})
                accs.append(_tail_accuracy(_fleet(spec, {n: shards[n] for n in use}, test, seed)))
            mean, std = _mean_std(accs)
            out["accuracy"][f"{variant}@{w}"] = {"mean": round(mean, 4), "std": round(std, 4),
                                                 "seeds": [round(a, 4) for a in accs]}
    return out


# ------------------------------------------------------------------------------------------------ 2. compressed


def device_costs(small: bool) -> dict[str, dict[str, float]]:
    """Training memory and time per mini-batch of each variant on one device, VGG-5 3x32x32, batch 64."""
    import numpy as np

    from mqttfl.ml.backend import TorchBackend
    from mqttfl.ml.data import load_digits
    from mqttfl.ml.models import initial_state
    from mqttfl.protocol import stage
    from mqttfl.protocol.hetero import DeviceClass
    from mqttfl.protocol.plan import Plan, Training
    from mqttfl.protocol.schema import ModelRef

    shape, batch, steps = ((3, 16, 16), 16, 2) if small else ((3, 32, 32), 64, 6)
    train, _ = load_digits(shape)
    data = train.subset(np.arange(batch * (steps + 2)))
    plan = Plan.of(Training(model="vgg5", input_shape=shape, batch_size=batch), run="bench", round=0)
    start = initial_state(ModelRef("vgg5", shape, 10), 0)
    out = {}
    for name, cfg in VARIANTS.items():
        local = DeviceClass.of(name, cfg).local() if cfg else None
        backend = TorchBackend("dev1", data=data)
        backend.run(stage.Open("s", plan, 0, 5, start, data=True, local=local))
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            backend.run(stage.LocalBatch("s", i, 1))
            if i >= 2:  # after two warm-up batches
                times.append(time.perf_counter() - t0)
        out[name] = {"train_mem_mb": round(backend.run(stage.Memory("s")) / 2**20, 2),
                     "batch_ms": round(1000 * statistics.median(times), 2)}
    return out


def compressed(args: argparse.Namespace) -> dict[str, Any]:
    from mqttfl.ml.data import load_digits
    from mqttfl.tools.testbed import FleetSpec, make_shards

    shape = (3, 16, 16)
    devices, rounds = (3, 2) if args.small else (6, 12)
    train, test = load_digits(shape)
    names = {f"dev{i + 1}": f"edge{i % 2 + 1}" for i in range(devices)}
    runs: dict[str, Any] = {}
    for name, cfg in VARIANTS.items():
        cloud = {"rounds": rounds, "batch_size": 32, "lr": 0.05, "seed": 0, "run": "bench", "deadline_s": 3600.0,
                 "cut": 5, "classes": {"c": cfg}}
        spec = FleetSpec(devices=names, model="vgg5", input_shape=shape, cloud=cloud,
                         device_extra={d: {"class": "c"} for d in names})
        fleet = _fleet(spec, make_shards(spec, train), test, 0)
        last = fleet.metrics("round", node=fleet.cloud)[-1]
        c = next(iter(last["classes"].values()))
        runs[name] = {"accuracy": round(_tail_accuracy(fleet, 3), 4),
                      "bytes_up_per_round": round(c["bytes_up"] / c["devices"])}
    costs = device_costs(args.small)
    for name in runs:
        runs[name].update(costs[name])
    return {"model": "vgg5", "devices": devices, "rounds": rounds, "variants": runs,
            "memory_shape": [3, 16, 16] if args.small else [3, 32, 32], "memory_batch": 16 if args.small else 64}


# ------------------------------------------------------------------------------------------------ 3. cutoffs


def cutoffs(args: argparse.Namespace) -> dict[str, Any]:
    from mqttfl.ml.data import load_digits
    from mqttfl.protocol import stage
    from mqttfl.tools.testbed import FleetSpec, make_shards

    shape = (1, 8, 8)
    train, test = load_digits(shape)
    rounds, epochs = (2, 2) if args.small else (20, 3)
    devices = {f"dev{i + 1}": f"edge{i % 2 + 1}" for i in range(8)}
    slow = {f"dev{i}" for i in range(5, 9)}

    def compute(job: stage.Job) -> float:
        return 0.05 if isinstance(job, stage.LocalBatch) else 0.001  # x4 on the slow devices

    def one(seed: int, who: dict[str, str], tau: float, strategy: str = "") -> tuple[float, float, float]:
        everyone = FleetSpec(devices=devices, model="cnn", input_shape=shape, partition="dirichlet:0.5",
                             data_seed=seed)
        shards = make_shards(everyone, train)
        cloud = {"rounds": rounds, "epochs": epochs, "batch_size": 32, "lr": 0.05, "seed": seed, "run": "bench",
                 "deadline_s": 3600.0, "cut": 4, "classes": {"slow": {"tau_s": tau}},
                 **({"strategy": strategy} if strategy else {})}
        extra = {d: {"class": "slow", "slowdown": 4.0} for d in who if d in slow}
        spec = FleetSpec(devices=who, model="cnn", input_shape=shape, cloud=cloud, device_extra=extra)
        fleet = _fleet(spec, {d: shards[d] for d in who}, test, seed, compute_s=compute)
        entries = fleet.metrics("round", node=fleet.cloud)
        round_s = statistics.fmean(e["round_s"] for e in entries)
        fast_local = statistics.fmean(c["T_local"] for e in entries for d, c in e["devices"].items() if d not in slow)
        return round_s, _tail_accuracy(fleet, 3), fast_local

    fast_only = {d: e for d, e in devices.items() if d not in slow}
    rows: dict[str, list[tuple[float, float]]] = {"fast_only": [], "no_cutoff": [], "tau_fast": [], "tau_1.5x": [],
                                                  "tau_fast_fednova": []}
    taus = []
    for seed in range(args.seeds):
        base_s, base_acc, fast_local = one(seed, fast_only, 0.0)
        taus.append(fast_local)
        rows["fast_only"].append((base_s, base_acc))
        rows["no_cutoff"].append(one(seed, devices, 0.0)[:2])
        rows["tau_fast"].append(one(seed, devices, fast_local)[:2])
        rows["tau_1.5x"].append(one(seed, devices, 1.5 * fast_local)[:2])
        rows["tau_fast_fednova"].append(one(seed, devices, fast_local, "fednova")[:2])
    out: dict[str, Any] = {"rounds": rounds, "epochs": epochs, "slowdown": 4.0, "tau_s": round(statistics.fmean(taus),
                                                                                              4)}
    for name, vals in rows.items():
        out[name] = {"round_s": round(statistics.fmean(v[0] for v in vals), 4),
                     "accuracy": round(statistics.fmean(v[1] for v in vals), 4),
                     "accuracy_seeds": [round(v[1], 4) for v in vals]}
    deltas = [t[1] - n[1] for t, n in zip(rows["tau_fast"], rows["no_cutoff"], strict=True)]
    ratios = [t[0] / f[0] for t, f in zip(rows["tau_fast"], rows["fast_only"], strict=True)]
    out["acc_delta_seeds"] = [round(d, 4) for d in deltas]
    out["time_ratio_seeds"] = [round(r, 4) for r in ratios]
    return out


# ------------------------------------------------------------------------------------------------ 4. planned cuts


def planner(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Part 4 in each scenario; ``planned_vs_fixed`` is the mixed-links one's when it ran."""
    out: dict[str, Any] = {"scenarios": {}}
    for name in args.planner_scenarios:
        out["scenarios"][name] = planner_scenario(args, root / name, *SCENARIOS[name])
    main = out["scenarios"].get("links") or next(iter(out["scenarios"].values()))
    out["planned_vs_fixed"] = main["planned_vs_fixed"]
    return out


def planner_scenario(args: argparse.Namespace, root: Path, speeds: tuple[float, ...],
                     shaped: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """Every fixed cut for everyone, then the planner, on boards of ``speeds``; the devices numbered in ``shaped``
    reach the broker through an emulated link (bandwidth bytes/s, one-way delay s: :mod:`mqttfl.tools.linkproxy`)."""
    from mqttfl.ml.data import load_digits
    from mqttfl.ml.models import schema_of
    from mqttfl.protocol.schema import ModelRef
    from mqttfl.tools.broker import Broker, BrokerOptions
    from mqttfl.tools.linkproxy import LinkProxy
    from mqttfl.tools.testbed import FleetSpec, Testbed

    model, shape = ("mlp", (64,)) if args.small else ("vgg5", (3, 32, 32))
    n = schema_of(ModelRef(model, shape, 10)).n_blocks
    train, test = load_digits(shape)
    speeds = speeds[::3] if args.small else speeds
    devices = {f"dev{i + 1}": "edge1" for i in range(len(speeds))}
    links = {d: shaped.get(i, (0.0, 0.0)) for i, d in enumerate(devices)}
    rounds = 2 if args.small else args.planner_rounds
    out: dict[str, Any] = {"model": model, "speeds": list(speeds), "links": links, "rounds": rounds, "runs": {}}
    for label, cut in [*((f"cut{c}", c) for c in range(1, n + 1)), ("planned", -1)]:
        cloud = {"rounds": rounds, "batch_size": 32, "lr": 0.01, "plan_cuts": True, "run": f"bench-{label}",
                 "deadline_s": 600.0}
        extra = {d: {"slowdown": s, **({"cut": cut} if cut > 0 else {})} for d, s in zip(devices, speeds,
                                                                                     strict=True)}
        spec = FleetSpec(devices=devices, model=model, input_shape=shape, cloud=cloud, device_extra=extra,
                         fleet=f"bench-hetero-{label}")
        with contextlib.ExitStack() as stack:
            broker = stack.enter_context(Broker(BrokerOptions(persistence=True), workdir=root / f"{label}-broker"))
            auth: dict[str, dict[str, Any]] = {}
            for d, (rate, delay) in links.items():
                if rate or delay:
                    proxy = stack.enter_context(LinkProxy(broker.host, broker.port))
                    proxy.shape(rate or None, delay)
                    auth[d] = {"port": proxy.port}
            tb = stack.enter_context(Testbed(root / label, spec, broker=broker, data=(train, test), auth=auth))
            tb.prepare()
            tb.start()
            tb.wait_event("run_complete", 900)
            metrics = tb.round_metrics()
        later = metrics[1:] or metrics
        predicted = [m["cut_plan"]["predicted_round_s"] for m in later if m.get("cut_plan", {}).get(
            "predicted_round_s") is not None]
        out["runs"][label] = {
            "round_s": round(statistics.fmean(m["round_s"] for m in later), 3),
            "predicted_round_s": round(statistics.fmean(predicted), 3) if predicted else None,
            "cuts": {d: later[-1]["devices"][d]["cut"] for d in devices},
            "T_local": {d: round(statistics.fmean(m["devices"][d]["T_local"] for m in later), 3) for d in devices},
        }
        print(f"  planner run {root.name}/{label}: {out['runs'][label]}", file=sys.stderr, flush=True)
    fixed = {k: v for k, v in out["runs"].items() if k != "planned"}
    best = min(fixed, key=lambda k: fixed[k]["round_s"])
    out["best_fixed"] = best
    out["planned_vs_fixed"] = round(out["runs"]["planned"]["round_s"] / fixed[best]["round_s"], 4)
    return out


# ------------------------------------------------------------------------------------------------ run


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # what every agent uses
    if args.small:
        args.seeds, args.weak_seeds, args.rounds, args.weak, args.strong = 1, 2, 2, "0,2", 2
    res: dict[str, Any] = {}
    for name, fn in (("inclusive", inclusive), ("compressed", compressed), ("cutoffs", cutoffs)):
        t0 = time.monotonic()
        res[name] = fn(args)
        print(f"  part {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    if not args.skip_planner:
        res["planner"] = planner(args, root)
    return res


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    inc = res["inclusive"]
    w = max(inc["weak"])
    acc = inc["accuracy"]
    if w:
        seeds = zip(acc[f"partial@{w}"]["seeds"], acc[f"width@{w}"]["seeds"], acc[f"strong_only@{w}"]["seeds"],
                    strict=True)
        d_width, d_strong = zip(*((p - wd, p - s) for p, wd, s in seeds), strict=True)
        for key, diffs in (("acc_partial_minus_width", d_width), ("acc_partial_minus_strong_only", d_strong)):
            res[key], res[key + "_std"], res[key + "_ci95"] = (round(v, 4) for v in _paired(list(diffs)))
    cut = res["cutoffs"]
    res["tau_time_ratio"] = round(cut["tau_fast"]["round_s"] / cut["fast_only"]["round_s"], 4)
    res["tau_acc_delta"] = round(cut["tau_fast"]["accuracy"] - cut["no_cutoff"]["accuracy"], 4)
    res["tau_long_acc_delta"] = round(cut["tau_1.5x"]["accuracy"] - cut["no_cutoff"]["accuracy"], 4)
    var = res["compressed"]["variants"]
    res["int8_memory_ratio"] = round(var["int8"]["train_mem_mb"] / var["fp32"]["train_mem_mb"], 4)
    res["planned_vs_fixed"] = res["planner"]["planned_vs_fixed"] if "planner" in res else None
    for name, sc in res.get("planner", {}).get("scenarios", {}).items():
        res[f"planned_vs_fixed_{name}"] = sc["planned_vs_fixed"]
    res["targets"] = {
        # A clear margin: the 95% interval of the paired gain lies above zero.
        "partial_beats_width_and_strong_only": all(
            res.get(k, 0) - res.get(k + "_ci95", 0) > 0
            for k in ("acc_partial_minus_width", "acc_partial_minus_strong_only")),
        "planned_vs_fixed": res["planned_vs_fixed"] is not None and res["planned_vs_fixed"] <= 0.85,
        "tau": res["tau_time_ratio"] <= 1.1 and res["tau_acc_delta"] >= -0.03,
    }
    return res


def rows_of(res: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    inc = res["inclusive"]
    rows.append((f"part 1: weak budget {inc['budget']} -> width / partial blocks", f"{inc['width']} / "
                 f"{inc['train_blocks']}  " + ", ".join(f"{k}: compute {v['macs_ratio']} memory {v['memory_ratio']}"
                                                         for k, v in inc["costs"].items())))
    for key, v in inc["accuracy"].items():
        rows.append((f"accuracy {key.replace('@', ' with weak=')}", f"{v['mean']:.4f} +- {v['std']:.4f}"))
    for key in ("acc_partial_minus_width", "acc_partial_minus_strong_only"):
        if key in res:
            rows.append((key, f"{res[key]:+.4f} +- {res[key + '_std']:.4f} (95% CI +- {res[key + '_ci95']:.4f})"))
    for name, v in res["compressed"]["variants"].items():
        rows.append((f"{name}: accuracy / bytes up per round / train MB / ms per batch",
                     f"{v['accuracy']:.4f} / {v['bytes_up_per_round']:,} / {v['train_mem_mb']} / {v['batch_ms']}"))
    for name in ("fast_only", "no_cutoff", "tau_fast", "tau_1.5x", "tau_fast_fednova"):
        v = res["cutoffs"][name]
        rows.append((f"cutoffs {name}: round s / accuracy", f"{v['round_s']:.3f} / {v['accuracy']:.4f}"))
    for scenario, sc in res.get("planner", {}).get("scenarios", {}).items():
        for name, v in sc["runs"].items():
            rows.append((f"planner {scenario} {name}: round s measured / predicted",
                         f"{v['round_s']} / {v['predicted_round_s']}  cuts {list(v['cuts'].values())}"))
        rows.append((f"planned_vs_fixed_{scenario}", f"{sc['planned_vs_fixed']:.4f} (best fixed: {sc['best_fixed']})"))
    for key in ("planned_vs_fixed", "tau_time_ratio", "tau_acc_delta", "tau_long_acc_delta", "int8_memory_ratio"):
        rows.append((key, fmt(res.get(key), digits=4)))
    rows.append(("targets met", str(res["targets"])))
    return rows


def run(args: argparse.Namespace) -> int:
    from mqttfl.tools.testbed import RunFailed

    out = out_dir(args)
    try:
        with work_dir(args, "hetero") as root:
            res = summarise(measure(args, root))
    except (RunFailed, RuntimeError, TimeoutError) as e:  # a failed run: say why, write nothing
        print(f"mqttfl bench hetero: {e}", file=sys.stderr)
        return 1
    res["plot"] = str(plot(res, out / "hetero.png"))
    path = save_results(out, res)
    emit(res, [*rows_of(res), ("results", str(path)), ("plot", res["plot"])], args.json)
    return 0


# ------------------------------------------------------------------------------------------------ plot


def plot(res: dict[str, Any], path: Path) -> Path:
    """Five panels: accuracy vs weak clients per variant (spread over seeds), partial training's paired gains
    over width reduction and strong only (mean and 95% half-width), each compressed variant's ratios to
    fp32, the cutoffs' round time and accuracy, the planner's measured and predicted round times."""
    inc = res["inclusive"]
    weak = inc["weak"]
    lines = {v: [(w, inc["accuracy"].get(f"{v}@{w}", inc["accuracy"][f"strong_only@{w}"] if not w else None))
                 for w in weak] for v in ("strong_only", *WEAK)}
    var = res["compressed"]["variants"]
    ratios = [(k, [v["accuracy"] / max(var["fp32"]["accuracy"], 1e-9),
                   v["train_mem_mb"] / max(var["fp32"]["train_mem_mb"], 1e-9),
                   v["batch_ms"] / max(var["fp32"]["batch_ms"], 1e-9),
                   v["bytes_up_per_round"] / max(var["fp32"]["bytes_up_per_round"], 1)]) for k, v in var.items()]
    cut = res["cutoffs"]
    tau = [(k, [cut[k]["round_s"] / cut["fast_only"]["round_s"], cut[k]["accuracy"]])
           for k in ("fast_only", "no_cutoff", "tau_fast", "tau_1.5x", "tau_fast_fednova")]
    plan = [(f"{name} {k}", [v["round_s"], v["predicted_round_s"] or 0.0])
            for name, sc in res.get("planner", {}).get("scenarios", {}).items() for k, v in sc["runs"].items()]
    paired = [(k.replace("acc_partial_minus_", "partial - "), [res[k], res[k + "_ci95"]])
              for k in ("acc_partial_minus_width", "acc_partial_minus_strong_only") if k in res]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(lines, [("weak clients, paired per seed: mean gain, 95% half-width", paired),
                            ("compressed / fp32: accuracy, memory, time, bytes", ratios),
                            ("cutoffs: round time / fast, accuracy", tau),
                            ("planner: measured, predicted round s", plan)], path.with_suffix(".svg"))
    fig, axes = plt.subplots(1, 5, figsize=(25, 4))
    for v, pts in lines.items():
        got = [(w, a) for w, a in pts if a is not None]
        axes[0].errorbar([w for w, _ in got], [a["mean"] for _, a in got], yerr=[a["std"] for _, a in got],
                         label=v, capsize=3)
    axes[0].set_xlabel("weak clients")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    panels = [("weak clients: paired gain, 95% half-width", paired), ("compressed / fp32", ratios),
              ("cutoffs", tau), ("planner", plan)]
    for ax, (title, groups) in zip(axes[1:], panels, strict=True):
        width = 0.8 / max(len(groups[0][1]) if groups else 1, 1)
        for j in range(len(groups[0][1]) if groups else 0):
            ax.bar([i + j * width for i in range(len(groups))], [g[1][j] for g in groups], width=width)
        ax.set_xticks(range(len(groups)), [g[0] for g in groups], rotation=45)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _svg(lines: dict[str, list[tuple[int, Any]]], panels: list[tuple[str, list[tuple[str, list[float]]]]],
         path: Path) -> Path:
    w, h, m = 380, 300, 40
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
    total = w * (1 + len(panels))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{h}" font-size="11">',
             f'<rect width="{total}" height="{h}" fill="white"/>',
             '<text x="10" y="16">test accuracy vs weak clients (mean, bar: spread over seeds)</text>']
    xs = sorted({x for pts in lines.values() for x, _ in pts}) or [0]
    lo = min((a["mean"] - a["std"] for pts in lines.values() for _, a in pts if a), default=0.0)
    hi = max((a["mean"] + a["std"] for pts in lines.values() for _, a in pts if a), default=1.0)
    lo, hi = max(0.0, lo - 0.02), min(1.0, hi + 0.02)

    def px(x: int) -> float:
        return m + (w - 2 * m) * (xs.index(x) / max(len(xs) - 1, 1))

    def py(a: float) -> float:
        return h - m - (h - 2 * m) * (a - lo) / max(hi - lo, 1e-9)

    for k, (name, pts) in enumerate(lines.items()):
        got = [(x, a) for x, a in pts if a]
        points = " ".join(f"{px(x):.1f},{py(a['mean']):.1f}" for x, a in got)
        parts.append(f'<polyline points="{points}" stroke="{colors[k]}" fill="none" stroke-width="1.5"/>')
        for x, a in got:
            low, high = py(a["mean"] - a["std"]), py(a["mean"] + a["std"])
            parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{low:.1f}" y2="{high:.1f}" '
                         f'stroke="{colors[k]}"/>')
        parts.append(f'<text x="{w - 110}" y="{m + 14 * k}" fill="{colors[k]}">{name}</text>')
    for x in xs:
        parts.append(f'<text x="{px(x):.1f}" y="{h - m + 14}">{x}</text>')
    parts.append(f'<text x="4" y="{m}">{hi:.2f}</text><text x="4" y="{h - m}">{lo:.2f}</text>')
    for i, (title, groups) in enumerate(panels, start=1):
        x0 = i * w
        parts.append(f'<text x="{x0 + 10}" y="16">{title}</text>')
        if not groups:
            continue
        series = len(groups[0][1])
        top = max((abs(v) for _, vals in groups for v in vals), default=1.0) or 1.0
        bw = (w - 2 * m) / len(groups)
        for k, (name, vals) in enumerate(groups):
            for j, v in enumerate(vals):
                bh = (h - 2 * m - 30) * abs(v) / top
                bx = x0 + m + k * bw + j * bw / series
                parts.append(f'<rect x="{bx:.1f}" y="{h - m - bh:.1f}" width="{bw / series - 1:.1f}" '
                             f'height="{bh:.1f}" fill="{colors[j % 4]}"/>')
                parts.append(f'<text x="{bx:.1f}" y="{h - m - bh - 3:.1f}" font-size="7">{v:.2g}</text>')
            parts.append(f'<text x="{x0 + m + k * bw:.1f}" y="{h - m + 14}" font-size="8">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path
