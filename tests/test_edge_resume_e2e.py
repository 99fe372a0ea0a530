"""An edge killed mid-round with SIGKILL resumes its devices' sessions (docs/design.md, "Edge resume"): real
agent processes, a real broker. The round completes at its first attempt with every device, and the model
equals the unsplit reference: no work was lost, nothing was trained twice into the model."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from mqttfl.runtime.journal import Journal
from mqttfl.runtime.node import KEYED_PREFIX
from mqttfl.runtime.outbox import JOURNAL_FILE
from mqttfl.runtime.transport import Inbound
from mqttfl.tools import testbed
from mqttfl.tools.broker import Broker
from tests.helpers import wait_for
from tests.reference import TOL, max_abs_diff, reference_global
from tests.test_split_e2e import cloud_state, digits


def test_an_edge_killed_mid_round_resumes_and_the_round_loses_no_work(tmp_path: Path, broker: Broker,
                                                                      fleet: str) -> None:
    spec = testbed.FleetSpec(devices={"dev1": "edge1", "dev2": "edge1"}, model="mlp", input_shape=(64,), fleet=fleet,
                             device_extra={d: {"step_delay_s": 0.05, "act_timeout_s": 2.0} for d in ("dev1", "dev2")},
                             cloud={"rounds": 2, "batch_size": 16, "lr": 0.05, "seed": 5, "deadline_s": 90.0,
                                    "resume_every": 4})
    data = digits((64,))
    with testbed.Testbed(tmp_path, spec, broker=broker, data=data) as tb:
        tb.prepare()
        tb.start()
        tb.wait_event("round_started", 120, round=0)
        # Both at step 9: a device there has the gradient of batch 8, which the edge sends only once its boundary-8
        # save is synced, so the kill finds both sessions saved at 8 or later.
        for d in ("dev1", "dev2"):
            wait_for(lambda d=d: tb.ctl(d, "train_stats")["result"]["step"] >= 9, timeout=60, interval=0.2,
                     what=f"{d} at step 9")
        tb.kill("edge1", signal.SIGKILL)
        killed = time.monotonic()
        saved = sorted(Journal(tmp_path / "state" / "edge1" / JOURNAL_FILE, readonly=True).keys(KEYED_PREFIX))
        tb.start_node("edge1")
        restarted = time.monotonic()
        found: dict[str, dict[str, object]] = {}

        def both_resumed(m: Inbound) -> bool:  # in whichever order the two devices come back
            if m.kind == "event" and m.data and m.data.get("event") == "round_resumed":
                found[m.data.get("device")] = m.data
            return set(found) >= {"dev1", "dev2"}

        tb.wait(both_resumed, 60, stop_on_run_failed=True)
        resumed = [found["dev1"], found["dev2"]]
        back = time.monotonic()
        tb.wait_event("run_complete", 180)
        rounds = tb.round_metrics()
        events = [m.data for m in tb.inbox if m.kind == "event" and m.data]
    assert saved == [KEYED_PREFIX + "session.dev1", KEYED_PREFIX + "session.dev2"]
    assert all(r["step"] % 4 == 0 and r["step"] >= 8 for r in resumed), resumed
    assert [e["event"] for e in events if e.get("event") in ("devices_missing", "quorum_not_met")] == []
    assert [(r["round"], r["attempt"], r["participants"]) for r in rounds] == [(0, 0, 2), (1, 0, 2)]
    diff = max_abs_diff(cloud_state(tmp_path)["global"], reference_global(spec, data[0], rounds=2))
    assert diff <= TOL, f"the edge's crash changed the model by {diff:.3g}"
    print("\nedge resume:", json.dumps({"restart_to_resumed_s": round(back - restarted, 2),
                                        "kill_to_resumed_s": round(back - killed, 2),
                                        "replayed_steps": [r["replayed"] for r in resumed]}))
