"""Test helpers shared by integration tests (real broker, real processes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mqttfl.runtime.config import AgentConfig, load_config
from mqttfl.tools.broker import Broker
from mqttfl.tools.testbed import write_toml  # noqa: F401  (re-exported for tests)


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


def spawn(module: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    f = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=f, stderr=subprocess.STDOUT, env=env)


def schema(model: str, input_shape: tuple[int, ...] | None = None, num_classes: int = 10) -> Any:
    """The model's schema (blocks, default cut) for a registered model at its paper's input shape by default."""
    from mqttfl.ml.models import MODELS, schema_of
    from mqttfl.protocol.schema import ModelRef

    shape = tuple(input_shape) if input_shape is not None else MODELS[model].input_shape
    return schema_of(ModelRef(model, shape, num_classes))


def chunks(x: Any, y: Any, batch_size: int = 500) -> Any:
    """(inputs, labels) tensors of consecutive rows: what ``mqttfl.ml.stage.evaluate`` takes."""
    import torch

    for start in range(0, len(x), batch_size):
        yield torch.as_tensor(x[start : start + batch_size]), torch.as_tensor(y[start : start + batch_size])


def ignore_sigint() -> None:
    """``preexec_fn`` for a child that starts with SIGINT ignored, as every process of a background job does
    (``make test &``): a console tool must still stop on Ctrl-C then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
