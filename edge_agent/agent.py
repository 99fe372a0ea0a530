"""Edge agent: hosts the output-side blocks for each attached device (SplitFed V1) and pre-aggregates.

One :class:`DeviceSession` per device and round holds that device's copy of the edge-side blocks, its
optimizer, its progress and a small cache of the gradients it returned. Acts must arrive in
(step, micro) order; a re-sent act that was already processed gets its cached gradient back and trains
nothing (exactly-once effect). At round end the edge averages its devices' full-model deltas weighted by
samples and sends one delta to the cloud; the cloud's sample-weighted mean of edge deltas is then exactly
flat FedAvg over all devices.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mqttfl.runtime.agent import Agent
from mqttfl.fl.aggregate import weighted_average
from mqttfl.protocol.checkpoint import CheckpointError, EdgeCheckpoint, from_message
from mqttfl.wire.codec import as_torch
from mqttfl.runtime.config import AgentConfig
from mqttfl.ml.models import Part, build_model, model_info, model_state, split_model
from mqttfl.protocol.messages import Plan, ProtocolError, check_activation, check_state, clean_report
from mqttfl.ml.stage import EdgeStage, make_optimizer
from mqttfl.wire.topics import validate_id
from mqttfl.runtime.transport import Inbound

GRAD_CACHE = 16  # >= the most micro-batches of one mini-batch that can be re-sent at once


@dataclass
class DeviceSession:
    device: str
    plan: Plan
    cut: int
    part: Part | None  # None: the device trains the whole model locally
    stage: EdgeStage | None
    base: dict[str, np.ndarray]  # global state of the edge-side keys, for the delta
    smashed_shape: tuple[int, ...] = ()
    expected: tuple[int, int] = (0, 0)  # next (step, micro) to process
    n_micro: int = 0
    grad_cache: OrderedDict[tuple[int, int], dict[str, Any]] = field(default_factory=OrderedDict)
    steps: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    delta: dict[str, np.ndarray] | None = None
    report: dict[str, Any] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    frozen: str | None = None  # migration id while the device's state is on its way to another edge
    installed_by: str | None = None  # migration id that brought this session here (an abort undoes it)
    rng: np.ndarray | None = None  # carried for stochastic edge blocks; today's blocks draw no randomness


@dataclass
class EdgeRound:
    plan: Plan
    devices: dict[str, int]  # device -> cut
    global_state: dict[str, np.ndarray]
    deadline: float
    started: float
    sessions: dict[str, DeviceSession] = field(default_factory=dict)
    sent: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # echoed to the cloud (async mode: group, version)


class EdgeAgent(Agent):
    role = "edge"

    def __init__(self, cfg: AgentConfig) -> None:
        sec = cfg.section
        super().__init__(cfg, cloud_id=str(sec.get("cloud", "cloud")))
        self.deadline_fraction = float(sec.get("deadline_fraction", 0.85))
        # Several rounds may be open at once (asynchronous group rounds); a device is in at most one.
        self.rounds: dict[tuple[str, int, int], EdgeRound] = {}
        self.device_round: dict[str, tuple[str, int, int]] = {}
        self.rounds_done = 0
        self._models: dict[tuple[Any, ...], torch.nn.Sequential] = {}
        # (device, migration id) -> source edge: announced by the device itself (the broker authenticates
        # it), so a checkpoint from any other sender is refused. Bounded: oldest forgotten first.
        self.expected_transfers: dict[tuple[str, str], str] = {}

    def initial_status(self) -> dict[str, Any]:
        return {"state": "idle"}

    def metrics_fields(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done, "open_rounds": [k[1] for k in self.rounds],
                "devices": sorted(self.device_round)}

    def session_of(self, device: str) -> tuple[EdgeRound | None, DeviceSession | None]:
        key = self.device_round.get(device)
        r = self.rounds.get(key) if key is not None else None
        return (r, r.sessions.get(device)) if r is not None else (None, None)

    # ------------------------------------------------------------------ dispatch
    def handle(self, msg: Inbound) -> None:
        if msg.env is None:
            return
        if msg.kind == "ckpt":
            self.on_ckpt(msg)
        elif msg.kind == "model":
            self.on_global_model(msg)
        elif msg.kind == "act":
            self.on_act(msg)
        elif msg.kind == "delta":
            self.on_device_delta(msg)

    def tick(self, now: float) -> None:
        for r in list(self.rounds.values()):
            if not r.sent and now >= r.deadline:
                self.finish_round(r, timed_out=True)

    # ------------------------------------------------------------------ round start
    def _replica(self, plan: Plan) -> torch.nn.Sequential:
        """A fresh model per device session: SplitFed V1 keeps one copy of the edge blocks per device."""
        return build_model(plan.model, num_classes=plan.num_classes, input_shape=plan.input_shape)

    def on_global_model(self, msg: Inbound) -> None:
        env = msg.env
        assert env is not None
        if msg.src != self.cloud_id:
            self.transport.drop("unknown_sender", f"model from {msg.src}", str(msg.topic))
            return
        try:
            plan = Plan.from_body(env.body.get("plan", {}))
            devices = {str(d): int(c["cut"]) for d, c in dict(env.body.get("devices", {})).items()}
            info = model_info(plan.model, plan.input_shape, plan.num_classes)
            for d, c in devices.items():
                if not 0 <= c <= info.n_blocks:
                    raise ProtocolError("bad_plan", f"cut {c} for {d} outside 0..{info.n_blocks}")
            reference = self._reference_state(plan)
            check_state(dict(env.tensors), reference, "global model")
        except (ProtocolError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.transport.drop(getattr(e, "code", "bad_model"), str(e), str(msg.topic))
            return
        now = time.monotonic()
        r = self.rounds.get(plan.key)
        if r is not None:
            # Same round announced again: re-delivery, or the cloud adding a device (migration fallback).
            devices = {d: c for d, c in devices.items() if d not in r.sessions}
            if not devices:
                return
            r.devices.update(devices)
            # A round opened by a migration holds only edge-side base weights: take the full state now.
            r.global_state.update({k: np.array(v) for k, v in env.tensors.items()})
            global_state = r.global_state
        else:
            global_state = {k: np.array(v) for k, v in env.tensors.items()}
            r = EdgeRound(plan, devices, global_state, deadline=now + plan.deadline_s * self.deadline_fraction,
                          started=now, extra=dict(env.body.get("extra", {})))
        for device in devices:
            self._leave(device)  # a newer round supersedes whatever the device was doing
            self.device_round[device] = plan.key
        self.rounds[plan.key] = r
        self.transport.set_status("training", round=plan.round, run=plan.run, devices=sorted(devices))
        self.log.info("round start", round=plan.round, devices=sorted(devices))
        for device, cut in devices.items():
            r.sessions[device] = self._open_session(plan, device, cut, global_state, info.n_blocks)
            dev_keys = [k for k in global_state if int(k.split(".", 1)[0]) < cut]
            self.transport.send(
                "model", device, body={"plan": plan.to_body(), "cut": cut, "edge": self.node},
                tensors={k: global_state[k] for k in dev_keys}, run=plan.run, round=plan.round,
            )
        if not devices:
            self.finish_round(r)

    def _leave(self, device: str) -> None:
        old_r, _ = self.session_of(device)
        self.device_round.pop(device, None)
        if old_r is not None and not old_r.sent:
            old_r.sessions.pop(device, None)
            if not old_r.sessions or all(x.delta is not None for x in old_r.sessions.values()):
                self.finish_round(old_r)

    def _reference_state(self, plan: Plan) -> dict[str, np.ndarray]:
        key = (plan.model, plan.input_shape, plan.num_classes)
        if key not in self._models:
            self._models[key] = build_model(plan.model, num_classes=plan.num_classes, input_shape=plan.input_shape)
        return model_state(self._models[key])

    def _open_session(self, plan: Plan, device: str, cut: int, global_state: dict[str, np.ndarray],
                      n_blocks: int) -> DeviceSession:
        if cut == n_blocks:
            return DeviceSession(device, plan, cut, None, None, base={})
        model = self._replica(plan)
        _, part = split_model(model, cut)
        part.load_state(global_state)
        opt = make_optimizer(part.module.parameters(), lr=plan.lr, momentum=plan.momentum,
                             weight_decay=plan.weight_decay)
        with torch.no_grad():
            probe = torch.zeros((1, *plan.input_shape))
            smashed_shape = tuple(model[:cut](probe).shape[1:]) if cut > 0 else tuple(plan.input_shape)
        return DeviceSession(device, plan, cut, part, EdgeStage(part, opt), base=part.state(),
                             smashed_shape=smashed_shape, optimizer=opt)

    # ------------------------------------------------------------------ split training
    def on_act(self, msg: Inbound) -> None:
        env = msg.env
        assert env is not None
        r, s = self.session_of(msg.src)
        if r is None or s is None:
            self.transport.drop("unknown_sender", f"act from {msg.src}, not in a round here", str(msg.topic))
            return
        if env.run != r.plan.run or env.round != r.plan.round or \
                env.body.get("attempt", r.plan.attempt) != r.plan.attempt:
            self.transport.drop("wrong_round", f"act for {env.run}/{env.round}, round is {r.plan.round}",
                                str(msg.topic))
            return
        if s.stage is None or s.delta is not None:
            self.transport.drop("unexpected", f"{msg.src} trains locally or has finished", str(msg.topic))
            return
        if s.frozen is not None:
            self.transport.drop("frozen", f"{msg.src} is migrating ({s.frozen})", str(msg.topic))
            return
        try:
            key = (int(env.body["step"]), int(env.body["micro"]))
            n_micro, batch_size = int(env.body["n_micro"]), int(env.body["batch_size"])
            x, y = env.tensors["x"], env.tensors["y"]
        except (KeyError, TypeError, ValueError):
            self.transport.drop("bad_field", "act needs step, micro, n_micro, batch_size, x, y", str(msg.topic))
            return
        cached = s.grad_cache.get(key)
        if cached is not None:
            # Exactly-once: the device re-sent an act we processed (its link dropped); answer from cache.
            self.transport.send("grad", msg.src, body=cached["body"], tensors={"g": cached["g"]},
                                run=r.plan.run, round=r.plan.round)
            self.transport._count("grad_resent")
            return
        if key != s.expected:
            self.transport.drop("out_of_order", f"act {key} from {msg.src}, expected {s.expected}", str(msg.topic))
            return
        try:
            check_activation(x, y, s.smashed_shape, r.plan.num_classes, max_rows=r.plan.batch_size)
            if not 1 <= n_micro <= batch_size <= r.plan.batch_size or not 0 <= key[1] < n_micro:
                raise ProtocolError("bad_field", f"micro {key[1]}/{n_micro} of a batch of {batch_size}")
            if key[1] > 0 and n_micro != s.n_micro:
                raise ProtocolError("bad_field", f"n_micro changed mid-batch ({s.n_micro} -> {n_micro})")
        except ProtocolError as e:
            self.transport.drop(e.code, str(e), str(msg.topic))
            return
        res = s.stage.forward_backward(as_torch(x), torch.from_numpy(np.asarray(y)), batch_size)
        assert res.grad is not None
        grad = res.grad.detach().contiguous().numpy()
        body = {"step": key[0], "micro": key[1], "loss_sum": res.loss_sum, "correct": res.correct}
        self.transport.send("grad", msg.src, body=body, tensors={"g": grad}, run=r.plan.run, round=r.plan.round)
        s.grad_cache[key] = {"body": body, "g": grad}
        while len(s.grad_cache) > GRAD_CACHE:
            s.grad_cache.popitem(last=False)
        s.loss_sum += res.loss_sum
        s.seen += res.n
        s.n_micro = n_micro
        if key[1] + 1 == n_micro:
            s.stage.step()  # one optimizer step per device mini-batch, like the device
            s.steps += 1
            s.expected = (key[0] + 1, 0)
        else:
            s.expected = (key[0], key[1] + 1)

    # ------------------------------------------------------------------ round end
    def on_device_delta(self, msg: Inbound) -> None:
        env = msg.env
        assert env is not None
        r, s = self.session_of(msg.src)
        attempt = env.body.get("attempt", r.plan.attempt if r is not None else None)
        if r is None or s is None or env.run != r.plan.run or env.round != r.plan.round or attempt != r.plan.attempt:
            if r is None or env.round < r.plan.round or env.run != r.plan.run or attempt != r.plan.attempt:
                self.transport.ack(msg)  # a late re-send of a finished round: stop the device re-sending
            self.transport.drop("wrong_round", f"delta from {msg.src} for round {env.round}", str(msg.topic))
            return
        if s.delta is not None:
            self.transport.ack(msg)
            return
        try:
            reference = self._reference_state(r.plan)
            expected = {k: v for k, v in reference.items() if int(k.split(".", 1)[0]) < s.cut}
            check_state(dict(env.tensors), expected, f"delta of {msg.src}")
            report = clean_report(env.body)
            samples = int(report.get("samples", 0))
        except (ProtocolError, ValueError, TypeError) as e:
            self.transport.drop(getattr(e, "code", "bad_field"), str(e), str(msg.topic))
            return
        delta = {k: np.array(v) for k, v in env.tensors.items()}
        if s.part is not None:
            edge_now = s.part.state()
            delta.update({k: (edge_now[k] - s.base[k]).astype(np.float32) for k in s.base})
        s.delta = delta
        s.report = report
        s.report["t_upload"] = max(0.0, time.time() - env.ts)
        s.report["edge_steps"] = s.steps
        self.transport.ack(msg)
        self.log.info("device done", device=msg.src, round=r.plan.round, samples=samples)
        if all(x.delta is not None for x in r.sessions.values()):
            self.finish_round(r)

    def finish_round(self, r: EdgeRound, timed_out: bool = False) -> None:
        if r.sent:
            return
        r.sent = True
        self.rounds.pop(r.plan.key, None)
        for d in r.sessions:
            if self.device_round.get(d) == r.plan.key:
                self.device_round.pop(d)
        done = {d: s for d, s in r.sessions.items() if s.delta is not None and s.report.get("samples", 0) > 0}
        missing = sorted(set(r.sessions) - set(done))
        body: dict[str, Any] = {
            "attempt": r.plan.attempt, "samples": sum(int(s.report["samples"]) for s in done.values()),
            "devices": {d: s.report for d, s in done.items()}, "missing": missing,
            "edge_time_s": time.monotonic() - r.started, "extra": r.extra,
        }
        tensors: dict[str, np.ndarray] = {}
        if done:
            tensors = weighted_average([(s.delta, float(s.report["samples"])) for s in done.values()
                                        if s.delta is not None])
        if missing:
            self.transport.event("devices_missing", level="warning", round=r.plan.round, devices=missing,
                                 timed_out=timed_out)
        self.transport.send("delta", self.cloud_id, body=body, tensors=tensors, run=r.plan.run,
                            round=r.plan.round, reliable=True)
        self.rounds_done += 1
        self.log.info("round sent", round=r.plan.round, devices=sorted(done), missing=missing)
        for s in r.sessions.values():
            s.stage = None  # free the per-device replicas; deltas are sent
        self.transport.set_status("training" if self.rounds else "idle", round=r.plan.round)

    # ------------------------------------------------------------------ migration (FedFly)
    def on_ckpt(self, msg: Inbound) -> None:
        env = msg.env
        assert env is not None
        op = env.body.get("op")
        handlers = {"freeze": self.on_freeze, "transfer": self.on_transfer, "release": self.on_release,
                    "abort": self.on_abort, "leave": self.on_leave, "expect": self.on_expect}
        handler = handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            self.transport.drop("bad_field", f"unknown ckpt op {op!r}", str(msg.topic))
            return
        handler(msg)

    def _reply(self, device: str, op: str, migration: str, **body: Any) -> None:
        self.transport.send("ckpt", device, body={"op": op, "migration": migration, **body})

    def capture(self, s: DeviceSession, migration: str) -> EdgeCheckpoint:
        assert s.part is not None and s.optimizer is not None
        momentum = {}
        for name, p in s.part.named_parameters():  # slicing a Sequential keeps the global keys
            buf = s.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                momentum[name] = buf.detach().numpy().copy()
        rng = s.rng if s.rng is not None else torch.get_rng_state().numpy()
        return EdgeCheckpoint(
            device=s.device, migration=migration, plan=s.plan, cut=s.cut, weights=s.part.state(),
            momentum=momentum, base=dict(s.base), expected=s.expected, steps=s.steps, loss_sum=s.loss_sum,
            seen=s.seen, n_micro=s.n_micro, smashed_shape=s.smashed_shape, rng=rng,
        )

    def on_freeze(self, msg: Inbound) -> None:
        """Source edge: the device asks to move. Checkpoint its session and send it on."""
        env = msg.env
        assert env is not None
        device, mid = msg.src, str(env.body.get("migration", ""))
        dest, path = str(env.body.get("to", "")), env.body.get("path", "direct")
        r, s = self.session_of(device)
        if r is None or s is None or s.stage is None or s.delta is not None:
            self._reply(device, "nothing", mid)  # no edge-side state here: the device just switches edge
            return
        if s.expected[1] != 0:
            self._reply(device, "refused", mid, reason=f"not at a mini-batch boundary (next {s.expected})")
            return
        try:
            validate_id(dest)
        except ValueError:
            self._reply(device, "refused", mid, reason=f"bad destination {dest!r}")
            return
        s.frozen = mid
        ck = self.capture(s, mid)
        body, tensors = ck.to_message()
        nbytes = ck.nbytes()
        body.update(op="transfer", path=path, source=self.node, checkpoint_bytes=nbytes)
        if path == "direct":
            # Before the multi-MB transfer, so the device learns at once that the source is alive.
            self._reply(device, "frozen", mid, checkpoint_bytes=nbytes)
        # direct: edge to edge through the broker; relay: through the device (edges that may not talk).
        self.transport.send("ckpt", dest if path == "direct" else device, body=body, tensors=tensors,
                            run=r.plan.run, round=r.plan.round)
        self.transport.event("migration_started", device=device, source=self.node, destination=dest, path=path,
                             migration=mid, step=s.expected[0], checkpoint_bytes=nbytes)

    def on_transfer(self, msg: Inbound) -> None:
        """Destination edge: install a checkpoint, then tell the device it may resume here."""
        env = msg.env
        assert env is not None
        body = env.body
        device = str(body.get("device", ""))
        mid = str(body.get("migration", ""))
        if msg.src != device and self.expected_transfers.get((device, mid)) != msg.src:
            # Only the device itself (relay) or the source it named (direct) may hand us its state.
            self.transport.drop("unauthorised", f"checkpoint for {device} from {msg.src}", str(msg.topic))
            return
        try:
            plan = Plan.from_body(body.get("plan", {}))
            cut = int(body.get("cut", -1))
            model = self._replica(plan)
            if not 0 < cut < len(model):
                raise CheckpointError("bad_field", f"cut {cut} has no edge-side state")
            _, part = split_model(model, cut)
            ck = from_message(body, env.tensors, part.state(), [n for n, _ in part.named_parameters()])
            if ck.device != device:
                raise CheckpointError("bad_field", "checkpoint names another device")
        except (CheckpointError, ProtocolError, ValueError) as e:
            self.transport.drop(getattr(e, "code", "bad_field"), f"checkpoint refused: {e}", str(msg.topic))
            self.transport.event("checkpoint_refused", level="warning", device=device, migration=mid,
                                 reason=getattr(e, "code", "bad_field"), detail=str(e)[:300])
            self._reply(device, "refused", mid, reason=str(e)[:300])
            return
        _, current = self.session_of(device)
        if current is not None and current.plan.key == plan.key and current.installed_by != mid:
            # The device already restarted its round here (a late checkpoint of a move it gave up on).
            self._reply(device, "refused", mid, reason="the device already has a session for this round here")
            return
        part.load_state(ck.weights)
        opt = make_optimizer(part.module.parameters(), lr=plan.lr, momentum=plan.momentum,
                             weight_decay=plan.weight_decay)
        for name, p in part.named_parameters():
            if name in ck.momentum:
                opt.state[p]["momentum_buffer"] = torch.from_numpy(np.array(ck.momentum[name]))
        session = DeviceSession(
            device, plan, cut, part, EdgeStage(part, opt), base=dict(ck.base), smashed_shape=ck.smashed_shape,
            expected=ck.expected, n_micro=ck.n_micro, steps=ck.steps, loss_sum=ck.loss_sum, seen=ck.seen,
            optimizer=opt, rng=ck.rng, installed_by=mid,
        )
        self._leave(device)
        now = time.monotonic()
        r = self.rounds.get(plan.key)
        if r is None:
            # This edge was not in the round: the checkpoint carries all it needs (plan and base).
            r = EdgeRound(plan, {}, dict(ck.base), deadline=now + plan.deadline_s * self.deadline_fraction,
                          started=now)
            self.rounds[plan.key] = r
        r.sessions[device] = session
        r.devices[device] = cut
        self.device_round[device] = plan.key
        self._reply(device, "ready", mid, checkpoint_bytes=int(body.get("checkpoint_bytes", 0)),
                    step=ck.expected[0])
        self.transport.set_status("training", round=plan.round, run=plan.run)
        self.log.info("migration installed", device=device, migration=mid, step=ck.expected[0])

    def on_expect(self, msg: Inbound) -> None:
        """Destination edge: the device announces its move and the source that will send its state."""
        env = msg.env
        assert env is not None
        self.expected_transfers[(msg.src, str(env.body.get("migration", "")))] = str(env.body.get("source", ""))
        while len(self.expected_transfers) > 256:
            self.expected_transfers.pop(next(iter(self.expected_transfers)))

    def on_release(self, msg: Inbound) -> None:
        """Source edge: the destination has the device; forget the frozen session."""
        r, s = self.session_of(msg.src)
        mid = str(msg.env.body.get("migration", "")) if msg.env else ""
        if r is None or s is None or s.frozen != mid:
            return
        self._drop_session(r, msg.src, mid)

    def on_leave(self, msg: Inbound) -> None:
        """The device restarts its round elsewhere without its state (FedFly's restart baseline)."""
        r, s = self.session_of(msg.src)
        if r is not None and s is not None:
            self._drop_session(r, msg.src, str(msg.env.body.get("migration", "")) if msg.env else "")

    def _drop_session(self, r: EdgeRound, device: str, mid: str) -> None:
        r.sessions.pop(device, None)
        r.devices.pop(device, None)
        self.device_round.pop(device, None)
        self.log.info("device left", device=device, migration=mid)
        if not r.sessions:
            self.rounds.pop(r.plan.key, None)  # nothing left to report for this round here
        elif all(x.delta is not None for x in r.sessions.values()):
            self.finish_round(r)

    def on_abort(self, msg: Inbound) -> None:
        """The device gave up on a move. Source: resume the frozen session. Destination: forget a session
        installed for that move, so it neither blocks the round nor clashes with a restart."""
        r, s = self.session_of(msg.src)
        mid = str(msg.env.body.get("migration", "")) if msg.env else ""
        if s is not None and s.frozen == mid:
            s.frozen = None
            self.log.info("migration aborted, device resumes here", device=msg.src, migration=mid)
        elif r is not None and s is not None and s.installed_by == mid:
            self._drop_session(r, msg.src, mid)
