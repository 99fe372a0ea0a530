"""``mqttfl bench cloudmem``: what the cloud keeps per device, measured on its protocol machine alone.

For each fleet size N (default 10, 100, 1000) one cloud machine (sync FedAvg, the digits MLP, two edges, the
cloud's real evaluation on the digits test split) hears N devices come online, then R rounds (default 20) in
which every device reports (each edge in updates of 50 reports). ``tracemalloc`` counts what the machine
keeps: after the devices joined (``joined_kb``), after the rounds (``kept_kb``), and the peak (``peak_kb``);
with the size of the state the cloud persists on every round (``persisted_kb``) and the machine's CPU per round
(``cpu_ms_per_round``, persists serialised as the runtime does). Without a broker or processes the figures do
not move with the machine's load, unlike ``mqttfl bench scale``'s RSS, which also holds the transport's and the
allocator's transients.

Summary: ``bytes_per_device`` (what one more device adds to what the machine keeps, largest N against the
smallest, after the rounds) and ``bytes_per_round`` (what each round after the first adds at the largest N). Writes
``results.json`` and ``cloudmem.png`` (matplotlib) or ``cloudmem.svg`` into ``--out``. ``--small``: N = 5 and
60, 3 rounds (tests).
"""

from __future__ import annotations

import argparse
import collections
import time
import tracemalloc
from pathlib import Path
from typing import Any

from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results

EDGES = ("edge1", "edge2")
CHUNK = 50  # reports per edge update


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--sizes", default="10,100,1000", help="comma list of fleet sizes N")
    p.add_argument("--rounds", type=int, default=20, help="rounds per fleet size")
    p.add_argument("--small", action="store_true", help="toy sizes (tests)")
    add_out_argument(p, "cloudmem")


def machine_run(n: int, rounds: int) -> dict[str, Any]:
    """One cloud machine, ``n`` devices, ``rounds`` rounds in which every device reports; see the docstring."""
    import numpy as np

    from mqttfl.ml.backend import TorchBackend
    from mqttfl.ml.data import load_digits
    from mqttfl.ml.models import build_model, model_state, schema_of
    from mqttfl.protocol.cloud.machine import CloudMachine
    from mqttfl.protocol.cloud.roles import Roles
    from mqttfl.protocol.cloud.settings import CloudSettings
    from mqttfl.protocol.cloud.sync import SyncRounds
    from mqttfl.protocol.events import Event, JobDone, Persist, Received, Run, StatusSeen
    from mqttfl.protocol.messages import EdgeUpdate, Report
    from mqttfl.protocol.status import Presence
    from mqttfl.runtime.persist import dumps

    shape = (64,)
    _, test = load_digits(shape)
    backend = TorchBackend("cloud", test=test)
    settings = CloudSettings.from_section({"model": "mlp", "input_shape": list(shape), "run": "cloudmem",
                                           "deadline_s": 3600.0, "rounds": rounds, "min_devices": n})
    init = model_state(build_model("mlp", num_classes=10, input_shape=shape))
    persisted: list[int] = []

    def feed(m: CloudMachine, event: Event, now: float) -> None:
        queue: collections.deque[Event] = collections.deque([event])
        while queue:
            for fx in m.handle(queue.popleft(), now):
                if isinstance(fx, Run):
                    queue.append(JobDone(fx.job, backend.run(fx.job)))
                elif isinstance(fx, Persist) and fx.state is not None:
                    persisted.append(len(dumps(fx.state)))  # what the runtime writes to cloud.state

    rng = np.random.default_rng(0)
    tracing = tracemalloc.is_tracing()  # someone else's tracing (a test run's) is left on
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    m = CloudMachine("cloud", settings=settings, initial_state=init, schemas=schema_of, run_ids=lambda: "cloudmem",
                     roles=Roles(edges=EDGES))
    for e in EDGES:
        feed(m, StatusSeen(Presence(e, "edge", "idle", boot=1)), 0.0)
    for i in range(n):
        feed(m, StatusSeen(Presence(f"dev{i}", "device", "idle", boot=1, edge=EDGES[i % 2], samples=10,
                                    labels=tuple(range(10)))), 0.0)
    joined = tracemalloc.get_traced_memory()[0] - base
    assert isinstance(m.policy, SyncRounds)
    after_first = 0
    cpu = time.process_time()
    for r in range(rounds):
        current = m.policy.current
        if current is None:
            break
        delta = {k: np.full_like(v, 1e-3) for k, v in m.global_state.items()}
        for edge, devices in list(current.edges.items()):
            for j in range(0, len(devices), CHUNK):
                reports = {d: Report(samples=10, t_local=float(rng.uniform(0.1, 2.0)),
                                     t_total=float(rng.uniform(2.0, 3.0)), bytes_up=1000)
                           for d in devices[j:j + CHUNK]}
                update = EdgeUpdate(run=current.plan.run, round=current.plan.round, attempt=current.plan.attempt,
                                    reports=reports, missing=(), delta=delta)
                feed(m, Received(edge, update), 1.0 + r)
        del current, delta, reports, update  # the harness's references: only what the machine keeps counts
        if r == 0:
            after_first = tracemalloc.get_traced_memory()[0] - base
    cpu = time.process_time() - cpu
    kept, peak = tracemalloc.get_traced_memory()
    if not tracing:
        tracemalloc.stop()
    done = m.policy.completed
    kb = 1 / 1024
    return {"devices": n, "rounds": done, "joined_kb": round(joined * kb, 1),
            "first_round_kb": round(after_first * kb, 1), "kept_kb": round((kept - base) * kb, 1),
            "peak_kb": round((peak - base) * kb, 1),
            "persisted_kb": round(persisted[-1] * kb, 1) if persisted else 0,
            "cpu_ms_per_round": round(1000 * cpu / max(done, 1), 2)}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [5, 60] if args.small else [int(v) for v in args.sizes.split(",") if v.strip()]
    rounds = 3 if args.small else args.rounds
    return [machine_run(n, rounds) for n in sizes]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["devices"])
    small, big = runs[0], runs[-1]
    spread = big["devices"] - small["devices"]
    return {
        "bytes_per_device": round((big["kept_kb"] - small["kept_kb"]) * 1024 / spread) if spread else None,
        # After the first round: that one also creates what every round then reuses (the strategy's state).
        "bytes_per_round": round((big["kept_kb"] - big["first_round_kb"]) * 1024 / max(big["rounds"] - 1, 1)),
        **{k: {str(r["devices"]): r[k] for r in runs} for k in ("kept_kb", "peak_kb", "persisted_kb",
                                                               "cpu_ms_per_round")},
    }


def plot(runs: list[dict[str, Any]], out: Path) -> Path:
    ns = [r["devices"] for r in runs]
    series = {"kept KB": [r["kept_kb"] for r in runs], "peak KB": [r["peak_kb"] for r in runs],
              "persisted KB": [r["persisted_kb"] for r in runs]}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from mqttfl.tools.bench.scale import _svg

        return _svg({"cloud machine, KB": {name: (ns, ys) for name, ys in series.items()}}, out.with_suffix(".svg"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(ns, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("devices N")
    ax.set_ylabel("cloud machine, KB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    out_path = out_dir(args)
    runs = measure(args)
    summary = summarise(runs)
    plot_path = plot(runs, out_path / "cloudmem.png")
    out = {**summary, "runs": runs, "plot": str(plot_path), "small": bool(args.small)}
    rows = [(f"N={r['devices']}", f"{r['rounds']} rounds: kept {fmt(r['kept_kb'], 'KB', 1)} (joined "
             f"{fmt(r['joined_kb'], 'KB', 1)}), peak {fmt(r['peak_kb'], 'KB', 1)}, persisted "
             f"{fmt(r['persisted_kb'], 'KB', 1)}, {fmt(r['cpu_ms_per_round'], 'ms CPU/round', 1)}") for r in runs]
    rows += [(k, str(summary[k])) for k in ("bytes_per_device", "bytes_per_round")]
    rows += [("plot", str(plot_path)), ("results", str(save_results(out_path, out)))]
    emit(out, rows, args.json)
    return 0
