"""Helpers shared by the benchmarks: percentiles, one output path (a table, or exactly one JSON object), the
output folder every benchmark writes its files into (``--out``) and its work directory (``--workdir``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

OUT_ROOT = Path("bench-results")  # default --out is OUT_ROOT/<bench>, never the working directory itself
RESULTS_FILE = "results.json"


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


def add_out_argument(p: argparse.ArgumentParser, bench: str) -> None:
    p.add_argument("--out", type=Path, default=OUT_ROOT / bench,
                   help=f"folder for the bench's files ({RESULTS_FILE}, plots); created if missing "
                        f"(default: {OUT_ROOT / bench})")


def out_dir(args: argparse.Namespace) -> Path:
    """The bench's output folder, created before any measuring: a bad --out fails at once, not after the run."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def work_dir(args: argparse.Namespace, bench: str) -> Iterator[Path]:
    """Where the bench's fleets keep configs, logs and state: ``--workdir`` (created, kept), else a temporary
    folder removed afterwards, whether the bench succeeded or not."""
    if args.workdir:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
        yield root
    else:
        with tempfile.TemporaryDirectory(prefix=f"mqttfl-bench-{bench}-") as d:
            yield Path(d)


def save_results(out: Path, results: dict[str, Any]) -> Path:
    path = out / RESULTS_FILE
    path.write_text(json.dumps(results, sort_keys=True, indent=2) + "\n")
    return path
