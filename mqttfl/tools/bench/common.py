"""Helpers shared by the benchmarks: percentiles, and one output path (a table, or exactly one JSON object)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    """A table cell: numbers rounded, with an optional unit."""
    if isinstance(value, float):
        text = f"{value:.{digits}f}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def emit(results: dict[str, Any], rows: list[tuple[str, str]], as_json: bool, *, out: TextIO | None = None) -> None:
    """Print ``results`` as exactly one JSON object (machine use), or ``rows`` as a two-column table."""
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps(results, sort_keys=True) + "\n")
    else:
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            out.write(f"{key.ljust(width)}  {value}\n")
    out.flush()
