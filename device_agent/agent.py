"""Device agent: owns its data, trains the input-side blocks, exchanges smashed data and gradients.

Within a mini-batch the device follows the 2-stage 1F1B schedule of :mod:`mqttfl.pipeline`: up to
min(M, 3) micro-batches are in flight, so the device computes the next forward while the edge works and
the network carries the previous one. Gradients accumulate; the optimizer steps once per mini-batch.

Reliability: every act stays in ``outstanding`` until its gradient arrives. After a link comes back, or
when a gradient is overdue, the device re-sends the outstanding acts; the edge answers a re-sent act from
its gradient cache, so nothing is trained twice (exactly-once effect).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mqttfl.agent import Agent, CommandError, arg
from mqttfl.codec import as_torch
from mqttfl.config import AgentConfig
from mqttfl.data import BatchOrder, label_histogram, load_shard
from mqttfl.models import Part, build_model, model_info, split_model
from mqttfl.pipeline import one_f_one_b
from mqttfl.protocol import Plan, ProtocolError, check_state, data_seed
from mqttfl.split import DeviceStage, LocalTrainer, make_optimizer, micro_batches
from mqttfl.transport import Inbound


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
        self.slowdown = float(sec.get("slowdown", 1.0))  # emulate a slower board (benchmarks, tests)
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
        self.commands["train_stats"] = self.cmd_train_stats
        self.commands["set_edge"] = self.cmd_set_edge

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
        if up:
            self._resend_now = True

    # ------------------------------------------------------------------ commands
    def cmd_train_stats(self, msg: Inbound, args: dict[str, Any]) -> Any:
        return {"rounds_done": self.rounds_done, "step": self.progress.step, "resends": self.progress.resends}

    def cmd_set_edge(self, msg: Inbound, args: dict[str, Any]) -> Any:
        edge = arg(args, "edge", str)
        if self.current is not None:
            raise CommandError("cannot change edge during a round; use 'move'", "busy")
        self.edge = edge
        self.transport.set_status("idle", edge=edge)
        return {"edge": edge}

    # ------------------------------------------------------------------ protocol
    def handle(self, msg: Inbound) -> None:
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
                self.transport.set_status("idle", round=None)
            msg = self.pending  # a newer model arrived while training

    def _accept_model(self, msg: Inbound) -> tuple[Plan, int, Part, Part] | None:
        env = msg.env
        assert env is not None
        if msg.src != self.edge:
            self.transport.drop("unknown_sender", f"model from {msg.src}, attached to {self.edge}", str(msg.topic))
            return None
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
            "samples": len(self.data), "steps": p.step, "loss_sum": p.loss_sum, "correct": p.correct,
            "seen": p.seen, "cut": cut, "t_local": t_local, "t_download": t_download,
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
        out = []
        for e in range(plan.epochs):
            for idx in order.epoch_batches(plan.round * plan.epochs + e):
                out.append((len(out), idx))
        return out

    def _slow(self, seconds: float) -> None:
        if self.slowdown > 1.0:
            time.sleep(seconds * (self.slowdown - 1.0))

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
            self.progress.step = step + 1
            self.progress.loss_sum += r.loss_sum
            self.progress.correct += r.correct
            self.progress.seen += r.n
            self._poll_between_batches()

    def _poll_between_batches(self) -> None:
        msg = self.pump(0.0)
        if msg is not None:
            self._on_during_round(msg)

    def _train_split(self, plan: Plan, dev: Part, order: BatchOrder) -> None:
        opt = make_optimizer(dev.module.parameters(), lr=plan.lr, momentum=plan.momentum,
                             weight_decay=plan.weight_decay)
        stage = DeviceStage(dev, opt)
        p = self.progress
        for step, idx in self._batches(plan, order):
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
                    body = {"step": step, "micro": action.micro, "n_micro": m, "batch_size": len(idx)}
                    payload = (smashed.numpy(), my.numpy().astype(np.int64), body)
                    p.outstanding[key] = payload
                    self._send_act(plan, payload)
                else:
                    grad = self._await_grad(plan, key)
                    t = time.monotonic()
                    stage.backward(key, as_torch(grad))
                    self._slow(time.monotonic() - t)
            stage.step()
            p.step = step + 1
            self._poll_between_batches()

    def _send_act(self, plan: Plan, payload: tuple[np.ndarray, np.ndarray, dict[str, Any]]) -> None:
        x, y, body = payload
        self.transport.send("act", self.edge, body=body, tensors={"x": x, "y": y}, run=plan.run, round=plan.round)
        self.progress.last_send = time.monotonic()

    def _await_grad(self, plan: Plan, key: tuple[int, int]) -> np.ndarray:
        p = self.progress
        waited_since = time.monotonic()
        while key not in p.grads:
            if self._resend_now or time.monotonic() - p.last_send > self.act_timeout_s:
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
