"""CIFAR-10 from a local copy (users bring their own; nothing here downloads).

Both official layouts are read: ``cifar-10-batches-bin`` (records of 1 label byte + 3072 pixel bytes, parsed
with numpy alone) and ``cifar-10-batches-py`` (pickled dicts). The python files are local and trusted, yet
unpickling is still restricted to the few numpy globals those files reference: a pickle can run any callable
it names, and a data directory is an easy place to drop a doctored file.
"""

from __future__ import annotations

import io
import pickle
import re
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.ml.data import Dataset

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10"]

# Per-channel pixel mean and std of the training set. The widely copied std (0.2023, 0.1994, 0.2010) is not
# the per-pixel std of the data; these are.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_RECORD = 1 + 3 * 32 * 32
_BATCH = re.compile(r"data_batch_(\d+)(\.bin)?$")

# Everything a CIFAR python batch needs to rebuild its uint8 array. numpy 2 moved numpy.core to numpy._core,
# protocol-5 pickles use _frombuffer instead of _reconstruct, and protocol-2 pickles written by Python 3 wrap
# bytes in _codecs.encode; all of these only build arrays or bytes.
_ALLOWED_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def _find_dir(root: Path) -> tuple[Path, str]:
    for candidate in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1.bin").is_file() and (candidate / "test_batch.bin").is_file():
            return candidate, "bin"
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate, "py"
    raise FileNotFoundError(
        f"no CIFAR-10 batches under {root}: expected cifar-10-batches-bin/ or cifar-10-batches-py/ "
        "(or that directory itself) with data_batch_1 and test_batch"
    )


def _train_files(directory: Path, fmt: str) -> list[Path]:
    found: list[tuple[int, Path]] = []
    for path in directory.iterdir():
        m = _BATCH.match(path.name)
        if m and bool(m.group(2)) == (fmt == "bin"):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {_RECORD}-byte records")
    records = raw.reshape(-1, _RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _read_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        # encoding="bytes": the official files were pickled by Python 2.
        batch = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be a uint8 array of N x 3072")
    if labels is None or len(labels) != len(data):
        raise ValueError(f"{path}: 'labels' missing or not one per image")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _to_dataset(parts: list[tuple[np.ndarray, np.ndarray]], normalize: bool) -> Dataset:
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 labels must be 0..9, got range [{labels.min()}, {labels.max()}]")
    x = images.astype(np.float32) / 255.0
    if normalize:
        mean = np.asarray(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
        x = (x - mean) / std
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), labels)


def load_cifar10(root: str | PathLike[str], *, normalize: bool = True) -> tuple[Dataset, Dataset]:
    """(train, test) as NCHW float32, normalised with the CIFAR-10 channel mean/std unless told otherwise.

    ``root`` is the batches directory or its parent. Every ``data_batch_<k>`` present is used, in order of k.
    """
    directory, fmt = _find_dir(Path(root))
    read = _read_bin if fmt == "bin" else _read_py
    train = [read(p) for p in _train_files(directory, fmt)]
    test = [read(directory / ("test_batch.bin" if fmt == "bin" else "test_batch"))]
    return _to_dataset(train, normalize), _to_dataset(test, normalize)
