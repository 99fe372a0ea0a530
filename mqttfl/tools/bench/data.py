"""``mqttfl bench data``: what bringing your own data costs, and what the memory-mapped shard saves a device.

- CSV: ``mqttfl data split`` of a generated CSV (rows x features, a class column), end to end: parse, stratified
  test split, standardisation, Dirichlet partition, shards written; rows per second.
- PNG: the built-in reader decoding 32 x 32 RGB images written with the Paeth filter (the slowest to undo, and
  what encoders pick most); images per second.
- Shard memory: one epoch of shuffled mini-batches read from a CIFAR-shaped shard by a fresh process, memory-mapped
  (what a device does) and loaded whole (what it did before): peak RSS, the process's own (anonymous) memory at
  the end, and milliseconds per batch. Mapped pages are clean file pages the kernel drops under pressure; the
  anonymous memory is what a board must really have.

Writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.ml.data import Dataset
from mqttfl.ml.shard import save_shard
from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, save_results
from mqttfl.tools.datatool import split
from mqttfl.tools.images import read_image

EPOCH = """
import json, resource, sys, time
import numpy as np
from mqttfl.ml.data import BatchOrder
from mqttfl.ml.shard import load_shard, open_shard
path, whole = sys.argv[1], sys.argv[2] == "whole"
source = load_shard(path) if whole else open_shard(path)
order = BatchOrder(len(source), 100, seed=0)
t = time.perf_counter()
n = 0
for idx in order.epoch_batches(0):
    x, y = source.batch(idx)
    n += 1
ms = (time.perf_counter() - t) * 1000 / n
anon = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "anon_mb": anon,
                  "batch_ms": ms, "batches": n}))
"""


def _csv(path: Path, rows: int, features: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features))
    y = (x @ rng.normal(size=(features, 4))).argmax(1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"f{i}" for i in range(features)), "label"])
        for i in range(rows):
            w.writerow([*(f"{v:.5f}" for v in x[i]), f"class-{y[i]}"])


def _png_paeth(img: np.ndarray) -> bytes:
    """A PNG (8-bit RGB) with every row Paeth-filtered."""
    h, w, _ = img.shape
    data = img.reshape(h, -1).astype(np.int32)
    up = np.vstack([np.zeros((1, data.shape[1]), np.int32), data[:-1]])
    left = np.hstack([np.zeros((h, 3), np.int32), data[:, :-3]])
    upleft = np.hstack([np.zeros((h, 3), np.int32), up[:, :-3]])
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    raw = np.hstack([np.full((h, 1), 4, np.int32), (data - pred) % 256]).astype(np.uint8).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _epoch(path: Path, whole: bool) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", EPOCH, str(path), "whole" if whole else "mapped"],
                         capture_output=True, text=True, check=True, timeout=600)
    return dict(json.loads(out.stdout))


def measure(*, csv_rows: int, images: int, shard_rows: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mqttfl-bench-data-") as tmp:
        root = Path(tmp)
        _csv(root / "in.csv", csv_rows, 20)
        args = argparse.Namespace(
            input=str(root / "in.csv"), out=str(root / "shards"), devices=None, parts=8, prefix="dev",
            partition="dirichlet:0.5", test_fraction=0.2, eval_fraction=0.1, seed=0, label="label", features=None,
            drop=None, delimiter=None, task=None, standardize=True, x_key="x", y_key="y", labels=None, size=None,
            channels=None)
        t = time.perf_counter()
        split(args)
        csv_s = time.perf_counter() - t

        rng = np.random.default_rng(1)
        (root / "png").mkdir()
        for i in range(images):
            (root / "png" / f"{i}.png").write_bytes(_png_paeth(rng.integers(0, 256, size=(32, 32, 3))))
        t = time.perf_counter()
        for i in range(images):
            read_image(root / "png" / f"{i}.png")
        png_s = time.perf_counter() - t

        x = rng.standard_normal((shard_rows, 3, 32, 32), dtype=np.float32)
        save_shard(root / "shard.npz", Dataset(x, rng.integers(0, 10, shard_rows).astype(np.int64)))
        del x
        mapped, whole = _epoch(root / "shard.npz", False), _epoch(root / "shard.npz", True)
        shard_mb = (root / "shard.npz").stat().st_size / 2**20
    return {"csv_rows": csv_rows, "csv_features": 20, "csv_s": csv_s, "csv_rows_per_s": csv_rows / csv_s,
            "png_images": images, "png_images_per_s": images / png_s, "shard_rows": shard_rows,
            "shard_mb": shard_mb, "mapped": mapped, "whole": whole}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--csv-rows", type=int, default=100_000, help="rows of the generated CSV (default 100000)")
    p.add_argument("--images", type=int, default=500, help="32x32 PNGs decoded (default 500)")
    p.add_argument("--shard-rows", type=int, default=20_000,
                   help="3x32x32 float32 rows of the shard read for one epoch (default 20000: 234 MiB)")
    add_out_argument(p, "data")


def run(args: argparse.Namespace) -> int:
    out = out_dir(args)
    r = measure(csv_rows=args.csv_rows, images=args.images, shard_rows=args.shard_rows)
    m, w = r["mapped"], r["whole"]
    rows = [
        (f"mqttfl data split, CSV {r['csv_rows']} rows x {r['csv_features']} features", fmt(r["csv_rows_per_s"],
                                                                                             "rows/s", 0)),
        ("PNG 32x32 RGB decode (Paeth rows, built-in reader)", fmt(r["png_images_per_s"], "images/s", 0)),
        (f"shard {r['shard_mb']:.0f} MiB, one epoch of batches of 100", ""),
        ("  memory-mapped: peak RSS / own memory", f"{m['peak_rss_mb']:.0f} / {m['anon_mb']:.0f} MiB"),
        ("  loaded whole:  peak RSS / own memory", f"{w['peak_rss_mb']:.0f} / {w['anon_mb']:.0f} MiB"),
        ("  per batch, mapped / whole", f"{m['batch_ms']:.2f} / {w['batch_ms']:.2f} ms"),
        ("results", str(save_results(out, r))),
    ]
    emit(r, rows, args.json)
    return 0
