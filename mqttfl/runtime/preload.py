"""Loading the training stack after an agent is online (a device's cold start).

``import torch`` is most of a device agent's start-up: about a second and 200 MB on this machine, more on a
board, and several devices starting at once on one host share its cores. A device does not need torch to be
online (presence, its status with the sample count the cloud waits for), only to check a plan and to train. So
the device agent connects first and imports the torch modules right after, before its loop takes the first
message; whatever needs them (:class:`DeferredBackend`, :func:`deferred`) loads them on first use should that
come earlier (docs/design.md, "Runtime"). The import runs on the agent's own thread: on a thread of its own it
fought the network thread for the interpreter lock and took several times as long.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from mqttfl.protocol import stage


class Preload:
    """Imports ``modules`` (torch first, with ``threads`` intra-op threads) once, when first asked."""

    def __init__(self, modules: tuple[str, ...], threads: int = 1) -> None:
        self.modules = modules
        self.threads = threads  # torch's intra-op threads (the agent's --threads or [section] threads)
        self.ready_s: float | None = None  # seconds the imports took, once they are done

    def load(self) -> None:
        if self.ready_s is not None:
            return
        t0 = time.monotonic()
        import torch

        torch.set_num_threads(self.threads)
        for name in self.modules:
            importlib.import_module(name)
        self.ready_s = time.monotonic() - t0

    def module(self, name: str) -> Any:
        self.load()
        return importlib.import_module(name)


def deferred(preload: Preload, module: str, attr: str) -> Callable[..., Any]:
    """A function that calls ``module.attr``, loading the stack first if need be (a device's ``schemas``)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(preload.module(module), attr)(*args, **kwargs)
    return call


class DeferredBackend:
    """A stage backend built on its first job, once the stack is loaded."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._backend: Any = None

    def built(self) -> Any:
        """The backend itself, built now if no job has built it yet (its emulated speed is set on it)."""
        if self._backend is None:
            self._backend = self._build()
        return self._backend

    def run(self, job: stage.Job) -> Any:
        return self.built().run(job)
