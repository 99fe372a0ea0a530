"""The ``mqttfl`` command: broker, demo, ctl, monitor, bench. Subcommands import lazily so that
``mqttfl ctl`` and ``mqttfl monitor`` start fast (no torch import)."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time

# subcommand -> (module, help). Each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "broker": ("mqttfl.tools.cli", "run a managed Mosquitto on a free loopback port until Ctrl-C"),
    "demo": ("mqttfl.tools.demo", "train on this machine: broker, cloud, 2 edges, 4 devices as processes"),
    "ctl": ("mqttfl.tools.ctl", "send a control command to a node and print its reply"),
    "monitor": ("mqttfl.tools.monitor", "live view of every node of a fleet"),
    "config": ("mqttfl.tools.configref", "check an agent's config file, or print the reference of every key"),
    "virtual": ("mqttfl.tools.virtual", "many virtual devices in one process, each its own MQTT client (load)"),
    "sim": ("mqttfl.tools.sim", "a whole fleet in one process on virtual time, no broker (the real protocol)"),
    "data": ("mqttfl.tools.datatool", "turn CSV/TSV, .npy/.npz or image folders into device shards; describe shards"),
    "export": ("mqttfl.tools.export", "write a kept global model as a PyTorch state dict and TorchScript"),
    "predict": ("mqttfl.tools.predict", "run an exported model on a shard and print the task's metrics"),
}
BENCHES = {
    "transport": ("mqttfl.tools.bench.transport", "MQTT round trips, codec and chunked throughput"),
    "split": ("mqttfl.tools.bench.split", "monolithic vs split-over-MQTT training of the same batches"),
    "migration": ("mqttfl.tools.bench.migration", "FedFly migration pause and time saved vs restarting"),
    "async": ("mqttfl.tools.bench.async_", "synchronous FedAvg vs asynchronous group aggregation"),
    "data": ("mqttfl.tools.bench.data", "mqttfl data throughput and a device's memory with a memory-mapped shard"),
    "resilience": ("mqttfl.tools.bench.resilience", "memory returned by expired transfers; an edge killed mid-round"),
    "comm": ("mqttfl.tools.bench.comm", "compression on the wire, FedLAMA and server strategies"),
    "pipeline": ("mqttfl.tools.bench.pipeline", "Eco-FL pipelines across helpers: speed-up, DP partition, rebalancing"),
    "hetero": ("mqttfl.tools.bench.hetero", "weak clients, compressed local models, cutoffs and planned cuts"),
    "scale": ("mqttfl.tools.bench.scale", "virtual devices over MQTT (N = 10..1000) and a 1000-client in-memory run"),
    "journal": ("mqttfl.tools.bench.journal", "the node's journal vs a file per outbox message and keyed state"),
    "cloudmem": ("mqttfl.tools.bench.cloudmem", "what the cloud machine keeps per device and round (tracemalloc)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--persistence", action="store_true", help="keep sessions and queued messages on disk")


def run(args: argparse.Namespace) -> int:
    from mqttfl.tools.broker import Broker, BrokerOptions

    b = Broker(BrokerOptions(port=args.port, persistence=args.persistence))
    b.start()
    print(f"mosquitto listening on 127.0.0.1:{b.port} (config {b.conf_path}); Ctrl-C stops it", flush=True)
    try:
        while b.proc is not None and b.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        b.cleanup()
    return 0


def restore_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt again. A shell starts a background job's processes (``make test &``)
    with SIGINT ignored, and Python keeps an inherited SIG_IGN, so the tools would never stop on Ctrl-C."""
    if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    restore_ctrl_c()
    parser = argparse.ArgumentParser(prog="mqttfl", description="Federated split learning over MQTT")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        modules[name] = (module, sp)
    bench = sub.add_parser("bench", help="benchmarks measured side by side in one run")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHES.items():
        modules[f"bench {name}"] = (module, bsub.add_parser(name, help=help_text))
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen subcommand's module is imported (and adds its flags).
    key = " ".join(argv[:2]) if argv[:1] == ["bench"] else (argv[0] if argv else "")
    if key in modules:
        mod = importlib.import_module(modules[key][0])
        mod.add_arguments(modules[key][1])
        args = parser.parse_args(argv)
        return int(mod.run(args))
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
