"""What the cloud keeps of a committed round, and where (docs/design.md, "Cloud"; docs/operations.md, "Metrics").

A round's full record lists every device: its costs (``devices``), the sampled and the missing ones, the
planned cuts. That record goes to the run log once, as the round closes; it is never kept in memory. What the
cloud keeps (``history``, persisted with its state on every round) and what it publishes on ``metrics`` must
not grow with the fleet, or a fleet of thousands would cost the cloud O(rounds x devices) memory and every
persist O(rounds x devices) time:

* the history entry keeps the round's scalars, the per-class summaries (``classes``), the ``slowest`` few
  devices, and counts instead of device lists (``missing_count``);
* the round's metrics carry every device's costs only for rounds of at most ``[cloud] metrics_devices``
  devices; larger rounds carry the same bounded view as the history (the run log still has every device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keys of a round's record that list devices (each O(devices)); the run log keeps them.
PER_DEVICE = ("devices", "sampled", "missing", "cut_plan")
SLOWEST = 5  # devices named in ``slowest``: what an operator looks at first (mqttfl monitor)


def slowest(devices: Mapping[str, Mapping[str, Any]], k: int = SLOWEST) -> list[dict[str, Any]]:
    """The ``k`` devices with the longest round (``T_total``) and their class, slowest first; O(devices)."""
    rows = sorted(((float(c.get("T_total") or 0.0), d) for d, c in devices.items()), key=lambda t: (-t[0], t[1]))
    return [{"device": d, "T_total": t, "class": devices[d].get("class")} for t, d in rows[:k]]


def bounded(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry without its per-device lists: counts and the slowest few instead. Size independent of N."""
    out = {k: v for k, v in entry.items() if k not in PER_DEVICE}
    if isinstance(entry.get("missing"), list):
        out["missing_count"] = len(entry["missing"])
    if isinstance(entry.get("devices"), Mapping):
        out["slowest"] = slowest(entry["devices"])
    return out


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
