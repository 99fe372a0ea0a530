"""Cloud agent: owns the global model and runs synchronous rounds (FedAvg across edges).

Each round: pick the online devices whose edge is online, announce the round to those edges with the full
global model, wait until every edge reported or the deadline passed, check the quorum, apply the
sample-weighted mean of the edge deltas, evaluate, persist atomically, publish metrics. Below quorum the
round is retried (a new attempt with the same model) up to ``max_attempts`` times, then the run fails with
an event. After kill -9 the cloud restarts the round it was in, from the model it had persisted.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud_agent.async_mode import AsyncMode
from mqttfl.runtime.agent import Agent, CommandError, arg
from mqttfl.fl.aggregate import apply_delta, weighted_average
from mqttfl.runtime.config import AgentConfig
from mqttfl.ml.data import load_shard
from mqttfl.ml.models import build_model, load_model_state, model_info, model_state
from mqttfl.runtime.persist import load_state, save_state
from mqttfl.protocol.messages import FORMAT_VERSION, Plan, ProtocolError, check_state
from mqttfl.ml.stage import evaluate
from mqttfl.runtime.transport import Inbound

# Run parameters an operator may change with the `set` command, and their checks.
SETTABLE: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "rounds": (int, lambda v: v >= 0),
    "lr": ((int, float), lambda v: v > 0),
    "momentum": ((int, float), lambda v: 0 <= v < 1),
    "epochs": (int, lambda v: v >= 1),
    "batch_size": (int, lambda v: v >= 1),
    "micro_batches": (int, lambda v: v >= 1),
    "deadline_s": ((int, float), lambda v: v > 0),
    "quorum": ((int, float), lambda v: 0 < v <= 1),
    "min_devices": (int, lambda v: v >= 1),
    "max_attempts": (int, lambda v: v >= 1),
    "max_versions": (int, lambda v: v >= 0),
    "group_deadline_s": ((int, float), lambda v: v > 0),
    "regroup_every": (int, lambda v: v >= 0),
}


@dataclass
class Settings:
    run: str = ""
    model: str = "vgg5"
    input_shape: tuple[int, ...] = (3, 32, 32)
    num_classes: int = 10
    rounds: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 100
    micro_batches: int = 1
    deadline_s: float = 120.0
    quorum: float = 0.5
    max_attempts: int = 3
    min_devices: int = 1
    cut: int = -1
    seed: int = 0
    test_data: str = ""
    autostart: bool = True
    # Asynchronous group aggregation (cloud_agent/async_mode.py, docs/async.md).
    mode: str = "sync"  # sync | async
    strategy: str = "ecofl"  # ecofl | fedasync | fedbuff | fedat | sync
    num_groups: int = 3
    alpha: float = 0.6
    staleness: str = "polynomial"  # polynomial | constant | hinge
    fedbuff_k: int = 4
    group_deadline_s: float = 60.0
    max_versions: int = 50
    regroup_every: int = 10
    lam: float = 1.0
    latency_ema: float = 0.3  # weight of a new latency measurement in the moving average
    profile_rounds: int = 2  # synchronous rounds with everyone before grouping; the last one's latencies count

    @classmethod
    def from_section(cls, sec: dict[str, Any]) -> Settings:
        names = {f.name for f in fields(cls)}
        unknown = set(sec) - names
        if unknown:
            raise ValueError(f"[cloud]: unknown keys {sorted(unknown)}")
        s = cls(**sec)
        s.input_shape = tuple(int(v) for v in s.input_shape)
        return s


@dataclass
class CloudRound:
    plan: Plan
    edges: dict[str, list[str]]  # edge -> its participating devices
    deadline: float
    started: float
    # One entry per edge report: (edge, body, delta or None). An edge may report twice in one round when
    # a device migrated to it after it had already reported its own devices.
    reports: list[tuple[str, dict[str, Any], dict[str, np.ndarray] | None]] = field(default_factory=list)
    accounted: set[str] = field(default_factory=set)  # devices some edge reported done or missing

    @property
    def expected(self) -> set[str]:
        return {d for ds in self.edges.values() for d in ds}

    def move(self, device: str, edge: str) -> None:
        for ds in self.edges.values():
            if device in ds:
                ds.remove(device)
        self.edges.setdefault(edge, []).append(device)


class CloudAgent(Agent):
    role = "cloud"

    def __init__(self, cfg: AgentConfig) -> None:
        sec = dict(cfg.section)
        self.settings = Settings.from_section(sec)
        super().__init__(cfg, cloud_id=cfg.node)
        if not self.settings.run:
            self.settings.run = f"run-{uuid.uuid4().hex[:8]}"
        info = model_info(self.settings.model, self.settings.input_shape, self.settings.num_classes)
        self.n_blocks = info.n_blocks
        self.default_cut = info.default_cut if self.settings.cut < 0 else self.settings.cut
        self.model = build_model(self.settings.model, num_classes=self.settings.num_classes,
                                 input_shape=self.settings.input_shape, seed=self.settings.seed)
        self.global_state = model_state(self.model)
        self.round = 0
        self.attempt = 0
        self.failures = 0
        self.history: list[dict[str, Any]] = []
        self.state = "running" if self.settings.autostart else "idle"
        self.fleet: dict[str, dict[str, Any]] = {}
        self.current: CloudRound | None = None
        self.test = load_shard(self.settings.test_data) if self.settings.test_data else None
        self.run_started = time.time()
        self.state_path = self.state_dir / "cloud.state" if self.state_dir else None
        self.runlog = self.state_dir / "runlog.jsonl" if self.state_dir else None
        self.async_saved: dict[str, Any] | None = None
        self.resumed = self._restore()
        if self.settings.mode not in ("sync", "async"):
            raise ValueError(f"[cloud] mode must be 'sync' or 'async', got {self.settings.mode!r}")
        self.async_mode = AsyncMode(self) if self.settings.mode == "async" else None
        self.commands.update(start=self.cmd_start, stop=self.cmd_stop, pause=self.cmd_pause,
                             resume=self.cmd_resume, set=self.cmd_set, fleet=self.cmd_fleet,
                             history=self.cmd_history, move=self.cmd_move)

    # ------------------------------------------------------------------ persistence
    def _restore(self) -> bool:
        if self.state_path is None:
            return False
        saved = load_state(self.state_path)
        if not saved:
            return False
        if saved.get("format") != FORMAT_VERSION:
            raise ValueError(f"{self.state_path}: state format {saved.get('format')} not supported")
        check_state(saved["global"], self.global_state, "persisted global model")
        self.global_state = saved["global"]
        self.round = int(saved["round"])
        # The round in flight at the crash starts over as a new attempt: devices that finished the old
        # attempt recognise a new plan key and train again instead of ignoring a re-delivered announcement.
        self.attempt = int(saved.get("attempt", 0)) + 1
        self.failures = int(saved.get("failures", 0))
        self.history = list(saved.get("history", []))
        self.async_saved = saved.get("async")
        self.state = str(saved.get("state", self.state))
        for k, v in saved.get("settings", {}).items():
            if hasattr(self.settings, k):
                setattr(self.settings, k, tuple(v) if k == "input_shape" else v)
        self.log.info("resumed", run=self.settings.run, round=self.round, state=self.state)
        return True

    def persist(self) -> None:
        if self.state_path is None:
            return
        s = {f.name: getattr(self.settings, f.name) for f in fields(Settings)}
        save_state(self.state_path, {
            "format": FORMAT_VERSION, "round": self.round, "attempt": self.attempt, "failures": self.failures,
            "global": self.global_state,
            "state": self.state,
            "history": self.history, "settings": s, "saved_at": time.time(),
            "async": self._async_state(),
        })

    def _async_state(self) -> dict[str, Any] | None:
        mode = getattr(self, "async_mode", None)  # persist() may run before async mode exists
        return mode.state_dict() if mode is not None else None

    # ------------------------------------------------------------------ fleet view
    def initial_status(self) -> dict[str, Any]:
        return {"state": "starting"}

    def on_start(self) -> None:
        self.transport.set_status(self.state, run=self.settings.run, round=self.round)
        if self.resumed:
            self.transport.event("resumed", run=self.settings.run, round=self.round)

    def handle(self, msg: Inbound) -> None:
        if msg.kind == "status" and msg.data is not None:
            self.fleet[msg.src] = {**msg.data, "last_seen": time.time()}
            if self.async_mode is not None:
                self.async_mode.on_status(msg.src, msg.data)
        elif msg.kind == "ckpt" and msg.env is not None and msg.env.body.get("op") == "restart":
            self.on_restart_request(msg)
        elif msg.kind == "delta" and msg.env is not None:
            (self.async_mode.on_edge_delta if self.async_mode is not None else self.on_edge_delta)(msg)

    def online(self, role: str) -> dict[str, dict[str, Any]]:
        return {n: s for n, s in self.fleet.items() if s.get("role") == role and s.get("state") != "offline"}

    # ------------------------------------------------------------------ rounds
    def tick(self, now: float) -> None:
        if self.async_mode is not None:
            self.async_mode.tick(now)
            return
        if self.current is not None:
            r = self.current
            if self.accounted(r) or now >= r.deadline:
                self.close_round(now)
            return
        if self.state != "running":
            return
        if self.round >= self.settings.rounds:
            self.complete()
            return
        edges = self.online("edge")
        devices = {d: s for d, s in self.online("device").items() if s.get("edge") in edges}
        if len(devices) >= self.settings.min_devices:
            self.start_round(devices, now)

    def plan(self) -> Plan:
        # Every plan field the settings carry, by name: a field added to Plan and Settings needs no copying here.
        shared = {f.name: getattr(self.settings, f.name) for f in fields(Plan) if hasattr(self.settings, f.name)}
        return Plan(**{**shared, "round": self.round, "attempt": self.attempt})

    def cut_for(self, status: dict[str, Any]) -> int:
        cut = int(status.get("cut", -1))
        return cut if 0 <= cut <= self.n_blocks else self.default_cut

    def start_round(self, devices: dict[str, dict[str, Any]], now: float) -> None:
        plan = self.plan()
        by_edge: dict[str, list[str]] = {}
        for d, s in sorted(devices.items()):
            by_edge.setdefault(str(s["edge"]), []).append(d)
        self.current = CloudRound(plan, by_edge, deadline=now + plan.deadline_s, started=now)
        for edge, devs in by_edge.items():
            body = {"plan": plan.to_body(), "devices": {d: {"cut": self.cut_for(devices[d])} for d in devs}}
            self.transport.send("model", edge, body=body, tensors=self.global_state, run=plan.run,
                                round=plan.round)
        self.transport.set_status("running", run=plan.run, round=plan.round, attempt=plan.attempt)
        self.transport.event("round_started", run=plan.run, round=plan.round, attempt=plan.attempt,
                             edges=by_edge)
        self.log.info("round start", round=plan.round, attempt=plan.attempt, edges=by_edge)

    def accounted(self, r: CloudRound) -> bool:
        """Every device of the round is reported done or missing by some edge. Counted per device, not per
        edge: a device that moved mid-round is reported by its new edge."""
        return r.expected <= r.accounted

    def on_edge_delta(self, msg: Inbound) -> None:
        env = msg.env
        assert env is not None
        r = self.current
        is_edge = msg.src in (r.edges if r else {}) or self.fleet.get(msg.src, {}).get("role") == "edge"
        if r is None or not is_edge or env.run != r.plan.run or env.round != r.plan.round or \
                env.body.get("attempt") != r.plan.attempt:
            if r is None or env.round <= self.round or env.run != self.settings.run:
                self.transport.ack(msg)  # stale re-send: acknowledge so the edge stops, apply nothing
            self.transport.drop("wrong_round", f"delta from {msg.src} for {env.run}/{env.round}", str(msg.topic))
            return
        done = set(dict(env.body.get("devices", {})))
        if done & {d for _, b, _ in r.reports for d in b.get("devices", {})}:
            self.transport.ack(msg)  # these devices were already applied from an earlier report
            return
        try:
            samples = int(env.body.get("samples", 0))
            if samples < 0:
                raise ProtocolError("bad_field", "negative samples")
            if samples > 0:
                check_state(dict(env.tensors), self.global_state, f"delta of {msg.src}")
        except (ProtocolError, ValueError, TypeError) as e:
            self.transport.drop(getattr(e, "code", "bad_field"), str(e), str(msg.topic))
            return
        delta = {k: np.array(v) for k, v in env.tensors.items()} if samples > 0 else None
        r.reports.append((msg.src, dict(env.body), delta))
        # "Missing" counts only from the edge the device is assigned to now: after a restart elsewhere, the
        # old edge's timed-out session must not close the round before the device reports from its new edge.
        missing = {d for d in env.body.get("missing", []) if d in r.edges.get(msg.src, [])}
        r.accounted |= done | missing
        self.transport.ack(msg)

    def close_round(self, now: float) -> None:
        r = self.current
        assert r is not None
        self.current = None
        expected = len(r.expected)
        reports = {d: rep for _, body, _ in r.reports for d, rep in body.get("devices", {}).items()}
        edge_of = {d: e for e, body, _ in r.reports for d in body.get("devices", {})}
        needed = max(1, int(np.ceil(self.settings.quorum * expected)))
        deltas = [(delta, float(body["samples"])) for _, body, delta in r.reports if delta is not None]
        if len(reports) < needed or not deltas:
            self.attempt += 1
            self.failures += 1  # quorum misses only: attempts started by a cloud restart do not count
            failed = self.failures >= self.settings.max_attempts
            self.transport.event("quorum_not_met", level="error" if failed else "warning", run=r.plan.run,
                                 round=r.plan.round, reported=len(reports), needed=needed,
                                 attempt=r.plan.attempt, action="fail" if failed else "retry")
            self.log.warning("quorum not met", round=r.plan.round, reported=len(reports), needed=needed)
            if failed:
                self.state = "failed"
            # The next attempt's number is on disk before it is announced: after a crash the cloud opens a
            # fresh attempt, never one that devices may already have finished.
            self.persist()
            if failed:
                self.transport.set_status("failed", run=r.plan.run, round=self.round)
            return
        t0 = time.monotonic()
        mean = weighted_average(deltas)
        self.global_state = apply_delta(self.global_state, mean)
        t_global = time.monotonic() - t0
        accuracy, loss = self.evaluate()
        self.round += 1
        self.attempt = 0
        self.failures = 0
        entry = self.round_metrics(r, reports, accuracy, loss, t_global, now, edge_of)
        self.history.append(entry)
        del self.history[:-1000]  # bounded: the full record is the append-only run log
        self.persist()
        if self.runlog is not None:
            with open(self.runlog, "a") as f:
                f.write(json.dumps(entry) + "\n")
        self.transport.metrics(**entry)
        # self.state, not "running": a pause during the round must stay visible once the round closes.
        self.transport.set_status(self.state, run=r.plan.run, round=self.round, accuracy=accuracy)
        self.log.info("round done", round=r.plan.round, accuracy=accuracy, loss=loss,
                      devices=len(reports), round_s=entry["round_s"])

    def round_metrics(self, r: CloudRound, reports: dict[str, dict[str, Any]], accuracy: float | None,
                      loss: float | None, t_global: float, now: float,
                      edge_of: dict[str, str] | None = None) -> dict[str, Any]:
        devices = {}
        for d, rep in reports.items():
            devices[d] = {
                "T_local": round(float(rep.get("t_local", 0.0)), 4),
                "T_total": round(float(rep.get("t_total", rep.get("t_local", 0.0))), 4),
                "T_upload": round(float(rep.get("t_upload", 0.0)), 4),
                "T_global": round(t_global, 4),
                "T_download": round(float(rep.get("t_download", 0.0)), 4),
                "bytes_up": int(rep.get("bytes_up", 0)), "bytes_down": int(rep.get("bytes_down", 0)),
                "peak_rss_mb": rep.get("peak_rss_mb"), "samples": int(rep.get("samples", 0)),
                "cut": rep.get("cut"), "resends": rep.get("resends", 0), "steps": rep.get("steps"),
                "edge_steps": rep.get("edge_steps"), "seen": rep.get("seen"),
                "edge": (edge_of or {}).get(d),
            }
        return {
            "kind": "round", "run": r.plan.run, "round": r.plan.round, "attempt": r.plan.attempt,
            "accuracy": accuracy, "loss": loss, "participants": len(reports),
            "missing": sorted(r.expected - set(reports)),
            "round_s": round(now - r.started, 3), "wall_s": round(time.time() - self.run_started, 3),
            "bytes_up": sum(v["bytes_up"] for v in devices.values()),
            "bytes_down": sum(v["bytes_down"] for v in devices.values()),
            "devices": devices,
        }

    def evaluate(self) -> tuple[float | None, float | None]:
        if self.test is None:
            return None, None
        load_model_state(self.model, self.global_state)
        acc, loss = evaluate(self.model, torch.from_numpy(self.test.x), torch.from_numpy(self.test.y))
        return round(float(acc), 5), round(float(loss), 5)

    def complete(self) -> None:
        self.state = "done"
        self.persist()
        last = self.history[-1] if self.history else {}
        self.transport.set_status("done", run=self.settings.run, round=self.round, accuracy=last.get("accuracy"))
        self.transport.event("run_complete", run=self.settings.run, rounds=self.round,
                             accuracy=last.get("accuracy"), wall_s=round(time.time() - self.run_started, 2))
        self.log.info("run complete", rounds=self.round, accuracy=last.get("accuracy"))

    # ------------------------------------------------------------------ commands
    def cmd_status(self, msg: Inbound, args: dict[str, Any]) -> Any:
        base = super().cmd_status(msg, args)
        last = self.history[-1] if self.history else {}
        return {**base, "run": self.settings.run, "state": self.state, "round": self.round,
                "rounds": self.settings.rounds, "accuracy": last.get("accuracy"),
                "in_round": self.current is not None,
                **(self.async_mode.status() if self.async_mode is not None else {})}

    def cmd_start(self, msg: Inbound, args: dict[str, Any]) -> Any:
        if self.state == "running":
            raise CommandError("a run is already in progress", "busy")
        if args:
            self.cmd_set(msg, args)
        if self.state in ("done", "failed", "stopped") and self.round >= self.settings.rounds:
            raise CommandError(f"run {self.settings.run} finished its {self.settings.rounds} rounds; "
                               "raise 'rounds' to continue", "finished")
        self.state = "running"
        self.attempt += 1  # a fresh plan key: devices never mistake it for a round they already finished
        self.failures = 0
        self.persist()
        self.transport.set_status(self.state, run=self.settings.run, round=self.round)
        return {"state": self.state, "round": self.round}

    def cmd_stop(self, msg: Inbound, args: dict[str, Any]) -> Any:
        self.current = None  # the round in progress is abandoned; late deltas are acknowledged and dropped
        self.state = "stopped"
        self.persist()
        self.transport.set_status("stopped", run=self.settings.run, round=self.round)
        return {"state": self.state, "round": self.round}

    def cmd_pause(self, msg: Inbound, args: dict[str, Any]) -> Any:
        if self.state != "running":
            raise CommandError(f"cannot pause in state {self.state}", "bad_state")
        self.state = "paused"  # the round in progress completes; no new round starts
        self.persist()
        self.transport.set_status(self.state, run=self.settings.run, round=self.round)
        return {"state": self.state, "round": self.round}

    def cmd_resume(self, msg: Inbound, args: dict[str, Any]) -> Any:
        if self.state != "paused":
            raise CommandError(f"cannot resume in state {self.state}", "bad_state")
        self.state = "running"
        self.persist()
        self.transport.set_status(self.state, run=self.settings.run, round=self.round)
        return {"state": self.state, "round": self.round}

    def cmd_set(self, msg: Inbound, args: dict[str, Any]) -> Any:
        unknown = set(args) - set(SETTABLE)
        if unknown:
            raise CommandError(f"unknown parameter(s) {sorted(unknown)}; settable: {sorted(SETTABLE)}")
        checked = {k: arg(args, k, SETTABLE[k][0], check=SETTABLE[k][1]) for k in args}
        for k, v in checked.items():
            setattr(self.settings, k, v)
        self.persist()
        return {k: getattr(self.settings, k) for k in checked}

    def cmd_move(self, msg: Inbound, args: dict[str, Any]) -> Any:
        """Ask a device to move to another edge; the device answers the cloud, we answer the operator."""
        device = arg(args, "device", str)
        edge = arg(args, "edge", str)
        path = arg(args, "path", str, default="direct", check=lambda v: v in ("direct", "relay", "restart"))
        at_step = arg(args, "at_step", int, default=0, check=lambda v: v >= 0)
        if self.fleet.get(device, {}).get("role") != "device":
            raise CommandError(f"unknown device {device!r}", "unknown_node")
        if self.fleet.get(edge, {}).get("role") != "edge":
            raise CommandError(f"unknown edge {edge!r}", "unknown_node")
        self.transport.send_json("ctl", device, {"id": f"move-{uuid.uuid4().hex[:8]}", "cmd": "move",
                                                 "args": {"edge": edge, "path": path, "at_step": at_step}})
        return {"forwarded": True, "device": device, "edge": edge, "path": path}

    def on_restart_request(self, msg: Inbound) -> None:
        """Migration fallback: the device's source edge is gone with its edge-side state. Restart the
        device's part of the round at its new edge from the round's global model."""
        env = msg.env
        assert env is not None
        r = self.current
        dest = str(env.body.get("edge", ""))
        status = self.fleet.get(msg.src, {})
        if r is None or env.run != r.plan.run or env.round != r.plan.round or msg.src not in r.expected:
            self.transport.drop("wrong_round", f"restart request from {msg.src} for round {env.round}",
                                str(msg.topic))
            return
        if self.fleet.get(dest, {}).get("role") != "edge":
            self.transport.drop("unknown_node", f"restart at unknown edge {dest!r}", str(msg.topic))
            return
        r.move(msg.src, dest)
        r.accounted.discard(msg.src)
        body = {"plan": r.plan.to_body(), "devices": {msg.src: {"cut": self.cut_for(status)}}}
        self.transport.send("model", dest, body=body, tensors=self.global_state, run=r.plan.run, round=r.plan.round)
        self.transport.event("round_restarted_for_device", level="warning", device=msg.src, edge=dest,
                             round=r.plan.round, source=env.body.get("source"))

    def cmd_fleet(self, msg: Inbound, args: dict[str, Any]) -> Any:
        return self.fleet

    def cmd_history(self, msg: Inbound, args: dict[str, Any]) -> Any:
        return self.history[-int(args.get("last", 20)):]


def default_state_dir(node: str) -> Path:
    return Path.cwd() / "state" / node
