"""Test helpers shared by integration tests (real broker, real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mqttfl.broker import Broker
from mqttfl.config import AgentConfig, load_config


def agent_config(broker: Broker, fleet: str, node: str, role: str = "test", state_dir: Path | None = None,
                 **mqtt: Any) -> AgentConfig:
    return load_config(None, role, environ={}, node=node, fleet=fleet,
                       state_dir=str(state_dir) if state_dir else "",
                       mqtt={"host": broker.host, "port": broker.port, **mqtt})


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Minimal TOML writer for test configs (scalars, lists, one level of tables)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(type(v))

    lines = [f"{k} = {val(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def spawn(module: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    f = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
