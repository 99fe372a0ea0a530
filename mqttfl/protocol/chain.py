"""A device's pipeline across its helpers: the first stage plans and steers it (Eco-FL; docs/design.md, "Pipeline").

Theory of operation. When a round's ``TrainRound`` names helpers, the device (stage 0, which owns the data) is
the pipeline's coordinator; its helpers are the middle stages (``mqttfl.protocol.helper``) and its edge the
last. The device gets the whole model and:

1. *profiles*: asks each helper and its edge for their time per block (``ProfileAsk``), times itself (a
   ``Profile`` job), and keeps the profiles for the run;
2. *plans*: the DP of ``mqttfl.fl.pipeline_plan`` (or an equal split) gives each stage its blocks, within what
   each stage's memory holds with ``K_s`` micro-batches stashed; the plan, its predicted per-stage times and
   bubble go on ``metrics`` (kind ``pipeline``);
3. *lays the pipeline out* from a mini-batch boundary ``b`` under a new ``epoch``: its own stage re-opened on its
   blocks, ``StageOpen`` to each helper (blocks, neighbours, weights and optimizer state at ``b``),
   ``ChainSet`` to the edge (who sends its activations; at boundary 0 where its blocks start), ``StageClose``
   to helpers that left; training goes on when every stage answered ``StageReady``;
4. *trains*: 1F1B with ``S`` stages; each helper hands the device its state at every flush (``StageState``),
   so the device holds the whole pipeline's state at the boundary it stands at, and every gradient brings the
   stages' measured compute times, stash depths and link speeds;
5. *rebalances* at a flush when the slowest stage drifts beyond the plan (``rebalance_threshold`` for
   ``rebalance_windows`` mini-batches): the profiles are rescaled by measured / predicted and the DP re-run
   with the edge's blocks fixed; a helper that joins (the cloud's ``chain`` command) is profiled and planned in
   at the next flush;
6. *recovers*: a helper that leaves mid-round (the cloud sees its last will) is dropped at once; the pipeline
   is laid out again from the boundary the device stands at, from the states it holds, and the mini-batch in
   progress is redone: the edge answers what it already trained from its gradient cache, so nothing is trained
   twice;
7. *ends*: the delta is the pipeline's state at the last boundary minus the round's base, over every block
   before the edge's, sent as the device's own.

Local devices, FedLAMA and FedProx rounds do not pipeline (the edge names no helpers then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mqttfl.fl.aggregate import delta
from mqttfl.fl.pipeline_plan import Drift, Partition, StageCost, equal, evaluate, plan, rescaled
from mqttfl.protocol import stage
from mqttfl.protocol.events import Emit, JobDone, Log, Metrics, Run, SetTimer
from mqttfl.protocol.links import Downstream
from mqttfl.protocol.messages import (
    ChainSet,
    Gradients,
    ProfileAsk,
    StageClose,
    StageOpen,
    StageProfile,
    StageReady,
    StageState,
)
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schedule import stash_bound
from mqttfl.protocol.schema import ModelSchema

State = dict[str, np.ndarray]
PIPE_TIMER = "pipe"
EMA = 0.5  # weight of a new micro-batch in the device's moving average of its own compute time
SETUP_TRIES = 3  # timeouts a stage may miss while the pipeline is laid out before it is left out
FLOAT_BYTES = 4


@dataclass(frozen=True)
class Layout:
    """Who trains which blocks from which boundary: stage k is ``nodes[k]`` on ``[bounds[k], bounds[k+1])``."""

    epoch: int
    nodes: tuple[str, ...]  # the device, its helpers in chain order, the edge
    bounds: tuple[int, ...]
    step: int

    @property
    def stages(self) -> int:
        return len(self.nodes)

    @property
    def helpers(self) -> tuple[str, ...]:
        return self.nodes[1:-1]

    @property
    def first(self) -> str:
        return self.nodes[1]

    @property
    def edge_cut(self) -> int:
        return self.bounds[-2]


@dataclass
class Pipeline:
    """What a device knows of its pipeline during one round."""

    helpers: tuple[str, ...]  # the helpers to use (the cloud's chain, online ones), in order
    schema: ModelSchema
    plan: Plan
    edge_cut: int  # where the edge's blocks start (the round's cut until the device moves it at boundary 0)
    layout: Layout | None = None
    partition: Partition | None = None  # the plan's predictions for ``layout``
    costs: dict[str, StageCost] = field(default_factory=dict)  # per node, in the plan's (rescaled) units
    epoch: int = 0
    running: bool = False  # the layout is in place: training may go on
    pending: set[str] = field(default_factory=set)  # stages whose StageReady we wait for ("" = our own Open)
    tries: int = 0
    asked: set[str] = field(default_factory=set)  # profiles asked, not yet answered
    states: dict[str, dict[int, StageState]] = field(default_factory=dict)  # helper -> boundary -> its state
    merged: dict[int, tuple[State, State]] = field(default_factory=dict)  # boundary -> the pipeline's state
    marks: dict[int, tuple[float, int, int]] = field(default_factory=dict)  # boundary -> (loss, correct, seen)
    own_s: float = 0.0  # our compute per micro-batch (moving average)
    fwd_s: dict[tuple[int, int], float] = field(default_factory=dict)
    asked_at: float = 0.0
    measured: tuple[float, ...] = ()  # the stages below, per micro-batch, from the latest gradient
    stash: tuple[int, ...] = ()
    link_bps: tuple[float, ...] = ()
    in_flight: int = 0
    peak_stash: int = 0
    drift: Drift = field(default_factory=lambda: Drift(0.0, 1))
    replan: str = ""  # why the pipeline is laid out again at the next boundary ("": it is not)
    why: str = "round start"  # the reason of the layout being prepared
    began: bool = False  # training began: the edge's blocks stay where they are for the rest of the round
    sent: dict[str, Any] = field(default_factory=dict)  # the current layout's message to each stage (re-sent)
    rebalances: int = 0
    started: float = 0.0  # when the first layout went in (throughput counts from there)

    @property
    def rows(self) -> int:
        return max(1, -(-self.plan.batch_size // max(self.plan.micro_batches, 1)))

    def opt_slots(self) -> int:
        if self.plan.optimizer in ("adam", "adamw"):
            return 2
        return 1 if self.plan.momentum > 0 else 0

    def cost(self, node: str, block_s: tuple[float, ...], memory_bytes: int) -> StageCost:
        """A stage's profile for the planner: its times, and the memory each block needs (weights and
        optimizer state; activations stashed per micro-batch), from the model's schema."""
        schema, rows = self.schema, self.rows
        params = tuple(sum(math.prod(t.shape) for t in b) * FLOAT_BYTES * (1 + self.opt_slots())
                       for b in schema.blocks)
        acts = tuple(math.prod(schema.boundaries[i + 1]) * rows * FLOAT_BYTES for i in range(schema.n_blocks))
        return StageCost(tuple(block_s), params, acts, memory_bytes)

    def boundary_bytes(self) -> tuple[int, ...]:
        return tuple(math.prod(b) * self.rows * FLOAT_BYTES for b in self.schema.boundaries)

    def stash_bounds(self, stages: int) -> list[int]:
        m = min(self.plan.micro_batches, self.plan.batch_size)
        return [stash_bound(stages, m, k, self.plan.pipeline_schedule) for k in range(stages)]

    def keep_state(self, node: str, st: StageState) -> None:
        kept = self.states.setdefault(node, {})
        kept[st.step] = st
        for old in sorted(kept)[:-2]:
            del kept[old]

    def merge(self, step: int, own: stage.StageSnapshot) -> bool:
        """The whole pipeline's state at boundary ``step`` from our snapshot and the helpers' states there;
        False when a helper's is missing (then an older boundary stays the one to go back to)."""
        assert self.layout is not None
        weights, optimizer = dict(own.weights), dict(own.optimizer)
        for h in self.layout.helpers:
            st = self.states.get(h, {}).get(step)
            if st is None:
                return False
            weights.update(st.state)
            optimizer.update(st.optimizer)
        self.merged[step] = (weights, optimizer)
        for old in sorted(self.merged)[:-2]:
            del self.merged[old]
        return True


def split(state: tuple[State, State], keys: list[str]) -> tuple[State, State]:
    """The weights and optimizer state of the given tensors (one stage's blocks)."""
    weights, optimizer = state
    wanted = set(keys)
    return ({k: weights[k] for k in keys}, {k: v for k, v in optimizer.items() if k.partition("|")[0] in wanted})


class PipelineCoordinator:
    """The device's side of a pipeline: the methods ``DeviceMachine`` calls at its hooks (see the module
    docstring). Uses the machine's ``round``, ``node``, ``edge``, ``act_timeout_s``, ``profiles`` and its effect
    helpers."""

    node: str
    edge: str
    act_timeout_s: float
    profiles: dict[tuple[str, str, int], tuple[float, ...]]  # (run, node, rows) -> seconds per block
    stage_memory: dict[str, int]  # what each stage said it offers

    if TYPE_CHECKING:
        round: Any  # the machine's DeviceRound

        def _do(self, *effects: Any) -> None: ...

        def _send(self, dst: str, msg: Any, reliable: bool = False, encoding: str = "none") -> None: ...

        def _run(self, job: stage.Job) -> None: ...

        def _new_id(self, what: str) -> str: ...

        def _advance(self, now: float) -> None: ...

        def _at_boundary(self, now: float) -> None: ...

        def _abort(self, now: float, reason: str) -> None: ...

    # ------------------------------------------------------------------ set-up
    def _pipe(self) -> tuple[Any, Pipeline]:
        r = self.round
        assert r is not None and r.pipe is not None
        return r, r.pipe

    def _pipe_nodes(self, p: Pipeline) -> tuple[str, ...]:
        return (self.node, *p.helpers, self.edge)

    def _pipe_begin(self, now: float) -> None:
        """The round's first layout: profile whoever is not profiled yet in this run, then plan."""
        r, p = self._pipe()
        p.drift = Drift(r.plan.rebalance_threshold, r.plan.rebalance_windows)
        p.marks[0] = (0.0, 0, 0)
        p.merged[0] = (dict(r.start), {})  # the whole model: at boundary 0 the edge's blocks may still move
        self._pipe_profile_missing(now)

    def _pipe_profile_missing(self, now: float, reason: str = "round start") -> None:
        r, p = self._pipe()
        p.running, p.why = False, reason
        need = [n for n in self._pipe_nodes(p) if (r.plan.run, n, p.rows) not in self.profiles]
        if not need:
            self._pipe_lay_out(now, reason=reason)
            return
        for n in need:
            if n == self.node:
                self._run(stage.Profile(self._new_id("p"), r.plan, p.rows))
            elif n not in p.asked:
                self._send(n, ProfileAsk(run=r.plan.run, round=r.plan.round, plan=r.plan, rows=p.rows,
                                         schema=p.schema.describe()))
        p.asked |= set(need) - {self.node}
        p.tries = 0
        self._do(SetTimer(PIPE_TIMER, now + self.act_timeout_s))

    def _pipe_profiled(self, node: str, block_s: tuple[float, ...], memory_bytes: int, now: float) -> None:
        r, p = self._pipe()
        if len(block_s) != p.schema.n_blocks:
            return
        self.profiles[(r.plan.run, node, p.rows)] = block_s
        self.stage_memory[node] = memory_bytes
        p.asked.discard(node)
        if not p.running and not p.pending and not p.asked and r.waiting is None:
            self._pipe_profile_missing(now, p.why)

    def _pipe_costs(self, p: Pipeline, run: str, nodes: tuple[str, ...]) -> list[StageCost]:
        out = []
        for n in nodes:
            c = p.costs.get(n)
            if c is None:
                c = p.costs[n] = p.cost(n, self.profiles[(run, n, p.rows)], self.stage_memory.get(n, 0))
            out.append(c)
        return out

    def _pipe_plan(self, nodes: tuple[str, ...], fixed_edge: bool) -> Partition | None:
        r, p = self._pipe()
        n, stages = p.schema.n_blocks, len(nodes)
        costs = self._pipe_costs(p, r.plan.run, nodes)
        links = tuple(p.link_bps[k] if k < len(p.link_bps) else 0.0 for k in range(stages - 1))
        bandwidth = tuple(b if b > 0 else math.inf for b in links)
        if r.plan.partition == "equal":
            head = equal(p.edge_cut if fixed_edge else n, stages - 1 if fixed_edge else stages)
            bounds = (*head, n) if fixed_edge else head
            return evaluate(costs, bounds, boundary_bytes=p.boundary_bytes(), bandwidth=bandwidth)
        return plan(costs, p.stash_bounds(stages), boundary_bytes=p.boundary_bytes(), bandwidth=bandwidth,
                    fixed={stages - 1: p.edge_cut} if fixed_edge else None)

    def _pipe_lay_out(self, now: float, *, reason: str = "round start") -> None:
        """Plan for the helpers we have and lay the pipeline out from the boundary we stand at."""
        r, p = self._pipe()
        step = r.step
        helpers = [h for h in p.helpers]
        while True:
            nodes = (self.node, *helpers, self.edge)
            fixed = p.began
            ok = len(nodes) <= (p.edge_cut + 1 if fixed else p.schema.n_blocks)
            part = self._pipe_plan(nodes, fixed) if ok else None
            if part is not None or not helpers:
                break
            helpers.pop()  # the stages cannot hold the model (memory, or fewer blocks than stages): use fewer
        p.helpers = tuple(helpers)
        if part is None:  # the device and its edge alone: the round's own cut
            part = evaluate(self._pipe_costs(p, r.plan.run, (self.node, self.edge)), (0, p.edge_cut, p.schema.n_blocks))
        self._pipe_apply(Layout(p.epoch + 1, (self.node, *helpers, self.edge), part.bounds, step), part, now, reason)

    def _pipe_apply(self, layout: Layout, part: Partition, now: float, reason: str) -> None:
        r, p = self._pipe()
        state = p.merged.get(layout.step)
        if state is None:
            self._abort(now, f"pipeline state at boundary {layout.step} is missing")
            return
        old = p.layout
        p.layout, p.partition, p.epoch = layout, part, layout.epoch
        p.edge_cut = layout.edge_cut
        p.running, p.tries = False, 0
        if not p.started:
            p.started = now
        plan_ = r.plan
        # Our own stage, re-opened on its blocks from the pipeline's state at the boundary.
        self._do(Run(stage.Close(r.session)))
        r.session = self._new_id("r")
        own_w, own_opt = split(state, p.schema.keys(0, layout.bounds[1]))
        p.pending = {"", *layout.helpers, self.edge}
        p.sent = {}
        for k, h in enumerate(layout.helpers, start=1):
            w, opt = split(state, p.schema.keys(layout.bounds[k], layout.bounds[k + 1]))
            p.sent[h] = StageOpen(run=plan_.run, round=plan_.round, plan=plan_, epoch=layout.epoch, step=layout.step,
                                  index=k, stages=layout.stages, start=layout.bounds[k], stop=layout.bounds[k + 1],
                                  upstream=layout.nodes[k - 1], downstream=layout.nodes[k + 1], state=w,
                                  optimizer=opt, schema=p.schema.describe())
        p.sent[self.edge] = ChainSet(run=plan_.run, round=plan_.round, attempt=plan_.attempt, epoch=layout.epoch,
                                     step=layout.step, cut=layout.edge_cut, upstream=layout.nodes[-2])
        for gone in set(old.helpers if old else ()) - set(layout.helpers):
            self._send(gone, StageClose(run=plan_.run, round=plan_.round, epoch=layout.epoch))
        for node, msg in p.sent.items():
            self._send(node, msg)
        self._do(SetTimer(PIPE_TIMER, now + self.act_timeout_s))
        info = self._pipe_info(layout, part, reason)
        self._do(Metrics(info), Log("info", "pipeline layout", {k: info[k] for k in ("epoch", "step", "chain",
                                                                                      "blocks", "reason")}))
        if old is not None:
            self._do(Emit("pipeline_replanned", fields={k: info[k] for k in (
                "device", "round", "epoch", "step", "chain", "blocks", "reason", "predicted_ms")}))
        self._run(stage.Open(r.session, plan_, 0, layout.bounds[1], own_w, optimizer=own_opt or None, data=True))

    def _pipe_info(self, layout: Layout, part: Partition, reason: str) -> dict[str, Any]:
        r, p = self._pipe()
        m = min(r.plan.micro_batches, r.plan.batch_size)
        batch_s = part.batch_s(m)
        return {"kind": "pipeline", "device": self.node, "run": r.plan.run, "round": r.plan.round,
                "epoch": layout.epoch, "step": layout.step, "reason": reason, "chain": list(layout.nodes),
                "blocks": list(layout.bounds),
                "schedule": r.plan.pipeline_schedule, "partition": r.plan.partition, "micro_batches": m,
                "predicted_ms": [round(t * 1000, 3) for t in part.stage_s],
                "predicted_link_ms": [round(t * 1000, 3) for t in part.link_s],
                "predicted_batch_s": round(batch_s, 5),
                "predicted_samples_s": round(r.plan.batch_size / batch_s, 3) if batch_s > 0 else None,
                "predicted_bubble": round(part.bubble(m), 4), "stash_bound": p.stash_bounds(layout.stages)}

    def _pipe_ready(self, src: str, msg: StageReady, now: float) -> None:
        r, p = self._pipe()
        if p.layout is None or msg.epoch != p.epoch or src not in p.pending:
            return
        if not msg.ok:
            self._do(Emit("pipeline_stage_refused", "warning", {"device": self.node, "stage": src,
                                                                 "reason": msg.reason}))
            if src == self.edge:
                self._abort(now, f"edge refused the pipeline layout: {msg.reason}")
                return
            self._pipe_leave((src,), now, f"{src} refused: {msg.reason}")
            return
        p.pending.discard(src)
        self._pipe_go(now)

    def _pipe_opened(self, now: float) -> None:
        r, p = self._pipe()
        p.pending.discard("")
        self._pipe_go(now)

    def _pipe_go(self, now: float) -> None:
        """Every stage holds the layout: go on from its boundary (redoing the mini-batch it cut into)."""
        r, p = self._pipe()
        if p.pending or p.layout is None:
            return
        b = p.layout.step
        p.running = p.began = True
        r.step = b
        r.loss_sum, r.correct, r.seen = p.marks[b]
        r.actions, r.pos = [], 0
        resends, r.down = r.down.resends, Downstream(self.act_timeout_s)
        r.down.resends = resends
        p.fwd_s.clear()
        p.in_flight = 0
        p.measured, p.stash = (), ()
        p.drift.count = 0
        self._advance(now)

    def _pipe_timer(self, now: float) -> None:
        """Stages that do not answer while the pipeline is laid out (or profiled) are asked again, then left
        out; an edge that does not profile is taken to be as fast as this device."""
        r, p = self._pipe()
        if p.running:
            return
        waiting = {n for n in p.pending | p.asked if n}
        if not waiting:
            return
        p.tries += 1
        if p.tries < SETUP_TRIES:
            for n in waiting:
                msg = p.sent.get(n) if n in p.pending else ProfileAsk(
                    run=r.plan.run, round=r.plan.round, plan=r.plan, rows=p.rows, schema=p.schema.describe())
                if msg is not None:
                    self._send(n, msg)
            self._do(SetTimer(PIPE_TIMER, now + self.act_timeout_s))
            return
        if self.edge in p.pending:
            self._abort(now, f"edge {self.edge} does not answer for the pipeline")
            return
        if self.edge in p.asked:
            own = self.profiles.get((r.plan.run, self.node, p.rows))
            if own is not None:
                self.profiles[(r.plan.run, self.edge, p.rows)] = own
            p.asked.discard(self.edge)
            waiting.discard(self.edge)
        p.asked -= waiting
        self._pipe_leave(tuple(waiting), now, "did not answer")

    # ------------------------------------------------------------------ training
    def _pipe_forwarded(self, key: tuple[int, int], now: float) -> None:
        r, p = self._pipe()
        p.fwd_s[key] = max(0.0, now - p.asked_at)
        p.in_flight += 1
        p.peak_stash = max(p.peak_stash, p.in_flight)

    def _pipe_backwarded(self, key: tuple[int, int], now: float) -> None:
        r, p = self._pipe()
        spent = p.fwd_s.pop(key, 0.0) + max(0.0, now - p.asked_at)
        p.own_s = spent if not p.own_s else (1 - EMA) * p.own_s + EMA * spent
        p.in_flight -= 1

    def _pipe_grad(self, src: str, msg: Gradients) -> bool:
        """Whether a gradient is for the layout in place, from our downstream stage; keeps its measurements."""
        r, p = self._pipe()
        if p.layout is None or not p.running or src != p.layout.first or msg.epoch != p.epoch:
            return False
        if len(msg.stage_s) == p.layout.stages - 1:
            p.measured, p.stash, p.link_bps = msg.stage_s, msg.stash, msg.link_bps
        return True

    def _pipe_state(self, src: str, msg: StageState) -> None:
        r, p = self._pipe()
        if p.layout is None or msg.epoch != p.epoch or src not in p.layout.helpers:
            return
        layout = p.layout
        k = layout.nodes.index(src)
        keys = set(p.schema.keys(layout.bounds[k], layout.bounds[k + 1]))
        if set(msg.state) != keys or not all(np.isfinite(v).all() for v in msg.state.values()):
            self._do(Log("warning", "stage state refused", {"stage": src, "step": msg.step}))
            return
        p.keep_state(src, msg)

    def _pipe_at_boundary(self, snap: stage.StageSnapshot, now: float) -> None:
        """Our snapshot at the boundary we just reached: the whole pipeline's state here, the measurements of the
        last mini-batch, then what the boundary brings (the round's end, a new layout, a move)."""
        r, p = self._pipe()
        assert p.layout is not None
        p.marks[r.step] = (r.loss_sum, r.correct, r.seen)
        for old in sorted(p.marks)[:-3]:
            del p.marks[old]
        whole = p.merge(r.step, snap)
        measured = (p.own_s, *p.measured)
        self._do(Metrics({"kind": "pipeline_step", "device": self.node, "run": r.plan.run, "round": r.plan.round,
                          "step": r.step,
                          "epoch": p.epoch, "elapsed_s": round(now - p.started, 5), "samples": r.seen,
                          "stage_ms": [round(t * 1000, 3) for t in measured],
                          "stash": [p.peak_stash, *p.stash], "link_bps": [round(b, 1) for b in p.link_bps]}))
        if r.step >= r.total:
            self._pipe_finish(now)
            return
        if not whole:
            self._at_boundary(now)  # a helper's state did not come: no new layout from here
            return
        if p.replan:
            reason, p.replan = p.replan, ""
            self._pipe_profile_missing_then(now, reason)
            return
        if len(measured) == p.layout.stages and p.partition is not None and r.plan.partition == "dp" \
                and p.drift.observe(max(measured), max(p.partition.stage_s)):
            if self._pipe_rebalance(measured, now):
                return
        self._at_boundary(now)

    def _pipe_profile_missing_then(self, now: float, reason: str) -> None:
        r, p = self._pipe()
        if any((r.plan.run, n, p.rows) not in self.profiles for n in self._pipe_nodes(p)):
            self._pipe_profile_missing(now, reason)  # lays out once the profiles are in
            return
        self._pipe_lay_out(now, reason=reason)

    def _pipe_rebalance(self, measured: tuple[float, ...], now: float) -> bool:
        """Rescale the stages' profiles by what they measured and re-plan with the edge's blocks fixed; move
        layers only when the new plan is clearly faster."""
        r, p = self._pipe()
        layout, part = p.layout, p.partition
        assert layout is not None and part is not None
        costs = rescaled(self._pipe_costs(p, r.plan.run, layout.nodes), layout.bounds, measured)
        for n, c in zip(layout.nodes, costs, strict=True):
            p.costs[n] = c
        new = self._pipe_plan(layout.nodes, True)
        slowest = max(measured)
        margin = 1 - r.plan.rebalance_threshold / 2
        if new is None or new.bounds == layout.bounds or new.bottleneck_s > slowest * margin:
            p.partition = evaluate(costs, layout.bounds, boundary_bytes=p.boundary_bytes())  # re-based on measurement
            return False
        p.rebalances += 1
        self._pipe_apply(Layout(p.epoch + 1, layout.nodes, new.bounds, r.step), new, now,
                         f"slowest stage {slowest * 1000:.1f} ms, plan {max(part.stage_s) * 1000:.1f} ms")
        return True

    def _pipe_finish(self, now: float) -> None:
        """The round's last boundary: the pipeline's state there minus the base is the device's delta."""
        r, p = self._pipe()
        state = p.merged.get(r.step)
        if state is None:
            self._abort(now, "a helper's state at the round's end is missing")
            return
        weights = state[0]
        keys = p.schema.keys(0, p.edge_cut)
        r.cut = p.edge_cut
        r.weights = {k: weights[k] for k in keys}
        r.delta = delta(r.weights, {k: r.base[k] for k in keys})
        self._run(stage.Measure(r.session))

    # ------------------------------------------------------------------ helpers come and go
    def _pipe_leave(self, gone: tuple[str, ...], now: float, why: str) -> None:
        """Helpers that left: lay the pipeline out again without them from the latest boundary whose state we
        hold (the mini-batch in progress is redone)."""
        r, p = self._pipe()
        p.helpers = tuple(h for h in p.helpers if h not in gone)
        if p.layout is None:
            if not p.asked:
                self._pipe_profile_missing(now, p.why)
            return
        step = r.step if r.step in p.merged else max(p.merged)
        r.step = step
        self._do(Emit("pipeline_stage_lost", "warning", {"device": self.node, "round": r.plan.round,
                                                          "helpers": list(gone), "reason": why, "redo_from": step}))
        self._pipe_lay_out(now, reason=f"{', '.join(gone)} left: {why}")

    def _pipe_chain(self, helpers: tuple[str, ...], now: float) -> dict[str, Any]:
        """The cloud (or an operator) names the helpers online now: a lost one is dropped at once, a new one
        joins at the next flush."""
        r, p = self._pipe()
        current = set(p.layout.helpers) if p.layout is not None else set(p.helpers)
        gone = tuple(h for h in current if h not in helpers)
        joined = [h for h in helpers if h not in current]
        if gone:
            p.helpers = tuple(h for h in helpers if h not in joined)
            self._pipe_leave(gone, now, "left the chain")
        if joined:
            p.helpers = tuple(helpers)
            p.replan = f"{', '.join(joined)} joined"
            if not p.running and not p.pending:
                p.replan = ""
                self._pipe_profile_missing_then(now, f"{', '.join(joined)} joined")
        return {"helpers": list(helpers), "lost": list(gone), "joined": joined}

    def _pipe_moved(self, now: float) -> None:
        """We moved to another edge (FedFly) at a boundary: the same blocks, the new edge last."""
        r, p = self._pipe()
        assert p.layout is not None and p.partition is not None
        layout = Layout(p.epoch + 1, (self.node, *p.layout.helpers, self.edge), p.layout.bounds, r.step)
        self._pipe_apply(layout, p.partition, now, f"moved to {self.edge}")

    def _pipe_close(self) -> None:
        r, p = self._pipe()
        for h in p.layout.helpers if p.layout else ():
            self._send(h, StageClose(run=r.plan.run, round=r.plan.round, epoch=p.epoch + 1))

    def _pipe_on_message(self, src: str, msg: Any, now: float) -> None:
        r = self.round
        if r is None or r.pipe is None or msg.run != r.plan.run or msg.round != r.plan.round:
            return
        if isinstance(msg, StageReady):
            self._pipe_ready(src, msg, now)
        elif isinstance(msg, StageState):
            self._pipe_state(src, msg)
        elif isinstance(msg, StageProfile) and src in r.pipe.asked:
            self._pipe_profiled(src, msg.block_s, msg.memory_bytes, now)

    def _pipe_job(self, ev: JobDone, now: float) -> bool:
        """A job of the pipeline's own: profile, open; False for the machine's usual handling."""
        r = self.round
        if r is None or r.pipe is None:
            return False
        if isinstance(ev.job, stage.Profile):
            self._pipe_profiled(self.node, tuple(ev.result.block_s), 0, now)
            return True
        if isinstance(ev.job, stage.Open):
            self._pipe_opened(now)
            return True
        return False
