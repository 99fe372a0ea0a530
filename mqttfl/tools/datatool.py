"""``mqttfl data``: turn a data set into device shards and a test set, and describe shards (docs/data.md).

    mqttfl data split INPUT --out DIR (--devices dev1,dev2,... | --parts N) [--partition iid|dirichlet:A|
                      imbalanced:F|column:NAME] [--test-fraction 0.2] [--eval-fraction 0] [--seed 0]
    mqttfl data describe PATH...

INPUT is a CSV/TSV file (``--label``, ``--features``/``--drop``, ``--task``, ``--standardize``), an ``.npz`` with
inputs and labels (``--x-key``, ``--y-key``) or an ``.npy`` of inputs with ``--labels`` another ``.npy``, or a
folder with one sub-folder of images per class (``--size``, ``--channels``; PNG and PGM/PPM built in, other
formats with Pillow). ``split`` holds out the cloud's test set first (stratified by class), standardises features
on the training part only when asked, partitions the rest over the devices, and may hold out a part of each
device's shard for federated evaluation. It writes ``DIR/<device>.npz`` (and ``<device>.eval.npz``),
``DIR/test.npz`` and ``DIR/dataset.json`` (what was done, class names, feature statistics), and prints the
``[cloud]`` and ``[device]`` keys that use them. Shards are uncompressed ``.npz`` that devices memory-map.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.ml.data import (
    Dataset,
    holdout,
    partition_dirichlet,
    partition_iid,
    partition_imbalanced,
    resize,
    stratified_split,
)
from mqttfl.ml.shard import label_counts, open_shard, save_shard
from mqttfl.tools.images import BUILTIN, ImageError, read_image, to_channels
from mqttfl.tools.tabular import read_table
from mqttfl.wire.topics import TopicError, validate_id

LOSS_OF = {"classification": "cross_entropy", "regression": "mse", "multilabel": "bce_with_logits"}
IMAGE_SUFFIXES = (*BUILTIN, ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Loaded:
    x: np.ndarray
    y: np.ndarray
    task: str
    meta: dict[str, Any] = field(default_factory=dict)
    groups: np.ndarray | None = None  # per row, the value of the partition column


# ------------------------------------------------------------------------------------------------ readers


def _csv_list(v: str | None) -> list[str]:
    return [s.strip() for s in v.split(",") if s.strip()] if v else []


def load_input(path: Path, a: argparse.Namespace, group: str | None) -> Loaded:
    if path.is_dir():
        return _load_images(path, a)
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        if group:
            raise ValueError("--partition column:NAME needs a CSV/TSV input")
        return _load_arrays(path, a)
    with path.open(encoding="utf-8-sig") as f:
        header = f.readline()
    sep = a.delimiter or ("\t" if suffix in (".tsv", ".tab") else ",")
    label = _csv_list(a.label) or [header.rstrip("\r\n").split(sep)[-1].strip()]
    t = read_table(path, label=label, features=_csv_list(a.features) or None, drop=_csv_list(a.drop),
                   group=group, task=a.task, delimiter=a.delimiter)
    return Loaded(t.x, t.y, t.task, {"source": "table", "features": t.features, "labels": t.labels,
                                     "classes": t.classes}, t.groups)


def _load_arrays(path: Path, a: argparse.Namespace) -> Loaded:
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            if a.x_key not in npz.files or a.y_key not in npz.files:
                raise ValueError(f"{path} has {npz.files}; name the arrays with --x-key and --y-key")
            x, y = npz[a.x_key], npz[a.y_key]
    else:
        if not a.labels:
            raise ValueError("an .npy input needs --labels LABELS.npy")
        x, y = np.load(path, allow_pickle=False), np.load(a.labels, allow_pickle=False)
    for name, arr in (("inputs", x), ("labels", y)):
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} have dtype {arr.dtype}: numbers are needed")
    if x.ndim < 2 or len(x) != len(y):
        raise ValueError(f"inputs {x.shape} and labels {y.shape} need one row per sample")
    task = a.task or ("classification" if y.ndim == 1 and y.dtype.kind in "biu" else
                      "multilabel" if y.ndim == 2 and np.isin(y, (0, 1)).all() else "regression")
    if task == "classification":
        if y.ndim != 1 or y.dtype.kind not in "biu" or (y.size and y.min() < 0):
            raise ValueError("classification labels must be non-negative integers, one per sample")
        labels = y.astype(np.int64)
    else:
        labels = y.astype(np.float32).reshape(len(y), -1)
    return Loaded(np.asarray(x, np.float32), labels, task, {"source": "arrays"})


def _load_images(root: Path, a: argparse.Namespace) -> Loaded:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder of images per class")
    files = [(c, f) for c in classes for f in sorted((root / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    images = [read_image(f) for _, f in files]
    h, w = tuple(int(v) for v in a.size.split(",")) if a.size else images[0].shape[:2]
    channels = a.channels or (3 if any(im.shape[2] == 3 for im in images) else 1)
    x = np.empty((len(images), channels, h, w), np.float32)
    for i, im in enumerate(images):
        im = to_channels(im, channels).transpose(2, 0, 1)  # H, W, C -> C, H, W (torch's layout)
        x[i] = im if im.shape[1:] == (h, w) else resize(im, (h, w))
    y = np.array([classes.index(c) for c, _ in files], np.int64)
    return Loaded(x, y, "classification", {"source": "images", "classes": classes})


# ------------------------------------------------------------------------------------------------ split


def _names(a: argparse.Namespace, loaded: Loaded, group: str | None) -> list[str]:
    if a.devices:
        names = _csv_list(a.devices)
    elif a.parts:
        names = [f"{a.prefix}{i}" for i in range(1, a.parts + 1)]
    elif group and loaded.groups is not None:
        names = [_node_id(v) for v in sorted(set(loaded.groups.tolist()))]
    else:
        raise ValueError("say how many shards: --devices dev1,dev2,... or --parts N")
    for n in names:
        try:
            validate_id(n)
        except TopicError as e:
            raise ValueError(f"device id {n!r}: {e}") from None
    if len(set(names)) != len(names):
        raise ValueError(f"device ids repeat: {names}")
    return names


def _node_id(value: str) -> str:
    return re.sub(r"[^a-z0-9_.-]", "-", value.strip().lower()).lstrip("_.-")[:64] or "x"


def _partition(kind: str, param: str, y: np.ndarray, groups: np.ndarray | None, names: list[str],
               seed: int) -> list[np.ndarray]:
    if kind == "iid":
        return partition_iid(y, len(names), seed=seed)
    if kind == "dirichlet":
        if y.ndim != 1:
            raise ValueError("dirichlet partitions class labels; use iid for regression or multi-label data")
        return partition_dirichlet(y, len(names), float(param or 0.5), seed=seed)
    if kind == "imbalanced":
        return partition_imbalanced(y, len(names), float(param or 0.5), seed=seed)
    if kind == "column":
        assert groups is not None
        values = sorted(set(groups.tolist()))
        if len(values) != len(names):
            raise ValueError(f"column {param!r} has {len(values)} values {values[:10]} but there are "
                             f"{len(names)} devices")
        return [np.flatnonzero(groups == v).astype(np.int64) for v in values]
    raise ValueError(f"unknown partition {kind!r}: iid, dirichlet:ALPHA, imbalanced:FRACTION or column:NAME")


def split(a: argparse.Namespace) -> dict[str, Any]:
    kind, _, param = a.partition.partition(":")
    group = param if kind == "column" else None
    loaded = load_input(Path(a.input), a, group)
    names = _names(a, loaded, group)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(loaded.y)
    if not 0 <= a.test_fraction < 1:
        raise ValueError("--test-fraction must be in [0, 1)")
    if loaded.task == "classification" and a.test_fraction > 0:
        train_idx, test_idx = stratified_split(loaded.y, a.test_fraction, a.seed)
    else:
        train_idx, test_idx = holdout(n, a.test_fraction, seed=a.seed)
    x = loaded.x
    meta: dict[str, Any] = {**loaded.meta, "input": str(a.input), "task": loaded.task, "seed": a.seed,
                            "partition": a.partition, "test_fraction": a.test_fraction,
                            "eval_fraction": a.eval_fraction}
    if a.standardize:
        flat = x[train_idx].reshape(len(train_idx), -1)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        std[std == 0] = 1.0
        x = ((x.reshape(n, -1) - mean) / std).reshape(x.shape).astype(np.float32)
        meta["standardize"] = {"mean": mean.tolist(), "std": std.tolist()}
    full = Dataset(np.ascontiguousarray(x), loaded.y)
    train = full.subset(train_idx)
    groups = loaded.groups[train_idx] if loaded.groups is not None else None
    parts = _partition(kind, param, train.y, groups, names, a.seed)
    shards: dict[str, Any] = {}
    for i, (name, idx) in enumerate(zip(names, parts, strict=True)):
        ds = train.subset(idx)
        keep, held = holdout(len(ds), a.eval_fraction, seed=a.seed + 1 + i)
        save_shard(out / f"{name}.npz", ds.subset(keep))
        shards[name] = {"data": str((out / f"{name}.npz").resolve()), "samples": len(keep)}
        if len(held):
            save_shard(out / f"{name}.eval.npz", ds.subset(held))
            shards[name].update(eval_data=str((out / f"{name}.eval.npz").resolve()), eval_samples=len(held))
    if len(test_idx):
        save_shard(out / "test.npz", full.subset(test_idx))
    outputs = int(full.y.max()) + 1 if full.y.ndim == 1 else int(full.y.shape[1])
    if loaded.task == "classification" and meta.get("classes"):
        outputs = max(outputs, len(meta["classes"]))
    cloud = {"input_shape": list(full.x.shape[1:]), "num_classes": outputs, "loss": LOSS_OF[loaded.task]}
    if len(test_idx):
        cloud["test_data"] = str((out / "test.npz").resolve())
    meta.update(cloud=cloud, shards=shards, test_samples=len(test_idx))
    (out / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ------------------------------------------------------------------------------------------------ describe


def describe(path: Path) -> dict[str, Any]:
    s = open_shard(path)
    lf = s.label_format
    info: dict[str, Any] = {"path": str(path), "samples": len(s), "input_shape": list(s.input_shape),
                            "x_dtype": str(s.x.dtype), "memory_mapped": s.memory_mapped, "labels": lf.kind,
                            "label_width": lf.width, "bytes": path.stat().st_size}
    counts = label_counts(s.labels())
    if counts is not None:
        info["counts"] = counts
    if lf.kind == "target":
        y = s.labels()
        info["target_mean"] = [round(float(v), 6) for v in y.mean(axis=0)] if len(y) else []
    return info


def _shards(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.npz")) if p.is_dir() else [p]
    return out


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("split", help="CSV/TSV, .npy/.npz or an image folder -> device shards and a test set")
    s.add_argument("input", help="a .csv/.tsv file, an .npz or .npy, or a folder with one sub-folder per class")
    s.add_argument("--out", required=True, help="folder for the shards, test.npz and dataset.json")
    s.add_argument("--devices", help="device ids, comma-separated: one shard each")
    s.add_argument("--parts", type=int, help="number of shards, named PREFIX1..N")
    s.add_argument("--prefix", default="dev", help="shard name prefix with --parts (default dev)")
    s.add_argument("--partition", default="iid",
                   help="iid (default), dirichlet:ALPHA (label skew), imbalanced:FRACTION (the first device holds "
                        "FRACTION, FedFly), column:NAME (one shard per value of a CSV column, e.g. a device id)")
    s.add_argument("--test-fraction", type=float, default=0.2, help="held out for the cloud's test_data (0.2)")
    s.add_argument("--eval-fraction", type=float, default=0.0,
                   help="of each shard, held out as the device's eval_data (federated evaluation; default 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", help="CSV/TSV: label column(s), comma-separated (default: the last column)")
    s.add_argument("--features", help="CSV/TSV: feature columns (default: every other column)")
    s.add_argument("--drop", help="CSV/TSV: columns to leave out")
    s.add_argument("--delimiter", help="CSV/TSV: the separator (default: tab for .tsv, comma otherwise)")
    s.add_argument("--task", choices=["classification", "regression", "multilabel"],
                   help="what the labels are (default: guessed from them)")
    s.add_argument("--standardize", action="store_true",
                   help="scale every feature to mean 0 and std 1 (statistics of the training part only)")
    s.add_argument("--x-key", default="x", help=".npz: the inputs' array (default x)")
    s.add_argument("--y-key", default="y", help=".npz: the labels' array (default y)")
    s.add_argument("--labels", help=".npy input: the labels' .npy")
    s.add_argument("--size", help="images: H,W to resize to (default: the first image's size)")
    s.add_argument("--channels", type=int, choices=[1, 3], help="images: 1 (gray) or 3 (colour)")
    d = sub.add_parser("describe", help="what shards hold: samples, shapes, dtypes, labels")
    d.add_argument("paths", nargs="+", help="shards, or folders of shards")
    d.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "split":
            meta = split(args)
            _print_split(meta)
            return 0
        infos = [describe(p) for p in _shards(args.paths)]
    except (ValueError, ImageError, OSError) as e:
        print(f"mqttfl data: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(infos))
        return 0
    for i in infos:
        extra = f" counts {i['counts']}" if "counts" in i else ""
        print(f"{i['path']}: {i['samples']} samples of {i['input_shape']} ({i['x_dtype']}, "
              f"{'memory-mapped' if i['memory_mapped'] else 'read whole'}), {i['labels']} labels x{i['label_width']}"
              f"{extra}")
    return 0


def _print_split(meta: dict[str, Any]) -> None:
    print(f"{meta['task']}: {sum(s['samples'] for s in meta['shards'].values())} training samples in "
          f"{len(meta['shards'])} shards, {meta['test_samples']} test samples")
    for name, s in meta["shards"].items():
        print(f"  {name}: {s['samples']} samples" + (f", {s['eval_samples']} held out" if "eval_samples" in s else ""))
    print("\n# cloud.toml\n[cloud]")
    for k, v in meta["cloud"].items():
        print(f"{k} = {json.dumps(v)}")
    print("\n# each device's toml\n[device]")
    for name, s in meta["shards"].items():
        keys = f'data = "{s["data"]}"' + (f'\neval_data = "{s["eval_data"]}"' if "eval_data" in s else "")
        print(f"# {name}\n{keys}")
