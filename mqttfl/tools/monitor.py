"""``mqttfl monitor``: a live table of every node of a fleet, from what the nodes publish anyway.

It subscribes to the fleet's broadcast ``status`` (retained, so every node shows up at once, including
offline ones), ``metrics`` and ``event`` topics. :class:`FleetView` keeps the state and knows nothing about
MQTT, so it is tested with hand-made messages:

- role, state, round: the node's retained status (the cloud's round is the number of completed rounds);
- seen: age of the newest message from the node (a retained status counts from its own ``ts``);
- accuracy: the cloud's per-round metrics, or the accuracy in its status when the monitor started later;
- throughput: the cloud's completed rounds per minute; for other nodes, bytes per second sent plus
  received, from the transport counters of two consecutive periodic agent metrics;
- drops: the ``transport.dropped`` counter of the periodic metrics, or the number of ``dropped`` events seen
  from the node when that is higher (events arrive at once, metrics every ``metrics_interval_s``);
- pipelines (docs/design.md, "Pipeline"): a pipelined device's chain and blocks per stage, the planner's
  predicted and the measured milliseconds per micro-batch of each stage, the bubble (the share of stage time
  spent idle in the last mini-batch) and the most micro-batches each stage stashed, from its ``pipeline`` and
  ``pipeline_step`` metrics.
- device classes: the system costs per class of the cloud's last round (``classes`` in its round metrics: the
  heterogeneous-IoT cost model's times and T, memory, bytes, energy, cutoffs), one line per class.

A large fleet is summarised: beyond ``--rows`` devices (default 40) the table lists the cloud and the edges,
and the devices as counts by state, the slowest devices of the latest round (their ``T_total`` in the cloud's
round metrics: every device's for a small round, the ``slowest`` few of a large one) and the devices offline;
``--json`` always carries every node and the same ``summary``.

Plain text, redrawn every ``--interval`` seconds (no curses); ``--once`` prints one table (or one JSON object
with ``--json``) after collecting for ``--interval`` seconds. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from mqttfl.runtime.config import ConfigError
from mqttfl.runtime.transport import Inbound, TransportError
from mqttfl.wire.topics import TopicError, filter_for

ROLE_ORDER = {"cloud": 0, "edge": 1, "device": 2}
# Event fields that identify the event rather than describe it.
_EVENT_META = {"event", "level", "node", "role", "ts"}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass
class NodeView:
    node: str
    role: str = ""
    state: str = ""
    round: Any = None
    last_seen: float | None = None  # wall clock, this host's
    accuracy: float | None = None
    loss: float | None = None
    bytes_s: float | None = None
    rounds_min: float | None = None
    dropped_counter: int = 0  # transport.dropped of the latest agent metrics
    dropped_events: int = 0
    rounds_done: int | None = None
    last_event: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)  # a pipelined device's layout and measurements
    _pipe_step: tuple[float, int] | None = None  # (elapsed_s, step) of the previous pipeline_step
    _bytes_sample: tuple[float, int] | None = None  # (sender ts, tx+rx bytes)
    _round_samples: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=20))  # (wall_s, round) of round metrics

    @property
    def drops(self) -> int:
        return max(self.dropped_counter, self.dropped_events)

    def row(self, now: float) -> dict[str, Any]:
        age = None if self.last_seen is None else round(max(0.0, now - self.last_seen), 1)
        return {
            "node": self.node, "role": self.role, "state": self.state, "round": self.round, "age_s": age,
            "accuracy": self.accuracy, "loss": self.loss,
            "bytes_s": None if self.bytes_s is None else round(self.bytes_s, 1),
            "rounds_min": None if self.rounds_min is None else round(self.rounds_min, 2),
            "drops": self.drops, "rounds_done": self.rounds_done, "last_event": self.last_event,
            **({"pipeline": dict(self.pipeline)} if self.pipeline else {}),
        }


class FleetView:
    """The monitor's state: one :class:`NodeView` per node plus the most recent events."""

    def __init__(self, fleet: str = "", *, max_events: int = 20) -> None:
        self.fleet = fleet
        self.nodes: dict[str, NodeView] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self.classes: dict[str, dict[str, Any]] = {}  # the last round's costs per device class
        self.classes_round: Any = None
        self.device_s: dict[str, float] = {}  # T_total of each device in the latest round metrics
        self.device_s_round: Any = None

    def update(self, msg: Inbound, now: float | None = None) -> None:
        data = msg.data
        if data is None:
            return  # tensors: not the monitor's business
        now = time.time() if now is None else now
        nv = self.nodes.get(msg.src)
        if nv is None:
            nv = self.nodes[msg.src] = NodeView(msg.src)
        if isinstance(data.get("role"), str) and data["role"]:
            nv.role = data["role"]
        seen: float | None = now
        if msg.retained:
            # A retained status may be hours old (a node that went offline): its own timestamp says when.
            ts = _number(data.get("ts"))
            seen = None if ts is None else min(ts, now)
        if seen is not None and (nv.last_seen is None or seen > nv.last_seen):
            nv.last_seen = seen
        if msg.kind == "status":
            self._status(nv, data)
        elif msg.kind == "metrics":
            self._metrics(nv, data)
        elif msg.kind == "event":
            self._event(nv, data, now)

    def _status(self, nv: NodeView, data: dict[str, Any]) -> None:
        nv.status = dict(data)
        nv.state = str(data.get("state", ""))
        if "round" in data:
            nv.round = data["round"]
        acc = _number(data.get("accuracy"))
        if acc is not None:
            nv.accuracy = acc

    def _metrics(self, nv: NodeView, data: dict[str, Any]) -> None:
        kind = data.get("kind")
        if kind == "round" and isinstance(data.get("classes"), dict):
            self.classes = {str(k): v for k, v in data["classes"].items() if isinstance(v, dict)}
            self.classes_round = data.get("round")
        if kind == "round":
            acc, loss = _number(data.get("accuracy")), _number(data.get("loss"))
            if acc is not None:
                nv.accuracy = acc
            if loss is not None:
                nv.loss = loss
            devices = data.get("devices")
            if isinstance(devices, dict):
                self.device_s = {d: t for d, c in devices.items()
                                 if isinstance(c, dict) and (t := _number(c.get("T_total"))) is not None}
                self.device_s_round = data.get("round")
            elif isinstance(data.get("slowest"), list):  # a large round's metrics name only its slowest devices
                self.device_s = {str(r["device"]): t for r in data["slowest"] if isinstance(r, dict)
                                 and "device" in r and (t := _number(r.get("T_total"))) is not None}
                self.device_s_round = data.get("round")
            wall, rnd, round_s = _number(data.get("wall_s")), data.get("round"), _number(data.get("round_s"))
            if wall is not None and isinstance(rnd, int):
                samples = nv._round_samples
                if samples and (rnd <= samples[-1][1] or wall <= samples[-1][0]):
                    samples.clear()  # a new run (or a restarted cloud) restarts the rate
                samples.append((wall, rnd))
                if len(samples) >= 2:
                    (w0, r0), (w1, r1) = samples[0], samples[-1]
                    nv.rounds_min = 60.0 * (r1 - r0) / (w1 - w0)
                elif round_s:
                    nv.rounds_min = 60.0 / round_s
        elif kind == "agent":
            transport = data.get("transport")
            if isinstance(transport, dict):
                dropped = transport.get("dropped", 0)
                if isinstance(dropped, int):
                    nv.dropped_counter = dropped
                total = sum(int(transport.get(k, 0) or 0) for k in ("tx_bytes", "rx_bytes"))
                ts = _number(data.get("ts"))
                if ts is not None:
                    prev = nv._bytes_sample
                    if prev is not None and ts > prev[0] and total >= prev[1]:
                        nv.bytes_s = (total - prev[1]) / (ts - prev[0])
                    nv._bytes_sample = (ts, total)  # a lower total means the agent restarted: start over
            if isinstance(data.get("rounds_done"), int):
                nv.rounds_done = data["rounds_done"]
        elif kind == "pipeline":
            nv.pipeline = {k: data.get(k) for k in ("chain", "blocks", "epoch", "predicted_ms", "predicted_bubble",
                                                    "micro_batches", "stash_bound", "reason")}
            nv._pipe_step = None
        elif kind == "pipeline_step" and nv.pipeline:
            self._pipeline_step(nv, data)

    def _pipeline_step(self, nv: NodeView, data: dict[str, Any]) -> None:
        elapsed, step, stage_ms = _number(data.get("elapsed_s")), data.get("step"), data.get("stage_ms")
        nv.pipeline["stage_ms"] = stage_ms
        nv.pipeline["stash"] = data.get("stash")
        if elapsed is None or not isinstance(step, int) or not isinstance(stage_ms, list):
            return
        prev = nv._pipe_step
        nv._pipe_step = (elapsed, step)
        m, stages = nv.pipeline.get("micro_batches"), len(stage_ms)
        if prev is None or step <= prev[1] or elapsed <= prev[0] or not isinstance(m, int) or not stages:
            return
        batch_s = (elapsed - prev[0]) / (step - prev[1])
        busy = m * sum(float(t) for t in stage_ms) / 1000.0
        nv.pipeline["bubble"] = round(max(0.0, 1.0 - busy / (stages * batch_s)), 3)

    def _event(self, nv: NodeView, data: dict[str, Any], now: float) -> None:
        name = str(data.get("event", "?"))
        nv.last_event = name
        if name == "dropped":
            nv.dropped_events += 1
        ts = _number(data.get("ts"))
        entry = {"ts": ts if ts is not None else now, "node": nv.node, "event": name,
                 "level": str(data.get("level", "info"))}
        entry.update({k: v for k, v in data.items() if k not in _EVENT_META})
        self.events.append(entry)

    # ------------------------------------------------------------------ views
    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        ordered = sorted(self.nodes.values(), key=lambda n: (ROLE_ORDER.get(n.role, 3), n.node))
        return [n.row(now) for n in ordered]

    def summary(self, slowest: int = 5) -> dict[str, Any]:
        """The devices at a glance: how many in each state, the slowest of the latest round, those offline."""
        devices = [n for n in self.nodes.values() if n.role == "device"]
        by_state = collections.Counter(n.state or "-" for n in devices)
        slow = sorted(self.device_s.items(), key=lambda kv: -kv[1])[:slowest]
        return {"devices": len(devices), "by_state": dict(sorted(by_state.items())), "round": self.device_s_round,
                "slowest": [{"node": d, "T_total": t} for d, t in slow],
                "offline": sorted(n.node for n in devices if n.state == "offline")}

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {"fleet": self.fleet, "ts": now, "nodes": {r["node"]: r for r in self.rows(now)},
                "events": list(self.events), "classes": dict(self.classes), "summary": self.summary()}

    def render(self, now: float | None = None, *, connected: bool = True, max_rows: int = 40) -> str:
        """The table; beyond ``max_rows`` devices, their summary instead of a row each."""
        now = time.time() if now is None else now
        rows = self.rows(now)
        online = sum(1 for r in rows if r["state"] not in ("offline", ""))
        summarised = sum(1 for r in rows if r["role"] == "device") > max_rows
        if summarised:
            rows = [r for r in rows if r["role"] != "device"]
        header = (f"fleet {self.fleet}: {len(rows)} nodes, {online} online   "
                  f"{time.strftime('%H:%M:%S', time.localtime(now))}" + ("" if connected else "   (disconnected)"))
        cols = ["NODE", "ROLE", "STATE", "ROUND", "SEEN", "ACCURACY", "THROUGHPUT", "DROPS", "LAST EVENT"]
        table = [cols] + [[
            r["node"], r["role"] or "-", r["state"] or "-", _cell(r["round"]),
            "-" if r["age_s"] is None else _age(r["age_s"]),
            "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}", _throughput(r), str(r["drops"]),
            r["last_event"] or "-",
        ] for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
        lines = [header, ""] + ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                                for line in table]
        pipes = [r for r in rows if r.get("pipeline")]
        if pipes:
            lines += ["", "pipelines (stage: blocks, predicted / measured ms per micro-batch, stash / bound):"]
            for r in pipes:
                p = r["pipeline"]
                chain, blocks = p.get("chain") or [], p.get("blocks") or []
                pred, meas = p.get("predicted_ms") or [], p.get("stage_ms") or []
                stash, bound = p.get("stash") or [], p.get("stash_bound") or []
                stages = [f"{n} [{blocks[k]},{blocks[k + 1]}) {_at(pred, k)}/{_at(meas, k)} ms "
                          f"{_at(stash, k)}/{_at(bound, k)}" for k, n in enumerate(chain) if k + 1 < len(blocks)]
                bubble = p.get("bubble", p.get("predicted_bubble"))
                lines.append(f"  {r['node']}: epoch {p.get('epoch')}, bubble {_cell(bubble)}: " + " | ".join(stages))
        if self.classes:
            lines += ["", f"device classes (round {_cell(self.classes_round)}; seconds, MB, joules):", ""]
            lines += _table(CLASS_COLUMNS, [[name, *(_cost(k, c.get(k)) for _, k in CLASS_COLUMNS[1:])]
                                            for name, c in sorted(self.classes.items())])
        if summarised:
            lines += ["", *self._summary_lines()]
        if self.events:
            lines += ["", "recent events:"]
            for e in list(self.events)[-10:]:
                detail = " ".join(f"{k}={_cell(v)}" for k, v in e.items()
                                  if k not in _EVENT_META and k != "detail")
                if "detail" in e:
                    detail += f" detail={_cell(e['detail'])}"
                stamp = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
                line = f"  {stamp} {e['node']:<10} {e['level']:<7} {e['event']} {detail}".rstrip()
                lines.append(line if len(line) <= 160 else line[:157] + "...")
        return "\n".join(lines)

    def _summary_lines(self) -> list[str]:
        sm = self.summary()
        states = ", ".join(f"{k} {v}" for k, v in sm["by_state"].items())
        lines = [f"devices: {sm['devices']} ({states})"]
        if sm["slowest"]:
            slow = ", ".join(f"{x['node']} {x['T_total']:.2f}s" for x in sm["slowest"])
            lines.append(f"slowest in round {_cell(sm['round'])}: {slow}")
        if sm["offline"]:
            more = len(sm["offline"]) - 10
            lines.append("offline: " + " ".join(sm["offline"][:10]) + (f" (+{more})" if more > 0 else ""))
        return lines


CLASS_COLUMNS = [("CLASS", ""), ("DEVICES", "devices"), ("T_LOCAL", "T_local"), ("T_UP", "T_upload"),
                 ("T_GLOBAL", "T_global"), ("T_DOWN", "T_download"), ("T", "T"), ("T_MAX", "T_max"),
                 ("PEAK_MB", "peak_rss_mb"), ("TRAIN_MB", "train_mem_mb"), ("MB_UP", "bytes_up"),
                 ("MB_DOWN", "bytes_down"), ("ENERGY_J", "energy_j"), ("CUTOFFS", "cutoffs")]


def _cost(key: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    if key.startswith("bytes"):
        return f"{v / 1e6:.2f}"
    return str(v) if isinstance(v, int) else f"{v:.3g}"


def _table(columns: list[tuple[str, str]], rows: list[list[str]]) -> list[str]:
    table = [[c for c, _ in columns], *rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)


def _at(values: list[Any], k: int) -> str:
    return _cell(values[k]) if k < len(values) else "-"


def _age(s: float) -> str:
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"


def _throughput(r: dict[str, Any]) -> str:
    if r["rounds_min"] is not None:
        return f"{r['rounds_min']:.2f} rnd/min"
    b = r["bytes_s"]
    if b is None:
        return "-"
    for unit in ("B/s", "kB/s", "MB/s"):
        if b < 1000 or unit == "MB/s":
            return f"{b:.0f} {unit}" if unit == "B/s" else f"{b:.1f} {unit}"
        b /= 1000
    return "-"


# ---------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    from mqttfl.tools.ctl import add_connection_arguments

    p.description = "Live view of every node of a fleet: presence, rounds, accuracy, throughput, drops, events."
    add_connection_arguments(p, default_as="monitor")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between redraws; with --once, how long to collect before printing")
    p.add_argument("--once", action="store_true", help="collect for --interval seconds, print once, exit")
    p.add_argument("--json", action="store_true", help="print JSON {fleet, ts, nodes, events} instead of a table "
                   "(one object per line in live mode)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker connection")
    p.add_argument("--rows", type=int, default=40, help="beyond this many devices, summarise them (counts by "
                   "state, slowest, offline) instead of a row each")


def run(args: argparse.Namespace) -> int:
    from mqttfl.tools.ctl import EXIT_NO_REPLY, EXIT_OK, EXIT_USAGE, ToolTransport, tool_config

    try:
        if args.interval <= 0 or args.timeout <= 0:
            raise ConfigError("--interval and --timeout must be > 0")
        cfg = tool_config(args, "monitor", "monitor")
    except (ConfigError, TopicError) as e:
        print(f"mqttfl monitor: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Exactly the kinds shown; an agent's inbox filter would also pull in broadcast models.
    filters = [filter_for(cfg.fleet, kind, dst="all") for kind in ("status", "metrics", "event")]
    transport = ToolTransport(cfg, filters=filters)
    try:
        transport.start(timeout=args.timeout)
    except TransportError as e:
        print(f"mqttfl monitor: {e}", file=sys.stderr)
        return EXIT_NO_REPLY
    view = FleetView(cfg.fleet)
    clear = sys.stdout.isatty() and not args.json
    try:
        next_draw = time.monotonic() + args.interval
        while True:
            msg = transport.get(timeout=max(0.0, next_draw - time.monotonic()))
            if msg is not None:
                view.update(msg)
            if time.monotonic() < next_draw:
                continue
            if args.json:
                print(json.dumps(view.snapshot(), sort_keys=True, default=str), flush=True)
            else:
                text = view.render(connected=transport.connected, max_rows=args.rows)
                print(("\x1b[H\x1b[2J" if clear else "") + text + ("" if clear or args.once else "\n"), flush=True)
            if args.once:
                return EXIT_OK
            next_draw = time.monotonic() + args.interval
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        transport.close()
