"""``mqttfl virtual``: many device machines in one process, each a full MQTT client of its own.

A load generator for the real broker, edges and cloud: every virtual device is a :class:`mqttfl.runtime.node.Node`
built like the device agent's (``mqttfl.runtime.device``) with its own client id, persistent session, retained
presence and last will, subscribed to its own inbox only. They share one opened shard and one loaded torch, and
one thread serves every client's socket (one epoll :class:`mqttfl.runtime.netloop.SocketLoop`, no network thread
per client) and steps the nodes that received something. ``--mode train`` trains the config's
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
from mqttfl.runtime.journal import Journal
from mqttfl.runtime.log import setup_logging
from mqttfl.runtime.netloop import SocketLoop, raise_fd_limit
from mqttfl.runtime.node import Node, Shutdown
from mqttfl.runtime.transport import TransportError

# One network loop serves every client of a process (mqttfl/runtime/netloop.py: epoll, no select() limit on descriptor
# numbers, no thread per client). A process steps its nodes on one core; the default spreads a larger fleet over
# worker processes of this many, so a 1,000-device fleet fits one process and a larger one uses more cores.
PER_PROCESS = 1000
MAX_PER_PROCESS = 10_000
FDS_PER_DEVICE = 3  # its socket, its state directory's lock, slack for the outbox's files while written
# An idle virtual device's timers are looked at every CHORES_S (an agent's loop wakes every 50 ms); the rest of its
# housekeeping (re-sends after 5 s, metrics every 10 s, expired transfers, refusals) runs every IDLE_CHORES_S: at
# 1,000 devices a full housekeeping of everyone ten times a second was a tenth of the process's CPU.
CHORES_S = 0.1
IDLE_CHORES_S = 1.0
STEP_BATCH = 16  # messages a node takes in one turn, so that no node starves the others


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
    """The nodes of ``configs`` in this process, all served by one :class:`SocketLoop` on the calling thread;
    :meth:`start` brings them online, :meth:`run` steps them."""

    def __init__(self, configs: list[AgentConfig], *, replay: bool) -> None:
        need = FDS_PER_DEVICE * len(configs) + 64
        if (have := raise_fd_limit(need)) < need:
            raise ValueError(f"{len(configs)} devices need about {need} open files and this process may open {have} "
                             "(raise the hard limit, ulimit -Hn, or lower --per-process)")
        sec: DeviceSection = parse_section(DeviceSection, configs[0].section, "device")
        data = open_shard(sec.data)
        held_out = open_shard(sec.eval_data) if sec.eval_data else None
        self.loop = SocketLoop()
        # One journal for the process's nodes (their outboxes, each under its node id), synced by the loop once
        # before it writes: a turn in which a hundred devices send their updates costs one fdatasync, not a
        # hundred (docs/design.md, "The journal"). Named after the range, so a restarted process finds it.
        base = Path(configs[0].state_dir).parent if configs[0].state_dir else None
        self.journal = (Journal(base / f"virtual-{configs[0].node}-{configs[-1].node}.journal")
                        if base is not None else None)
        self.nodes: list[Node] = [build_device(c, data=data, held_out=held_out, replay=replay, driver=self.loop,
                                               journal=self.journal) for c in configs]
        self.running = True
        self.online_s: float | None = None

    def start(self, connect_timeout: float = 60.0) -> None:
        """Connect every client at once (the loop serves the handshakes together), then start each node."""
        t0 = time.monotonic()
        for n in self.nodes:
            n.transport.start(timeout=None)
        for n in self.nodes:
            n.go_online(max(1.0, t0 + connect_timeout - time.monotonic()))
        self.online_s = time.monotonic() - t0

    def run(self) -> None:
        """Serve the sockets and step the nodes until asked to stop (or every node was shut down by command). A
        node whose client received something (a message, a link change) is stepped as its own loop would, a few
        messages a turn; an idle one when a timer of its falls due, and for its other housekeeping every
        ``IDLE_CHORES_S``, so that a process of thousands of idle nodes does not spin."""
        live = {id(n.transport): n for n in self.nodes}
        pending: set[Node] = set()  # nodes that may have more messages queued
        chores_at = time.monotonic() + CHORES_S
        idle_chores_at = time.monotonic() + IDLE_CHORES_S
        try:
            while self.running and live:
                wait = 0.0 if pending else max(0.0, min(chores_at, self.loop.next_tend()) - time.monotonic())
                self.loop.poll(wait)
                while self.loop.ready:
                    ready = live.get(id(self.loop.ready.pop()))
                    if ready is not None:
                        pending.add(ready)
                now = time.monotonic()
                turn = pending
                if now >= chores_at:
                    chores_at = now + CHORES_S
                    everyone = now >= idle_chores_at
                    if everyone:
                        idle_chores_at = now + IDLE_CHORES_S
                    turn = pending | {n for n in live.values()
                                      if everyone or (n.timers and min(n.timers.values()) <= now)}
                for n in list(turn):
                    try:
                        more = self._turn(n)
                    except Shutdown:
                        n.stop()
                        del live[id(n.transport)]
                        more = False
                    if not more:
                        pending.discard(n)
        finally:
            for n in live.values():
                n.stop()
            self.loop.close()
            if self.journal is not None:
                self.journal.close()

    @staticmethod
    def _turn(n: Node) -> bool:
        """Up to ``STEP_BATCH`` messages of one node (its housekeeping with the first); whether it may have more."""
        chores = True
        for _ in range(STEP_BATCH):
            if not n.step(timeout=0.0, chores=chores):
                return False
            chores = False
        return True

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
                   help=f"devices per process (default {PER_PROCESS}, at most {MAX_PER_PROCESS}; each needs about "
                        f"{FDS_PER_DEVICE} open files, the soft limit is raised up to the hard one); more are spread "
                        "over worker processes, one core each")
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
    if args.count < 1 or not 1 <= args.per_process <= MAX_PER_PROCESS:
        print(f"mqttfl virtual: --count must be at least 1 and --per-process 1..{MAX_PER_PROCESS}", file=sys.stderr)
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
