"""Reading CSV/TSV for ``mqttfl data``: feature columns, label columns and an optional partition column.

The first row names the columns; columns are chosen by name (or 0-based index). Feature cells must be numbers
(an empty or non-numeric feature cell is refused with its row and column: drop the column with ``--drop`` or
clean the file). Labels follow the task: ``classification`` takes integers as class indices and maps any other
values (strings, or integers with a negative one) to 0..K-1 in sorted order, keeping the names; ``regression``
takes numbers; ``multilabel`` takes 0/1 in each label column. Without ``--task`` the labels decide: one column
of integers or words is classification, one column of other numbers is regression, several columns of 0/1 are
multi-label and of other numbers regression.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("classification", "regression", "multilabel")


@dataclass
class Table:
    x: np.ndarray  # float32 (N, features)
    y: np.ndarray  # int64 (N,) classes, or float32 (N, K)
    task: str
    features: list[str]
    labels: list[str]
    classes: list[str] = field(default_factory=list)  # class names, by index (classification)
    groups: np.ndarray | None = None  # the partition column's values (str), when one is named


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def _column(header: list[str], name: str) -> int:
    if name in header:
        return header.index(name)
    if name.isdigit() and int(name) < len(header):
        return int(name)
    raise ValueError(f"no column {name!r}; the columns are {header}")


def read_table(path: Path, *, label: list[str], features: list[str] | None = None, drop: list[str] | None = None,
               group: str | None = None, task: str | None = None, delimiter: str | None = None) -> Table:
    sep = delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f, delimiter=sep) if r]
    if len(rows) < 2:
        raise ValueError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    for line, cells in enumerate(body, start=2):
        if len(cells) != len(header):
            raise ValueError(f"{path}: row {line} has {len(cells)} cells, the header {len(header)}")
    label_idx = [_column(header, c) for c in label]
    group_idx = _column(header, group) if group else None
    dropped = {_column(header, c) for c in drop or ()}
    if features:
        feat_idx = [_column(header, c) for c in features]
    else:
        feat_idx = [i for i in range(len(header)) if i not in set(label_idx) | dropped | {group_idx}]
    if not feat_idx:
        raise ValueError(f"{path}: no feature columns left")
    x = np.empty((len(body), len(feat_idx)), np.float32)
    for r, cells in enumerate(body):
        for c, i in enumerate(feat_idx):
            v = _number(cells[i])
            if v is None or not np.isfinite(v):
                raise ValueError(f"{path}: row {r + 2}, column {header[i]!r}: {cells[i]!r} is not a number "
                                 "(drop the column with --drop, or clean the file)")
            x[r, c] = v
    raw = [[row[i].strip() for i in label_idx] for row in body]
    t = task or _guess(raw)
    if t not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {t!r}")
    y, classes = _labels(raw, t, path, [header[i] for i in label_idx])
    groups = np.array([row[group_idx].strip() for row in body]) if group_idx is not None else None
    return Table(x, y, t, [header[i] for i in feat_idx], [header[i] for i in label_idx], classes, groups)


def _guess(raw: list[list[str]]) -> str:
    values = [v for row in raw for v in row]
    nums = [_number(v) for v in values]
    if len(raw[0]) > 1:
        return "multilabel" if all(n in (0.0, 1.0) for n in nums) else "regression"
    if any(n is None for n in nums) or all(n is not None and n.is_integer() for n in nums):
        return "classification"
    return "regression"


def _labels(raw: list[list[str]], task: str, path: Path, names: list[str]) -> tuple[np.ndarray, list[str]]:
    if task == "classification":
        if len(names) != 1:
            raise ValueError(f"{path}: classification takes one label column, got {names}")
        values = [row[0] for row in raw]
        nums = [_number(v) for v in values]
        if all(n is not None and n.is_integer() and n >= 0 for n in nums):
            y = np.array([int(n) for n in nums if n is not None], np.int64)
            return y, [str(c) for c in range(int(y.max()) + 1)]
        classes = sorted(set(values))
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[v] for v in values], np.int64), classes
    y = np.empty((len(raw), len(names)), np.float32)
    for r, row in enumerate(raw):
        for c, v in enumerate(row):
            n = _number(v)
            if n is None or not np.isfinite(n) or (task == "multilabel" and n not in (0.0, 1.0)):
                want = "0 or 1" if task == "multilabel" else "a number"
                raise ValueError(f"{path}: row {r + 2}, label {names[c]!r}: {v!r} is not {want}")
            y[r, c] = n
    return y, []
