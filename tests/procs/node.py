"""A bare node: one Transport with a state dir and an on-disk outbox, run as its own process.

It announces presence (retained status, last will), optionally sends reliable messages, records every binary
message it receives as one JSON line in ``--record``, acknowledges reliable ones, re-sends its outbox on the
agent-loop timer, and on SIGTERM stops cleanly (publishing offline itself). Tests kill it with SIGKILL to
exercise the paths that a clean stop never takes.

    python -m tests.procs.node --port P --fleet F --node N --state-dir D [--record FILE]
        [--send DST --count K] [--resend-after S] [--no-ack]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from mqttfl.runtime.config import load_config
from mqttfl.runtime.outbox import Outbox
from mqttfl.runtime.transport import Transport


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--record", help="append one JSON line per event / received binary message")
    p.add_argument("--send", metavar="DST", help="send --count reliable 'delta' messages to DST after connecting")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--resend-after", type=float, default=0.5)
    p.add_argument("--no-ack", action="store_true", help="receive without acknowledging")
    a = p.parse_args(argv)

    state = Path(a.state_dir)
    cfg = load_config(None, "test", environ={}, node=a.node, fleet=a.fleet, state_dir=str(state),
                      mqtt={"host": a.host, "port": a.port})
    record = open(a.record, "a") if a.record else None  # open for the life of the process

    def note(**fields: object) -> None:
        if record is not None:
            record.write(json.dumps(fields) + "\n")
            record.flush()

    running = True

    def on_term(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, on_term)
    t = Transport(cfg, outbox=Outbox(state / "outbox"), status_fields={"state": "online"})
    t.start()
    # Fields set after CONNECT: the last will (fixed at CONNECT) cannot carry them, a clean offline does.
    t.set_status("online", pid=os.getpid(), clean_stop_capable=True)
    links = t.link_changes()
    note(event="ready", boot=t.boot, pid=os.getpid(),
         session_present=bool(links and links[-1].session_present), outbox=len(t.outbox or ()))
    if a.send:
        for i in range(a.count):
            env = t.send("delta", a.send, body={"i": i, "boot": t.boot}, reliable=True)
            note(event="sent", id=env.id.hex(), i=i)
    while running:
        msg = t.get(timeout=0.05)
        if msg is not None and msg.env is not None:
            note(event="received", id=msg.env.id.hex(), kind=msg.kind, src=msg.src, body=msg.env.body)
            if msg.env.body.get("reliable") and not a.no_ack:
                t.ack(msg)
        t.housekeeping(time.monotonic(), resend_after=a.resend_after)
    t.stop()
    note(event="stopped", boot=t.boot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
