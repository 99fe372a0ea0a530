"""``mqttfl export``: a global model the cloud kept, as files plain PyTorch loads (docs/models.md, "Take the model
home").

    mqttfl export STATE_DIR [--run RUN] [--round last|best|N] --out DIR [--onnx]

``STATE_DIR`` is the cloud's ``state_dir`` (or its ``cloud`` folder inside). The run defaults to the cloud's
current one, the round to the newest kept. The cloud keeps the last ``keep_models`` rounds of each run and its
best round (``runs/RUN/*.model``). Written to ``DIR``:

  model.pt    the state dict (``torch.load(path, weights_only=True)``; ``load_state_dict`` into the model the
              run's ``model`` reference builds: your own ``module:function`` with its input shape and outputs)
  model.ts    TorchScript (``torch.jit.load``): runs without the model's code, e.g. on another host
  model.pt2   ``torch.export`` (``torch.export.load(path).module()``), TorchScript's successor
  model.onnx  with ``--onnx``, if the ``onnx`` package is installed
  model.json  the model reference, task, fingerprint, run, round and the metrics the cloud measured
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from mqttfl.protocol.plan import TASKS
from mqttfl.runtime.persist import load_state
from mqttfl.runtime.runs import list_runs, read_model

STATE_FILE = "cloud.state"


def cloud_folder(path: Path) -> Path:
    """The cloud's own folder: ``path`` itself, or ``path/cloud`` when given the shared ``state_dir``."""
    if (path / STATE_FILE).exists() or (path / "runs").is_dir():
        return path
    if (path / "cloud" / STATE_FILE).exists():
        return path / "cloud"
    raise ValueError(f"{path}: no cloud state here (expected {STATE_FILE} or runs/, or a cloud/ folder)")


def pick(state: Path, run: str | None, which: str) -> dict[str, Any]:
    """The kept model of ``run`` (default: the cloud's current run), ``which`` = last, best or a round. The
    current run's last model is also in the cloud's state (``keep_models = 0`` keeps no round files)."""
    current = load_state(state / STATE_FILE)
    if run is None:
        if current is None:
            raise ValueError(f"{state}: no {STATE_FILE}; name the run with --run ({sorted(list_runs(state))})")
        run = str(current["run"])
    try:
        return read_model(state, run, which if which in ("last", "best") else int(which))
    except ValueError:
        if which != "last" or current is None or current.get("run") != run or not current.get("history"):
            raise
    s, last = current["settings"], current["history"][-1]
    info = {"model": s["model"], "input_shape": s["input_shape"], "num_classes": s["num_classes"], "loss": s["loss"],
            "task": TASKS[s["loss"]], "kind": last.get("kind"), "metrics": {
                k: last[k] for k in ("accuracy", "loss", "mse", "mae", "exact_match") if last.get(k) is not None}}
    index = last.get("version", last.get("round")) if last.get("kind") == "version" else last.get("round")
    return {"run": run, "round": index, "info": info, "state": current["global"]}


def export(saved: dict[str, Any], out: Path, onnx: bool = False) -> dict[str, Any]:
    import torch

    from mqttfl.ml.models import build_model, load_model_state

    info = saved["info"]
    shape = tuple(info["input_shape"])
    model = build_model(info["model"], num_classes=int(info["num_classes"]), input_shape=shape)
    load_model_state(model, saved["state"])
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    example = torch.zeros((1, *shape))
    files = ["model.pt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; both are written
        torch.jit.trace(model, example).save(str(out / "model.ts"))
        files.append("model.ts")
        torch.export.save(torch.export.export(model, (example,)), out / "model.pt2")
        files.append("model.pt2")
        if onnx:
            try:
                torch.onnx.export(model, (example,), str(out / "model.onnx"), dynamo=False)
                files.append("model.onnx")
            except Exception as e:  # the onnx package is optional
                print(f"mqttfl export: no ONNX file: {e}", file=sys.stderr)
    meta = {"run": saved["run"], "round": saved["round"], **info, "files": files}
    (out / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("state_dir", help="the cloud's state_dir (or its cloud/ folder)")
    p.add_argument("--run", help="the run (default: the cloud's current run)")
    p.add_argument("--round", default="last", help="last (default), best, or a round number the cloud kept")
    p.add_argument("--out", required=True, help="folder for model.pt, model.ts, model.pt2, model.json")
    p.add_argument("--onnx", action="store_true", help="also model.onnx (needs the onnx package)")
    p.add_argument("--list", action="store_true", help="list the runs and rounds kept instead")


def run(args: argparse.Namespace) -> int:
    try:
        state = cloud_folder(Path(args.state_dir))
        if args.list:
            print(json.dumps(list_runs(state), indent=1))
            return 0
        meta = export(pick(state, args.run, args.round), Path(args.out), args.onnx)
    except (ValueError, OSError, KeyError) as e:
        print(f"mqttfl export: {e}", file=sys.stderr)
        return 2
    metrics = ", ".join(f"{k} {v}" for k, v in meta.get("metrics", {}).items())
    print(f"run {meta['run']} round {meta['round']} ({meta['model']}; the cloud measured {metrics or 'nothing'}) "
          f"-> {', '.join(str(Path(args.out) / f) for f in meta['files'])}")
    return 0
