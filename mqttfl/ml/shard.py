"""Shards: a device's local data on disk, read lazily (docs/data.md).

A shard is an uncompressed ``.npz`` with two arrays, ``x`` (one row per sample) and ``y`` (labels). Other arrays
are ignored. :func:`open_shard` memory-maps both straight from the zip file (numpy's own ``np.load`` cannot map
an ``.npz`` member), so a board reads the rows of each mini-batch from disk and never holds the whole shard in
RAM; the pages it touched are clean file pages the kernel can drop at will. A compressed ``.npz`` is accepted
but has to be read whole.

Any dtype that converts safely is accepted and converted batch by batch: inputs of any integer, boolean or float
type become float32; 1-D integer labels are class indices (int64, >= 0); 1-D float labels are one regression
target and 2-D labels are float targets (regression, or 0/1 per label for multi-label). Object, string and complex
arrays are refused, and so are non-finite inputs, which are checked once at open in bounded chunks. Only numpy is
imported here: a board never imports scikit-learn or torch to read its data.
"""

from __future__ import annotations

import struct
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.ml.data import Dataset
from mqttfl.protocol.plan import LabelFormat

CHECK_CHUNK_BYTES = 8 << 20  # the open-time finiteness check reads at most this much at a time


def label_format(y: np.ndarray) -> LabelFormat:
    """What converted labels are: int64 class indices, or float32 (N, K) targets."""
    if y.ndim == 1:
        return LabelFormat("class", int(y.max()) + 1 if y.size else 0)
    return LabelFormat("target", int(y.shape[1]))


def label_counts(y: np.ndarray) -> list[int] | None:
    """Samples per class, or positives per label of 0/1 targets (the histogram a device may share); None for
    regression targets."""
    if y.ndim == 1:
        return np.bincount(y, minlength=int(y.max()) + 1 if y.size else 0).astype(np.int64).tolist()
    if np.isin(y, (0.0, 1.0)).all():
        return y.sum(axis=0).astype(np.int64).tolist()
    return None


def _member_memmap(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray | None:
    """A read-only memory map of one stored (uncompressed) ``.npy`` member, or None if it is compressed."""
    info = zf.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise ValueError(f"bad zip entry {name}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version} in {name}")
        offset = f.tell()
    _check_dtype(name, dtype)
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _check_dtype(name: str, dtype: np.dtype[Any]) -> None:
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"'{name}' has dtype {dtype}; numbers (bool, int, uint, float) are needed")


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
            missing = {"x", "y"} - names
            if missing:
                raise ValueError(f"it lacks {sorted(missing)} (has {sorted(names)})")
            x, y = _member_memmap(path, zf, "x"), _member_memmap(path, zf, "y")
        if x is not None and y is not None:
            return x, y, True
        with np.load(path, allow_pickle=False) as npz:  # compressed: read whole
            x, y = npz["x"], npz["y"]
        _check_dtype("x", x.dtype)
        _check_dtype("y", y.dtype)
        return x, y, False
    except (ValueError, zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise ValueError(f"not a valid mqttfl shard: {path}: {e}") from e


class Shard:
    """A shard opened for reading (a ``DataSource``): rows are read, and converted, one batch at a time."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        self.x, self.y, self.memory_mapped = _load_arrays(self.path)
        x, y = self.x, self.y
        if x.ndim < 2 or y.ndim not in (1, 2) or len(x) != len(y):
            raise ValueError(f"shard {path}: x{x.shape} and y{y.shape} need one row per sample (x with ndim >= 2)")
        self._y: np.ndarray
        if y.ndim == 1 and y.dtype.kind in "biu":
            self._y = np.asarray(y, dtype=np.int64)
            if self._y.size and self._y.min() < 0:
                raise ValueError(f"shard {path} has negative labels")
        else:
            self._y = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
            if not np.isfinite(self._y).all():
                raise ValueError(f"shard {path} has NaN/Inf targets")
        self.label_format = label_format(self._y)
        self._check_finite()

    def _check_finite(self) -> None:
        if self.x.dtype.kind != "f" or len(self.x) == 0:
            return
        rows = max(1, CHECK_CHUNK_BYTES // max(1, self.x[0].nbytes))
        for start in range(0, len(self.x), rows):
            if not np.isfinite(self.x[start : start + rows]).all():
                raise ValueError(f"shard {self.path} has NaN/Inf inputs (rows {start}..{start + rows - 1})")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.x[idx], dtype=np.float32), self._y[idx]

    def labels(self) -> np.ndarray:
        return self._y

    def load(self) -> Dataset:
        """All of it in memory (a copy, not the map)."""
        return Dataset(np.array(self.x, dtype=np.float32, order="C"), self._y)


def save_shard(path: str | PathLike[str], ds: Dataset) -> None:
    """Write ``ds`` as an uncompressed .npz (x, y) at exactly ``path``: what :func:`open_shard` memory-maps."""
    # A file object, because np.savez would append ".npz" to a path that lacks it.
    with open(path, "wb") as f:
        np.savez(f, x=ds.x, y=ds.y)


def open_shard(path: str | PathLike[str]) -> Shard:
    """Open a shard lazily; a ValueError says what is wrong with it. Pickles are never loaded."""
    return Shard(path)


def load_shard(path: str | PathLike[str]) -> Dataset:
    """A shard read whole into memory (converted to float32 inputs)."""
    return Shard(path).load()
