"""What the cloud keeps of a committed round, and where (docs/design.md, "Cloud"; docs/operations.md, "Metrics").

A round's full record lists every device: its costs (``devices``), the sampled and the missing ones, the
planned cuts. That record goes to the run log once, as the round closes; it is never kept in memory. What the
cloud keeps (``history``, persisted with its state on every round) and what it publishes on ``metrics`` must
not grow with the fleet, or a fleet of thousands would cost the cloud O(rounds x devices) memory and every
persist O(rounds x devices) time:

* the history entry keeps the round's scalars, the per-class summaries (``classes``), the ``slowest`` few
  devices, and counts instead of device lists (``missing_count``; asynchronous versions: ``participants_count``;
  a robust strategy's ``aggregation``: ``selected_count``, ``clipped_count``, ...);
* the round's metrics carry every device's costs only for rounds of at most ``[cloud] metrics_devices``
  devices; larger rounds carry the same bounded view as the history (the run log still has every device).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

# Keys of a round's record that list or map devices (each O(devices)); the run log keeps them. A list becomes its
# count (``<key>_count``); ``groups`` (asynchronous: every group's members) has its own metrics entry.
PER_DEVICE = ("devices", "sampled", "missing", "participants", "cut_plan", "groups")
SLOWEST = 5  # devices named in ``slowest``: what an operator looks at first (mqttfl monitor)


def slowest(devices: Mapping[str, Mapping[str, Any]], k: int = SLOWEST) -> list[dict[str, Any]]:
    """The ``k`` devices with the longest round (``T_total``) and their class, slowest first; O(devices)."""
    rows = heapq.nsmallest(k, ((-float(c.get("T_total") or 0.0), d) for d, c in devices.items()))
    return [{"device": d, "T_total": -t, "class": devices[d].get("class")} for t, d in rows]


def _counted(fields: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``fields`` with its lists (all, or those of ``keys``) replaced by their lengths and the maps of ``keys``
    left out; every other value kept (a synchronous round's ``participants`` is a number already)."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if keys is not None and k not in keys:
            out[k] = v
        elif isinstance(v, list):
            out[f"{k}_count"] = len(v)
        elif not isinstance(v, Mapping):
            out[k] = v
    return out


def bounded(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry without its per-device lists: counts and the slowest few instead. Size independent of N."""
    out = _counted(entry, PER_DEVICE)
    if isinstance(entry.get("aggregation"), Mapping):  # Krum's selected, clipping's clipped devices, ...
        out["aggregation"] = _counted(entry["aggregation"])
    if isinstance(entry.get("devices"), Mapping):
        out["slowest"] = slowest(entry["devices"])
    return out


def round_devices(by_edge: Mapping[str, list[str]], limit: int, *, sampled: bool = False) -> dict[str, Any]:
    """Who a starting round's event names: every device by edge (and ``sampled``) for a round of at most ``limit``
    devices, else how many at each edge (``devices_per_edge``)."""
    n = sum(len(ds) for ds in by_edge.values())
    if n <= limit:
        return {"edges": dict(by_edge), **({"sampled": sorted(d for ds in by_edge.values() for d in ds)}
                                          if sampled else {})}
    return {"devices_per_edge": {e: len(ds) for e, ds in by_edge.items()}, "devices_omitted": n}


def for_metrics(entry: dict[str, Any], limit: int) -> dict[str, Any]:
    """The round's metrics: the whole record for a round of at most ``limit`` devices, else the bounded one
    (``devices_omitted`` says how many devices the run log has and the metrics leave out)."""
    devices = entry.get("devices")
    n = len(devices) if isinstance(devices, Mapping) else 0
    sampled = entry.get("sampled")
    n = max(n, len(sampled) if isinstance(sampled, list) else 0)
    if n <= limit:
        return {**entry, "slowest": slowest(devices)} if isinstance(devices, Mapping) else entry
    return {**bounded(entry), "devices_omitted": n}
