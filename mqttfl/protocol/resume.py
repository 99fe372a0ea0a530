"""Edge resume: an edge's per-device sessions survive a kill -9, so the round goes on (docs/design.md,
"Edge resume").

Both ends keep state at the same mini-batch boundaries, every ``plan.resume_every`` mini-batches:

- the edge writes each device's session (:class:`SavedSession`: edge-side weights, optimizer state, RNG, the
  round's base weights, the data position, loss and samples so far, and, once the device is done, its
  delta and report) to its state directory after the optimizer step of such a boundary, and tells the device
  which boundary it holds (``Gradients.saved``);
- the device keeps its own stage state at those boundaries (:class:`Snapshots`) until the edge holds a later
  one.

A restarted edge reads its sessions back, re-opens their stages and sends each device a ``Resume`` naming the
boundary it restored; the device goes back to its own state at that boundary and trains on from there. The
batch order depends only on the step, so the replayed mini-batches are the same ones: the round ends on the
weights it would have reached without the crash. What was trained after the boundary is trained again, never
twice into the model.

A persisted session is the edge's own file, but it is read back like any input: a record that does not fit
the model is refused whole (``ProtocolError``), and the edge starts without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mqttfl.protocol.errors import ProtocolError
from mqttfl.protocol.messages import Gradients, Report, RoundTag
from mqttfl.protocol.plan import Plan
from mqttfl.protocol.schema import ModelRef, ModelSchema, check_state
from mqttfl.protocol.stage import StageSnapshot

State = dict[str, np.ndarray]
RECORD_FORMAT = 1
KEY_PREFIX = "session."


def record_key(device: str) -> str:
    """The persisted state's key for a device's session at this edge (one record per device in its journal)."""
    return KEY_PREFIX + device


@dataclass
class SavedSession:
    device: str
    plan: Plan
    cut: int
    base: State  # the round's global edge-side weights (the base of the delta)
    weights: State | None  # None: still the base (saved when the session opened)
    optimizer: State
    rng: np.ndarray | None
    expected: tuple[int, int]
    steps: int
    loss_sum: float
    seen: int
    n_micro: int
    tag: RoundTag | None = None
    deadline_wall: float | None = None  # the edge's deadline for the round, on the wall clock
    declared: int | None = None  # the samples the device declared when it joined (the cloud's word)
    report: Report | None = None  # set once the device's delta is in
    delta: State | None = None
    mask: State = field(default_factory=dict)  # 0/1 masks of a pruned or width model's delta
    # The gradients of the mini-batch before ``expected``: the edge may die after saving the boundary but
    # before the device got the last of them; restored, they answer the device's re-sent activations.
    grads: list[Gradients] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT, "device": self.device, "plan": self.plan.to_body(), "cut": self.cut,
            "base": self.base, "weights": self.weights, "optimizer": self.optimizer, "rng": self.rng,
            "expected": list(self.expected), "steps": self.steps, "loss_sum": self.loss_sum, "seen": self.seen,
            "n_micro": self.n_micro, "tag": self.tag.to_body() if self.tag else None,
            "deadline_wall": self.deadline_wall, "declared": self.declared,
            "report": self.report.to_body() if self.report else None, "delta": self.delta, "mask": self.mask,
            "grads": [[g.step, g.micro, g.loss_sum, g.correct, g.g] for g in self.grads],
        }

    @classmethod
    def from_state(cls, d: Any, schemas: Callable[[ModelRef], ModelSchema]) -> tuple[SavedSession, ModelSchema]:
        """Read a record back, checked against the model; ProtocolError names the first problem."""
        if not isinstance(d, Mapping) or d.get("format") != RECORD_FORMAT:
            raise ProtocolError("bad_version", f"not a session record of format {RECORD_FORMAT}")
        try:
            plan = Plan.from_body(d["plan"])
            schema = schemas(plan.model_ref)
            cut = int(d["cut"])
            if not 1 <= cut <= schema.n_blocks:
                raise ProtocolError("bad_plan", f"cut {cut} outside 1..{schema.n_blocks}")
            specs = schema.specs(cut) if cut < schema.n_blocks else {}
            base = check_state(d["base"] or {}, specs, "saved base")
            weights = None if d["weights"] is None else check_state(d["weights"], specs, "saved weights")
            optimizer = _optimizer(d["optimizer"] or {}, specs)
            rng = d["rng"]
            if rng is not None and (not isinstance(rng, np.ndarray) or rng.dtype != np.uint8 or rng.ndim != 1):
                raise ProtocolError("bad_field", "saved RNG state must be uint8")
            expected = (int(d["expected"][0]), int(d["expected"][1]))
            report = Report.from_body(d["report"]) if d["report"] is not None else None
            every = schema.specs()
            # A device that trained part of the model (a partial model, FedLAMA's due layers) has a partial delta.
            delta = None if d["delta"] is None else check_state(
                d["delta"], {k: every[k] for k in d["delta"]}, "saved delta")
            mask = check_state(d.get("mask") or {}, {k: every[k] for k in d.get("mask") or {}}, "saved mask")
            grads = [_gradient(plan, cut, schema, g) for g in d.get("grads", [])]
            out = cls(device=str(d["device"]), plan=plan, cut=cut, base=base, weights=weights, optimizer=optimizer,
                      rng=rng, expected=expected, steps=int(d["steps"]), loss_sum=float(d["loss_sum"]),
                      seen=int(d["seen"]), n_micro=int(d["n_micro"]), tag=RoundTag.from_body(d.get("tag")),
                      deadline_wall=None if d["deadline_wall"] is None else float(d["deadline_wall"]),
                      declared=None if d["declared"] is None else int(d["declared"]), report=report, delta=delta,
                      mask=mask, grads=grads)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ProtocolError("bad_field", f"session record: {type(e).__name__}: {e}") from None
        if expected[1] != 0 or min(expected[0], out.steps, out.seen, out.n_micro) < 0:
            raise ProtocolError("bad_field", "a saved session sits at a mini-batch boundary")
        if (report is None) != (delta is None):
            raise ProtocolError("bad_field", "a saved session has both a report and a delta, or neither")
        return out, schema


def _gradient(plan: Plan, cut: int, schema: ModelSchema, g: Any) -> Gradients:
    step, micro, loss_sum, correct, arr = g
    shape = schema.activation(cut)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or tuple(arr.shape[1:]) != tuple(shape) \
            or not np.isfinite(arr).all():
        raise ProtocolError("bad_shape", "a saved gradient does not fit the model at this cut")
    return Gradients(run=plan.run, round=plan.round, step=int(step), micro=int(micro), loss_sum=float(loss_sum),
                     correct=int(correct), g=np.array(arr))


def _optimizer(state: Mapping[str, Any], specs: Mapping[str, Any]) -> State:
    out: State = {}
    for name, arr in state.items():
        key, _, what = str(name).partition("|")
        spec = specs.get(key)
        if spec is None or not what or not isinstance(arr, np.ndarray) or arr.dtype != np.float32 \
                or (arr.ndim and tuple(arr.shape) != tuple(spec.shape)) or not np.isfinite(arr).all():
            raise ProtocolError("bad_shape", f"saved optimizer state {name!r} does not fit the model")
        out[str(name)] = np.array(arr)
    return out


@dataclass
class DeviceSnapshot:
    """The device's stage and counters at a mini-batch boundary; ``stage`` None: the round's start (its base
    weights, no optimizer state yet)."""

    stage: StageSnapshot | None
    loss_sum: float
    correct: int
    seen: int


@dataclass
class Snapshots:
    """The device's states at the boundaries its edge saves, kept until the edge holds a later one."""

    every: int
    kept: dict[int, DeviceSnapshot] = field(default_factory=dict)
    saved: int = 0  # the latest boundary the edge said it holds

    def wanted(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step not in self.kept

    def keep(self, step: int, snap: DeviceSnapshot) -> None:
        self.kept[step] = snap

    def edge_saved(self, step: int) -> None:
        """The edge holds this boundary on disk: earlier states can never be asked for again."""
        self.saved = max(self.saved, step)
        for s in [s for s in self.kept if s < self.saved]:
            del self.kept[s]

    def rewind(self, step: int) -> DeviceSnapshot | None:
        """The state at ``step``, forgetting the later ones (they are trained again); None if not kept."""
        snap = self.kept.get(step)
        if snap is not None:
            for s in [s for s in self.kept if s > step]:
                del self.kept[s]
        return snap
