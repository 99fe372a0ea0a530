"""Device agent: owns its data, trains the input-side blocks, exchanges smashed data and gradients.

Within a mini-batch the device follows the 2-stage 1F1B schedule of :mod:`mqttfl.protocol.schedule`: up to
min(M, 3) micro-batches are in flight, so the device computes the next forward while the edge works and
the network carries the previous one. Gradients accumulate; the optimizer steps once per mini-batch.

Reliability: every act stays in ``outstanding`` until its gradient arrives. After a link comes back, or
when a gradient is overdue, the device re-sends the outstanding acts; the edge answers a re-sent act from
its gradient cache, so nothing is trained twice (exactly-once effect).
"""

from __future__ import annotations

import resource
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mqttfl.runtime.agent import Agent, CommandError, arg
from mqttfl.wire.codec import as_torch
from mqttfl.runtime.config import AgentConfig
from mqttfl.ml.data import BatchOrder, label_histogram, load_shard
from mqttfl.ml.models import Part, build_model, model_info, split_model
from mqttfl.protocol.schedule import one_f_one_b
from mqttfl.protocol.messages import Plan, ProtocolError, check_state, data_seed
from mqttfl.ml.stage import DeviceStage, LocalTrainer, make_optimizer, micro_batches
from mqttfl.wire.topics import validate_id
from mqttfl.runtime.transport import Inbound


class RoundAborted(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Progress:
    """Where a device is in its round: the data position that a migration must resume from."""

    step: int = 0  # mini-batches completed this round
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    outstanding: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, dict[str, Any]]] = field(default_factory=dict)
    grads: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    last_send: float = 0.0
    resends: int = 0
    total_steps: int = 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class DeviceAgent(Agent):
    role = "device"

    def __init__(self, cfg: AgentConfig) -> None:
        sec = cfg.section
        if "edge" not in sec or "data" not in sec:
            raise ValueError("[device] needs 'edge' and 'data'")
        self.edge = str(sec["edge"])
        self.data = load_shard(sec["data"])
        self.cut_pref = int(sec.get("cut", -1))
        self.act_timeout_s = float(sec.get("act_timeout_s", 10.0))
        self.migrate_timeout_s = float(sec.get("migrate_timeout_s", 10.0))
        self.slowdown = float(sec.get("slowdown", 1.0))  # emulate a slower board (benchmarks, tests)
        # Emulated board compute per mini-batch (seconds, scaled by slowdown): lets a fleet of many devices
        # share a small test machine without the shared CPU, rather than the boards, setting the pace.
        self.step_delay_s = float(sec.get("step_delay_s", 0.0))
        super().__init__(cfg, cloud_id=str(sec.get("cloud", "cloud")))
        self.model: torch.nn.Sequential | None = None
        self.model_key: tuple[Any, ...] | None = None
        self.pending: Inbound | None = None
        self.current: Plan | None = None
        self.done_keys: list[tuple[str, int, int]] = []
        self.progress = Progress()
        self._resend_now = False
        self._rx_mark = 0
        self.rounds_done = 0
        self.pending_move: tuple[str, str] | None = None
        self.previous_edge: str | None = None  # a round announced there before an idle move still counts
        self.idle_move: tuple[str, int] = ("direct", 0)  # path and at_step of that idle move
        self.move_at_step = 0  # a scheduled move waits for this many completed mini-batches
        self._first_start: dict[tuple[str, int, int], float] = {}
        self.migrations: list[dict[str, Any]] = []
        self.commands["train_stats"] = self.cmd_train_stats
        self.commands["set_edge"] = self.cmd_set_edge
        self.commands["move"] = self.cmd_move

    def initial_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"state": "idle", "edge": self.edge, "samples": len(self.data), "cut": self.cut_pref}
        if bool(self.cfg.section.get("share_labels", True)):
            # Eco-FL grouping uses the label mix; it reveals the device's class mix to the cloud, so a
            # device can opt out (share_labels = false) and is then grouped by latency alone.
            status["labels"] = label_histogram(self.data.y, int(self.cfg.section.get("num_classes", 10))).tolist()
        return status

    def metrics_fields(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done, "peak_rss_mb": round(peak_rss_mb(), 1)}

    def on_link(self, up: bool) -> None:
        super().on_link(up)
        if up and self.progress.outstanding:
            self._resend_now = True

    # ------------------------------------------------------------------ commands
    def cmd_train_stats(self, msg: Inbound, args: dict[str, Any]) -> Any:
        return {"rounds_done": self.rounds_done, "step": self.progress.step, "resends": self.progress.resends,
                "edge": self.edge, "migrations": self.migrations[-10:]}

    def cmd_move(self, msg: Inbound, args: dict[str, Any]) -> Any:
        """Move to another edge (FedFly). Idle: switch at once. Training: at the next mini-batch boundary,
        the edge-side state follows the device (``path`` direct = edge to edge, relay = through us)."""
        edge = arg(args, "edge", str)
        path = arg(args, "path", str, default="direct", check=lambda v: v in ("direct", "relay", "restart"),
                   why="direct, relay, or restart (drop the edge-side state and start the round over there)")
        at_step = arg(args, "at_step", int, default=0, check=lambda v: v >= 0)
        try:
            validate_id(edge)
        except ValueError as e:
            raise CommandError(str(e)) from e
        if edge == self.edge:
            cancelled = self.pending_move is not None
            self.pending_move = None  # moving back before the move happened: nothing to do
            return {"edge": edge, "moved": False, "reason": "already there", "cancelled": cancelled}
        if self.current is None:
            self.previous_edge = self.edge
            self.idle_move = (path, at_step)
            self.edge = edge
            self.transport.set_status("idle", edge=edge)
            self.transport.event("moved", device=self.node, destination=edge, during_round=False)
            return {"edge": edge, "moved": True, "when": "now (idle)"}
        self.pending_move = (edge, path)
        self.move_at_step = at_step
        when = f"mini-batch boundary {at_step}" if at_step > self.progress.step else "next mini-batch boundary"
        return {"edge": edge, "moved": False, "when": when, "path": path}

    def cmd_set_edge(self, msg: Inbound, args: dict[str, Any]) -> Any:
        edge = arg(args, "edge", str)
        if self.current is not None:
            raise CommandError("cannot change edge during a round; use 'move'", "busy")
        self.edge = edge
        self.transport.set_status("idle", edge=edge)
        return {"edge": edge}

    # ------------------------------------------------------------------ protocol
    def handle(self, first: Inbound) -> None:
        msg: Inbound | None = first
        while msg is not None:
            if msg.kind != "model":
                return  # stray grads or acks of an aborted round
            self.pending = None
            try:
                self.train_round(msg)
            except RoundAborted as e:
                self.log.warning("round aborted", reason=e.reason)
                self.transport.event("round_aborted", level="warning", reason=e.reason)
            finally:
                self.current = None
                self.progress = Progress()
                self._apply_move_between_rounds()
                self.transport.set_status("idle", round=None, edge=self.edge)
            msg = self.pending  # a newer model arrived while training

    def _accept_model(self, msg: Inbound) -> tuple[Plan, int, Part, Part] | None:
        env = msg.env
        assert env is not None
        if msg.src != self.edge:
            if msg.src != self.previous_edge:
                self.transport.drop("unknown_sender", f"model from {msg.src}, attached to {self.edge}",
                                    str(msg.topic))
                return None
            # The round was announced at the old edge before our move arrived there: train it there and
            # migrate as the move asked (path, and at_step or the first mini-batch boundary).
            self.pending_move = (self.edge, self.idle_move[0])
            self.move_at_step = self.idle_move[1]
            self.edge = msg.src
        self.previous_edge = None
        try:
            plan = Plan.from_body(env.body.get("plan", {}))
            cut = int(env.body.get("cut", -1))
            info = model_info(plan.model, plan.input_shape, plan.num_classes)
            if not 0 <= cut <= info.n_blocks:
                raise ProtocolError("bad_plan", f"cut {cut} outside 0..{info.n_blocks}")
            if plan.key in self.done_keys:
                return None  # a re-delivered announcement of a round we finished
            key = (plan.model, plan.input_shape, plan.num_classes)
            if self.model is None or self.model_key != key:
                self.model = build_model(plan.model, num_classes=plan.num_classes, input_shape=plan.input_shape)
                self.model_key = key
            dev, edge_part = split_model(self.model, cut)
            expected = dev.state()
            check_state(dict(env.tensors), expected, "device model")
        except (ProtocolError, ValueError, KeyError) as e:
            self.transport.drop(getattr(e, "code", "bad_model"), str(e), str(msg.topic))
            return None
        dev.load_state(env.tensors)
        return plan, cut, dev, edge_part

    def train_round(self, msg: Inbound) -> None:
        accepted = self._accept_model(msg)
        if accepted is None:
            return
        plan, cut, dev, _ = accepted
        assert self.model is not None and msg.env is not None
        self.current = plan
        t_download = max(0.0, time.time() - msg.env.ts)
        base = dev.state()
        stats0 = self.transport.stats_snapshot()
        self.transport.set_status("training", round=plan.round, run=plan.run, edge=self.edge)
        self.log.info("round start", round=plan.round, cut=cut, samples=len(self.data))
        t0 = time.monotonic()
        # One clock from the first start of this round, across a restart (FedFly's total training time).
        first = self._first_start.setdefault(plan.key, t0)
        while len(self._first_start) > 8:
            self._first_start.pop(next(iter(self._first_start)))
        local = cut == len(self.model)
        order = BatchOrder(len(self.data), plan.batch_size, seed=data_seed(plan.seed, self.node))
        if local:
            self._train_local(plan, order)
        else:
            self._train_split(plan, dev, order)
        t_local = time.monotonic() - t0
        stats1 = self.transport.stats_snapshot()
        delta = {k: (v - base[k]).astype(np.float32) for k, v in dev.state().items()}
        p = self.progress
        report = {
            "samples": len(self.data), "attempt": plan.attempt, "steps": p.step, "loss_sum": p.loss_sum,
            "correct": p.correct,
            "seen": p.seen, "cut": cut, "t_local": t_local, "t_download": t_download,
            "t_total": time.monotonic() - first,
            "bytes_up": stats1.get("tx_bytes", 0) - stats0.get("tx_bytes", 0),
            # Since the end of the previous round, so the model message that opened this one counts.
            "bytes_down": stats1.get("rx_bytes", 0) - self._rx_mark,
            "peak_rss_mb": round(peak_rss_mb(), 1), "resends": p.resends,
        }
        self.transport.send("delta", self.edge, body=report, tensors=delta, run=plan.run, round=plan.round,
                            reliable=True)
        self._rx_mark = stats1.get("rx_bytes", 0)
        self.done_keys = (self.done_keys + [plan.key])[-8:]
        self.rounds_done += 1
        self.log.info("round done", round=plan.round, steps=p.step, t_local=round(t_local, 2),
                      loss=round(p.loss_sum / max(p.seen, 1), 4))

    def _batches(self, plan: Plan, order: BatchOrder) -> list[tuple[int, np.ndarray]]:
        out: list[tuple[int, np.ndarray]] = []
        for e in range(plan.epochs):
            for idx in order.epoch_batches(plan.round * plan.epochs + e):
                out.append((len(out), idx))
        return out

    def _slow(self, seconds: float) -> None:
        if self.slowdown > 1.0:
            time.sleep(seconds * (self.slowdown - 1.0))

    def _board_step(self) -> None:
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s * self.slowdown)

    def _train_local(self, plan: Plan, order: BatchOrder) -> None:
        assert self.model is not None
        opt = make_optimizer(self.model.parameters(), lr=plan.lr, momentum=plan.momentum,
                             weight_decay=plan.weight_decay)
        trainer = LocalTrainer(self.model, opt)
        for step, idx in self._batches(plan, order):
            x, y = torch.from_numpy(self.data.x[idx]), torch.from_numpy(self.data.y[idx])
            t = time.monotonic()
            r = trainer.train_batch(x, y, micro_batches=min(plan.micro_batches, len(idx)))
            self._slow(time.monotonic() - t)
            self._board_step()
            self.progress.step = step + 1
            self.progress.loss_sum += r.loss_sum
            self.progress.correct += r.correct
            self.progress.seen += r.n
            self._poll_between_batches()
            # Local training keeps no state at the edge: a move takes effect when the round ends.

    def _poll_between_batches(self) -> None:
        msg = self.pump(0.0)
        if msg is not None:
            self._on_during_round(msg)

    def _train_split(self, plan: Plan, dev: Part, order: BatchOrder) -> None:
        opt = make_optimizer(dev.module.parameters(), lr=plan.lr, momentum=plan.momentum,
                             weight_decay=plan.weight_decay)
        stage = DeviceStage(dev, opt)
        p = self.progress
        batches = self._batches(plan, order)
        p.total_steps = len(batches)
        for step, idx in batches:
            x, y = torch.from_numpy(self.data.x[idx]), torch.from_numpy(self.data.y[idx])
            m = min(plan.micro_batches, len(idx))
            micro = micro_batches(x, y, m)
            for action in one_f_one_b(2, m, 0):
                key = (step, action.micro)
                if action.op == "F":
                    mx, my = micro[action.micro]
                    t = time.monotonic()
                    smashed = stage.forward(key, mx)
                    self._slow(time.monotonic() - t)
                    body = {"step": step, "micro": action.micro, "n_micro": m, "batch_size": len(idx),
                            "attempt": plan.attempt}
                    payload = (smashed.numpy(), my.numpy().astype(np.int64), body)
                    p.outstanding[key] = payload
                    self._send_act(plan, payload)
                else:
                    grad = self._await_grad(plan, key)
                    t = time.monotonic()
                    stage.backward(key, as_torch(grad))
                    self._slow(time.monotonic() - t)
            stage.step()
            self._board_step()
            p.step = step + 1
            self._poll_between_batches()
            if self.pending_move is not None and self.move_at_step <= step + 1 < p.total_steps:
                self._migrate(plan, *self.pending_move)

    def _send_act(self, plan: Plan, payload: tuple[np.ndarray, np.ndarray, dict[str, Any]]) -> None:
        x, y, body = payload
        self.transport.send("act", self.edge, body=body, tensors={"x": x, "y": y}, run=plan.run, round=plan.round)
        self.progress.last_send = time.monotonic()

    def _await_grad(self, plan: Plan, key: tuple[int, int]) -> np.ndarray:
        p = self.progress
        waited_since = time.monotonic()
        while key not in p.grads:
            if self._resend_now or time.monotonic() - p.last_send > self.act_timeout_s:
                if self.pending_move is not None and not self._resend_now:
                    # Stuck mid-batch at a silent source while asked to move: the source is gone.
                    dest, _ = self.pending_move
                    self.pending_move = None
                    self._restart_at(plan, dest, uuid.uuid4().hex[:16], self.edge)
                self._resend_now = False
                if time.monotonic() - waited_since > max(plan.deadline_s, self.act_timeout_s * 3):
                    raise RoundAborted(f"no gradient from {self.edge} for {plan.deadline_s:.0f}s")
                p.resends += len(p.outstanding)
                self.log.info("re-sending outstanding activations", n=len(p.outstanding), edge=self.edge)
                for payload in list(p.outstanding.values()):
                    self._send_act(plan, payload)
            msg = self.pump(0.5)
            if msg is not None:
                self._on_during_round(msg)
        p.outstanding.pop(key, None)
        return p.grads.pop(key)

    def _on_during_round(self, msg: Inbound) -> None:
        plan = self.current
        assert plan is not None
        env = msg.env
        if msg.kind == "model" and env is not None:
            new = env.body.get("plan", {})
            if (new.get("run"), new.get("round"), new.get("attempt")) != plan.key:
                self.pending = msg
                raise RoundAborted("a newer round was announced")
            return
        if msg.kind != "grad" or env is None:
            return
        if msg.src != self.edge or env.run != plan.run or env.round != plan.round:
            self.transport.drop("wrong_round", f"grad from {msg.src} for {env.run}/{env.round}", str(msg.topic))
            return
        try:
            key = (int(env.body["step"]), int(env.body["micro"]))
            grad = env.tensors["g"]
        except (KeyError, TypeError, ValueError):
            self.transport.drop("bad_field", "grad without step/micro/g", str(msg.topic))
            return
        sent = self.progress.outstanding.get(key)
        if sent is None or key in self.progress.grads:
            return  # the answer to a re-sent act we already have
        if grad.shape != sent[0].shape or grad.dtype != np.float32:
            self.transport.drop("bad_shape", f"grad {grad.shape} for activations {sent[0].shape}", str(msg.topic))
            return
        self.progress.grads[key] = grad
        self.progress.loss_sum += float(env.body.get("loss_sum", 0.0))
        self.progress.correct += int(env.body.get("correct", 0))
        self.progress.seen += int(sent[1].shape[0])

    # ------------------------------------------------------------------ migration (FedFly)
    def _apply_move_between_rounds(self) -> None:
        if self.pending_move is not None:
            edge, _ = self.pending_move
            self.pending_move = None
            self.edge = edge
            self.transport.event("moved", device=self.node, destination=edge, during_round=False)

    def _migrate(self, plan: Plan, dest: str, path: str) -> None:
        """Move at a mini-batch boundary: no gradient is in flight, so the edge-side state is complete.

        freeze -> (source sends the checkpoint to dest, or to us to relay) -> dest installs and says ready ->
        we release the source and resume at dest. Destination silent: abort, resume at the source. Source
        silent: it is gone; restart the round at the destination from the global model (FedFly's restart
        baseline, now a fallback). The pause is timed on this device's clock only.
        """
        self.pending_move = None
        source, mid = self.edge, uuid.uuid4().hex[:16]
        if path == "restart":
            # FedFly's baseline: no state moves; the round starts over at the destination.
            self._restart_at(plan, dest, mid, source, reason="restart requested")
        t0 = time.monotonic()
        self.transport.set_status("migrating", edge=source, destination=dest)
        # First, tell the destination whose checkpoint to accept (it trusts no self-declared edge).
        self.transport.send("ckpt", dest, body={"op": "expect", "migration": mid, "source": source})
        self.transport.send("ckpt", source, body={"op": "freeze", "migration": mid, "to": dest, "path": path,
                                                  "step": self.progress.step}, run=plan.run, round=plan.round)
        heard_source = False
        nbytes = 0
        deadline = t0 + self.migrate_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            msg = self.pump(min(remaining, 0.5))
            if msg is None:
                continue
            env = msg.env
            if msg.kind != "ckpt" or env is None:
                if msg.kind in ("model", "grad"):
                    self._on_during_round(msg)
                continue
            op, m = env.body.get("op"), env.body.get("migration")
            if m != mid:
                continue
            if msg.src == source and op == "nothing":
                # Mid-round the source should hold our edge-side state; if it has none (it restarted, or
                # its round timed out), the round can only start over at the destination.
                self._restart_at(plan, dest, mid, source, reason="source edge held no state for us")
            if msg.src == source and op == "refused":
                self._migration_failed(plan, dest, mid, f"source refused: {env.body.get('reason')}", source)
                return
            if msg.src == source and op in ("frozen", "transfer"):
                heard_source = True
                nbytes = int(env.body.get("checkpoint_bytes", 0))
                deadline = time.monotonic() + self.migrate_timeout_s  # now waiting for the destination
                if op == "transfer":  # relay: the edges may not talk to each other; we carry it
                    self.transport.send("ckpt", dest, body=dict(env.body), tensors=dict(env.tensors),
                                        run=plan.run, round=plan.round)
            elif msg.src == dest and op == "ready":
                pause_ms = (time.monotonic() - t0) * 1000.0
                self.transport.send("ckpt", source, body={"op": "release", "migration": mid})
                self.edge = dest
                record: dict[str, Any] = {"device": self.node, "source": source, "destination": dest, "path": path,
                          "migration": mid, "pause_ms": round(pause_ms, 2), "checkpoint_bytes": nbytes,
                          "step": self.progress.step, "round": plan.round}
                self.migrations.append(record)
                self.transport.set_status("training", edge=dest)
                self.transport.event("migration_done", **record)
                self.log.info("migrated", **record)
                return
            elif msg.src == dest and op == "refused":
                self._migration_failed(plan, dest, mid, f"destination refused: {env.body.get('reason')}", source)
                return
        if heard_source:
            self._migration_failed(plan, dest, mid, "destination did not answer", source)
        else:
            self._restart_at(plan, dest, mid, source)

    def _migration_failed(self, plan: Plan, dest: str, mid: str, reason: str, source: str) -> None:
        """Resume at the source: it unfreezes the session, nothing was lost. The destination drops whatever
        it may still install for this move."""
        self.transport.send("ckpt", source, body={"op": "abort", "migration": mid})
        self.transport.send("ckpt", dest, body={"op": "abort", "migration": mid})
        self.transport.set_status("training", edge=source)
        self.transport.event("migration_failed", level="warning", device=self.node, source=source,
                             destination=dest, migration=mid, reason=reason, action="continue at source")
        self.log.warning("migration failed, continuing at the source", reason=reason)

    def _restart_at(self, plan: Plan, dest: str, mid: str, source: str,
                    reason: str = "source edge did not answer") -> None:
        """The source edge is gone with our edge-side state: ask the cloud to restart our round at dest."""
        self.edge = dest
        # Best effort: a live source forgets us instead of reporting us missing at its deadline.
        self.transport.send("ckpt", source, body={"op": "leave", "migration": mid})
        self.transport.send("ckpt", dest, body={"op": "abort", "migration": mid})  # drop a late install
        self.transport.send("ckpt", self.cloud_id, body={"op": "restart", "migration": mid, "edge": dest,
                                                         "source": source}, run=plan.run, round=plan.round)
        self.transport.set_status("waiting", edge=dest)
        self.transport.event("migration_fallback", level="warning", device=self.node, source=source,
                             destination=dest, migration=mid, reason=reason,
                             action="restart the round at the destination from the global model")
        raise RoundAborted("source edge gone; restarting the round at the destination")
