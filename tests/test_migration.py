"""FedFly migration with real processes: lossless moves on both paths, failures and fallbacks.

Every run is deterministic (seeded model, seeded batch order, one device per edge round), so a migrated run
must end with exactly the weights of the same run without the move.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mqttfl.ml.data import load_digits
from mqttfl.runtime.persist import load_state
from mqttfl.runtime.transport import Inbound
from mqttfl.tools.testbed import FleetSpec, Testbed

DATA = load_digits((64,))
CLOUD = {"rounds": 1, "batch_size": 4, "epochs": 1, "deadline_s": 90.0, "run": "mig", "quorum": 1.0}
TOTAL_STEPS = {}  # device -> mini-batches per round, from its shard size


def _spec(devices: dict[str, str], **device_extra: Any) -> FleetSpec:
    return FleetSpec(devices=devices, extra_edges=("edge1", "edge2"), model="mlp", input_shape=(64,),
                     cloud=dict(CLOUD), device_extra={d: dict(device_extra) for d in devices})


def _global(tb: Testbed) -> dict[str, np.ndarray]:
    return load_state(tb.root / "state" / "cloud" / "cloud.state")["global"]


def _run(root: Path, spec: FleetSpec, on_message=None, before=None, timeout: float = 120.0):
    tb = Testbed(root, spec, data=DATA)
    tb.prepare()
    tb.start()
    try:
        if before is not None:
            before(tb)
        tb.wait(lambda m: m.kind == "event" and (m.data or {}).get("event") == "run_complete", timeout,
                on_message=(lambda m: on_message(tb, m)) if on_message else None)
        events = [m.data for m in tb.inbox if m.kind == "event" and m.data]
        return _global(tb), tb.round_metrics(), events
    except Exception:
        for n in tb.procs:
            print(f"--- {n}\n{tb.log_tail(n, 2000)}")
        raise
    finally:
        tb.stop()


def _mover(moves: dict[str, tuple[str, str]], *, destination_online: bool = True):
    """Send each device its move once the device reports it is training (so the move lands mid-round) and, unless
    told otherwise, its destination is online: an edge that is not yet subscribed cannot hear the transfer, and
    the migration would rightly fail ("destination did not answer") rather than be tested."""
    sent: set[str] = set()
    training: set[str] = set()
    online: set[str] = set()

    def on(tb: Testbed, m: Inbound) -> None:
        d = m.data or {}
        if m.kind != "status":
            return
        if d.get("state") == "offline":
            online.discard(m.src)
        else:
            online.add(m.src)
        if m.src in moves:
            (training.add if d.get("state") == "training" else training.discard)(m.src)
        for dev in sorted(training - sent):
            edge, path = moves[dev]
            if edge in online or not destination_online:
                sent.add(dev)
                tb.send_ctl(dev, "move", edge=edge, path=path)

    return on


def _events(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e.get("event") == name]


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same deterministic run without any move."""
    w, metrics, _ = _run(tmp_path_factory.mktemp("ref"), _spec({"dev1": "edge1"}))
    return w, metrics


@pytest.mark.parametrize("path", ["direct", "relay"])
def test_migrated_run_ends_with_the_weights_of_the_unmigrated_run(reference, tmp_path, path):
    ref_w, ref_metrics = reference
    w, metrics, events = _run(tmp_path, _spec({"dev1": "edge1"}), on_message=_mover({"dev1": ("edge2", path)}))
    done = _events(events, "migration_done")
    assert len(done) == 1 and done[0]["path"] == path and done[0]["destination"] == "edge2"
    steps = ref_metrics[0]["devices"]["dev1"]
    total = metrics[0]["devices"]["dev1"]
    assert 0 < done[0]["step"] < 360, "the move happened mid-round"
    assert done[0]["checkpoint_bytes"] > 0 and done[0]["pause_ms"] > 0
    assert total["edge"] == "edge2", "the device's round was reported by the destination edge"
    assert _max_diff(w, ref_w) == 0.0, "migration changed the training result"
    # No mini-batch trained twice or skipped: the same count of device samples as without the move.
    assert total["samples"] == steps["samples"]


def test_no_mini_batch_is_trained_twice_or_skipped_across_a_move(tmp_path):
    w, metrics, events = _run(tmp_path, _spec({"dev1": "edge1"}), on_message=_mover({"dev1": ("edge2", "direct")}))
    assert len(_events(events, "migration_done")) == 1
    dev = metrics[0]["devices"]["dev1"]
    # The edge counts optimizer steps across the move (carried in the checkpoint), the device its own.
    n = dev["samples"]
    assert dev["edge_steps"] == dev["steps"] == -(-n // CLOUD["batch_size"])
    assert dev["seen"] == n


def test_destination_killed_during_transfer_device_continues_at_source(reference, tmp_path):
    ref_w, _ = reference
    w, metrics, events = _run(
        tmp_path, _spec({"dev1": "edge1"}, migrate_timeout_s=2.0),
        before=lambda tb: tb.kill("edge2"),
        on_message=_mover({"dev1": ("edge2", "direct")}, destination_online=False),
    )
    failed = _events(events, "migration_failed")
    assert failed and failed[0]["action"] == "continue at source"
    assert metrics[0]["devices"]["dev1"]["edge"] == "edge1"
    assert _max_diff(w, ref_w) == 0.0, "a failed move lost or repeated work"


def test_source_killed_falls_back_to_restart_at_destination(tmp_path):
    def on(tb: Testbed, m: Inbound) -> None:
        d = m.data or {}
        if m.kind == "status" and m.src == "dev1" and d.get("state") == "training" and not tb.procs["edge1"].poll():
            tb.kill("edge1", signal.SIGKILL)
            tb.send_ctl("dev1", "move", edge="edge2")

    w, metrics, events = _run(tmp_path, _spec({"dev1": "edge1"}, act_timeout_s=1.5, migrate_timeout_s=2.0),
                              on_message=on)
    assert _events(events, "migration_fallback"), "the device said it restarts at the destination"
    assert _events(events, "round_restarted_for_device")
    assert metrics[0]["participants"] == 1 and metrics[0]["devices"]["dev1"]["edge"] == "edge2"
    assert all(np.isfinite(v).all() for v in w.values())


def test_devices_move_at_once_and_one_moves_back(tmp_path_factory):
    devices = {"dev1": "edge1", "dev2": "edge1"}
    ref_w, _, _ = _run(tmp_path_factory.mktemp("ref2"), _spec(devices))
    back = {"sent": False}
    mover = _mover({"dev1": ("edge2", "direct"), "dev2": ("edge2", "relay")})

    def on(tb: Testbed, m: Inbound) -> None:
        mover(tb, m)
        d = m.data or {}
        if m.kind == "event" and d.get("event") == "migration_done" and d.get("device") == "dev1" and not back["sent"]:
            back["sent"] = True
            tb.send_ctl("dev1", "move", edge="edge1", path="direct")  # and back again, same round

    w, metrics, events = _run(tmp_path_factory.mktemp("mig2"), _spec(devices), on_message=on)
    done = _events(events, "migration_done")
    assert sorted((e["device"], e["destination"]) for e in done) == [("dev1", "edge1"), ("dev1", "edge2"),
                                                                     ("dev2", "edge2")]
    devs = metrics[0]["devices"]
    assert devs["dev1"]["edge"] == "edge1" and devs["dev2"]["edge"] == "edge2"
    # Two devices: the cloud sums their deltas in arrival order, so allow float rounding only.
    assert _max_diff(w, ref_w) <= 1e-6
