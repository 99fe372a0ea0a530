"""``mqttfl predict``: run an exported model on a shard and print the task's metrics, as the cloud computes them.

    mqttfl predict EXPORT_DIR DATA [--out predictions.npy] [--json]

Loads ``model.ts`` (TorchScript: the model's own code is not needed) and ``model.json`` (the task) from an
``mqttfl export`` folder and evaluates on ``DATA`` (a shard: the cloud's ``test_data`` reproduces the accuracy
the cloud reported for that round). ``--out`` writes the predictions: the class index per sample
(classification), the outputs (regression) or 0/1 per label (multi-label).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a folder written by mqttfl export")
    p.add_argument("data", help="a shard (.npz with x and y)")
    p.add_argument("--out", help="write the predictions here (.npy)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from mqttfl.ml.shard import open_shard
    from mqttfl.ml.stage import evaluate

    folder = Path(args.model_dir)
    try:
        meta = json.loads((folder / "model.json").read_text())
        shard = open_shard(args.data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated; its files still load
            model = torch.jit.load(str(folder / "model.ts"))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"mqttfl predict: {e}", file=sys.stderr)
        return 2
    model.eval()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(shard), 500):  # a memory-mapped shard is read one chunk at a time
            x, y = shard.batch(np.arange(i, min(i + 500, len(shard))))
            yield torch.from_numpy(x), torch.from_numpy(y)

    metrics = evaluate(model, batches(), meta["loss"])
    if args.out:
        with torch.no_grad():
            out = np.concatenate([model(x).numpy() for x, _ in batches()])
        pred = out.argmax(axis=1) if meta["task"] == "classification" else \
            (out > 0).astype(np.int64) if meta["task"] == "multilabel" else out
        np.save(args.out, pred)
    result = {"run": meta["run"], "round": meta["round"], "samples": len(shard),
              **{k: round(v, 5) for k, v in metrics.items()}, "cloud": meta.get("metrics", {})}
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k} {v}" for k, v in result.items()))
    return 0
