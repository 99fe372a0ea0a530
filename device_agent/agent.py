"""Device agent: the device's protocol machine, its local data and its first stage, on the runtime loop.

Everything the device decides is in :mod:`mqttfl.protocol.device`; the node is built by
:func:`mqttfl.runtime.device.build_device` from ``[device]``. The torch modules load once the agent is online
(``mqttfl.runtime.preload``): a device's cold start does not wait for them. With ``serve`` the node is also
(or, without data, only) a helper: a middle stage of its neighbours' pipelines (:mod:`mqttfl.protocol.helper`).
"""

from __future__ import annotations

from mqttfl.runtime.config import AgentConfig
from mqttfl.runtime.device import build_device
from mqttfl.runtime.node import Node


def build(cfg: AgentConfig) -> Node:
    return build_device(cfg)
