"""``mqttfl virtual``: many device machines in one process, each a full MQTT client of its own.

A load generator for the real broker, edges and cloud: every virtual device is a :class:`mqttfl.runtime.node.Node`
built like the device agent's (``mqttfl.runtime.device``) with its own client id, persistent session, retained
presence and last will, subscribed to its own inbox only. They share one opened shard and one loaded torch, and
one thread steps them in turn (each paho client keeps its network thread). ``--mode train`` trains the config's
model on the shard; ``--mode replay`` sends the round's weights plus a fixed update (no compute), which is how
``mqttfl bench scale`` measures the fleet's own overhead (docs/operations.md, "Virtual devices").
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mqttfl.ml.shard import open_shard
from mqttfl.runtime.config import AgentConfig, ConfigError, DeviceSection, load_config, parse_section
from mqttfl.runtime.device import build_device
from mqttfl.runtime.log import setup_logging
from mqttfl.runtime.node import Node, Shutdown
from mqttfl.runtime.transport import TransportError

# paho's network loop waits in select(), which takes no file descriptor above 1023; each virtual device holds four
# (its socket, paho's wake-up socket pair, its state directory's lock). So one process holds at most this many, and
# a larger fleet is spread over worker processes (which also spreads it over the machine's cores).
PER_PROCESS = 200
CHORES_S = 0.1  # an idle virtual device's housekeeping period (an agent's loop wakes every 50 ms)


def virtual_configs(template: AgentConfig, count: int, prefix: str, edges: list[str], first: int = 1
                    ) -> list[AgentConfig]:
    """``count`` device configs from one: nodes ``<prefix><i>`` for i = first .. first + count - 1, attached
    round-robin to ``edges``, each with a state directory of its own next to the template's."""
    base = Path(template.state_dir).parent if template.state_dir else None
    out = []
    for i in range(first, first + count):
        node = f"{prefix}{i}"
        out.append(replace(template, node=node, state_dir=str(base / node) if base else "",
                           section={**template.section, "edge": edges[(i - 1) % len(edges)]}))
    return out


class VirtualFleet:
    """The nodes of ``configs`` in this process; :meth:`start` brings them online, :meth:`run` steps them."""

    def __init__(self, configs: list[AgentConfig], *, replay: bool) -> None:
        sec: DeviceSection = parse_section(DeviceSection, configs[0].section, "device")
        data = open_shard(sec.data)
        held_out = open_shard(sec.eval_data) if sec.eval_data else None
        self.nodes: list[Node] = [build_device(c, data=data, held_out=held_out, replay=replay) for c in configs]
        self.running = True
        self.online_s: float | None = None

    def start(self, connect_timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        for n in self.nodes:
            n.go_online(connect_timeout)
        self.online_s = time.monotonic() - t0

    def run(self) -> None:
        """Step every node until asked to stop (or every node was shut down by command). A node with messages is
        stepped as its own loop would; an idle one's housekeeping (timers, re-sends, metrics) runs every
        ``CHORES_S``, so that a process of hundreds of idle nodes does not spin."""
        live = list(self.nodes)
        chores_at = {id(n): 0.0 for n in live}
        try:
            while self.running and live:
                busy = False
                now = time.monotonic()
                for n in list(live):
                    due = now >= chores_at[id(n)]
                    if due:
                        chores_at[id(n)] = now + CHORES_S
                    try:
                        for _ in range(16):  # a few messages each, so no node starves the others
                            if not n.step(timeout=0.0, chores=due):
                                break
                            busy, due = True, False
                    except Shutdown:
                        n.stop()
                        live.remove(n)
                if not busy:
                    time.sleep(0.005)
        finally:
            for n in live:
                n.stop()

    def stop(self, *_: Any) -> None:
        self.running = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="a device agent's TOML config: the template of every "
                   "virtual device ([mqtt], [device] data, cut, ...)")
    p.add_argument("--count", "-n", type=int, required=True, help="how many virtual devices")
    p.add_argument("--prefix", default="vdev", help="node ids are <prefix>1 .. <prefix>N (default vdev)")
    p.add_argument("--edges", default="", help="comma-separated edges, assigned round-robin (default: the "
                   "config's [device] edge)")
    p.add_argument("--mode", choices=("train", "replay"), default="train",
                   help="train the model on the config's shard, or replay a fixed update with no compute")
    p.add_argument("--fleet", help="fleet id (overrides the config)")
    p.add_argument("--per-process", type=int, default=PER_PROCESS,
                   help=f"devices per process (at most {PER_PROCESS}: paho's select() limit); more are spread "
                        "over worker processes")
    p.add_argument("--first", type=int, default=1, help="number of the first device (<prefix><first>)")


def run_workers(args: argparse.Namespace) -> int:
    """Spread ``args.count`` devices over worker processes of at most ``--per-process`` each; wait for them all,
    passing SIGTERM/SIGINT on."""
    procs: list[subprocess.Popen[bytes]] = []
    for first in range(args.first, args.first + args.count, args.per_process):
        n = min(args.per_process, args.first + args.count - first)
        cmd = [sys.executable, "-m", "mqttfl.tools.cli", "virtual", "--config", args.config, "--count", str(n),
               "--first", str(first), "--per-process", str(args.per_process), "--prefix", args.prefix,
               "--edges", args.edges, "--mode", args.mode, *(["--fleet", args.fleet] if args.fleet else [])]
        procs.append(subprocess.Popen(cmd))

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def run(args: argparse.Namespace) -> int:
    if args.count < 1 or not 1 <= args.per_process <= PER_PROCESS:
        print(f"mqttfl virtual: --count must be at least 1 and --per-process 1..{PER_PROCESS}", file=sys.stderr)
        return 2
    if args.count > args.per_process:
        return run_workers(args)
    try:
        template = load_config(args.config, "device", node=f"{args.prefix}{args.first}", fleet=args.fleet)
        edges = [e for e in args.edges.split(",") if e] or [str(template.section.get("edge", ""))]
        if not all(edges):
            raise ConfigError("no edge: give --edges or [device] edge")
        setup_logging(template.log_level)
        configs = virtual_configs(template, args.count, args.prefix, edges, args.first)
        fleet = VirtualFleet(configs, replay=args.mode == "replay")
    except (ConfigError, ValueError, OSError) as e:
        print(f"mqttfl virtual: cannot start: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, fleet.stop)
    signal.signal(signal.SIGINT, fleet.stop)
    try:
        fleet.start()
    except TransportError as e:
        print(f"mqttfl virtual: {e}", file=sys.stderr)
        return 3
    print(f"mqttfl virtual: {args.count} devices online in {fleet.online_s:.1f}s", file=sys.stderr, flush=True)
    fleet.run()
    return 0
