"""Atomic state files: write a temp file, fsync it, rename over the target, fsync the directory.

A crash at any point leaves either the old or the new file, never a torn one (docs/design.md, "Trust").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np


def atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry, not only the file's data)."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {"__nd__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot persist {type(obj).__name__}")


_ALLOWED_DTYPES = {"<f4", "<f8", "<f2", "<i8", "<i4", "|i1", "|u1", "|b1", "<i2"}


def _hook(d: dict[Any, Any]) -> Any:
    if d.get("__nd__") is True:
        if d["dtype"] not in _ALLOWED_DTYPES:
            raise ValueError(f"state file: dtype {d['dtype']} not allowed")
        return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()
    return d


def dumps(obj: Any) -> bytes:
    """msgpack with numpy arrays as tagged raw bytes — no pickle in state files."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def loads(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, object_hook=_hook, strict_map_key=False)


def save_state(path: str | Path, obj: Any) -> None:
    atomic_write(path, dumps(obj))


def load_state(path: str | Path) -> Any | None:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return loads(data)
