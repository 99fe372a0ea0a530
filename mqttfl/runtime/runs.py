"""The cloud's runs on disk: each run's history and the global models it keeps (docs/operations.md, "Runs").

Layout under the cloud's state folder::

    runs/<run>/history.jsonl          one line per round (and federated evaluation) of the run
    runs/<run>/round-000012.model     the global model after round 12: the last ``keep`` rounds are kept
    runs/<run>/best.model             the round with the best test metric of the task (accuracy, or mse)

A ``.model`` file is a state file (``mqttfl.runtime.persist``: msgpack with raw arrays, no pickle, written
atomically) holding ``format``, ``run``, ``round``, ``info`` (model reference, task, fingerprint, the metrics
the cloud measured) and ``state`` (tensor name -> float32 array). ``mqttfl export`` turns one into a PyTorch
state dict and a TorchScript file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mqttfl.protocol.events import SaveModel
from mqttfl.runtime.persist import atomic_write, dumps, load_state
from mqttfl.wire.topics import validate_id

MODEL_FORMAT = 1
ROUND_FILE = re.compile(r"^round-(\d+)\.model$")


class RunStore:
    """Writes what the cloud keeps of its runs; ``keep`` round models per run (the best is kept apart)."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = root / "runs"
        self.keep = keep

    def _dir(self, run: str) -> Path:
        return self.root / validate_id(run)

    def save(self, fx: SaveModel) -> None:
        data = dumps({"format": MODEL_FORMAT, "run": fx.run, "round": fx.round, "info": fx.info, "state": fx.state})
        d = self._dir(fx.run)
        if fx.best:
            atomic_write(d / "best.model", data)
        if self.keep <= 0:
            return
        atomic_write(d / f"round-{fx.round:06d}.model", data)
        for old in sorted(round_files(d))[: -self.keep]:
            (d / f"round-{old:06d}.model").unlink(missing_ok=True)

    def history(self, entry: dict[str, Any], line: str | None = None) -> None:
        """Append ``entry`` (``line``: as the caller already encoded it) to its run's history."""
        run = entry.get("run")
        if isinstance(run, str) and run:
            d = self._dir(run)
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "history.jsonl", "a") as f:
                f.write(line if line is not None else json.dumps(entry) + "\n")


def round_files(d: Path) -> list[int]:
    """The rounds whose models are kept in a run's folder."""
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := ROUND_FILE.match(p.name)))


def list_runs(state: Path) -> dict[str, dict[str, Any]]:
    """Per run in a cloud's state folder: the kept rounds and whether a best model is there."""
    root = state / "runs"
    if not root.is_dir():
        return {}
    return {d.name: {"rounds": round_files(d), "best": (d / "best.model").exists(),
                     "history": (d / "history.jsonl").exists()} for d in sorted(root.iterdir()) if d.is_dir()}


def read_model(state: Path, run: str, which: str | int) -> dict[str, Any]:
    """A kept model: ``which`` is a round number, ``"best"`` or ``"last"`` (the newest kept round). ValueError
    says what is there instead."""
    d = state / "runs" / validate_id(run)
    if which == "best":
        path = d / "best.model"
    else:
        rounds = round_files(d)
        r = (rounds[-1] if rounds else -1) if which == "last" else int(which)
        path = d / f"round-{r:06d}.model"
    saved = load_state(path) if path.exists() else None
    if saved is None:
        raise ValueError(f"no model {which!r} of run {run!r} in {d} (kept: {list_runs(state).get(run)})")
    if saved.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: model format {saved.get('format')} not supported")
    return dict(saved)
