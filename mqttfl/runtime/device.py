"""A device node: the device's protocol machine, its local data and its stage backend, on the runtime loop.

The device agent builds one per process (the torch modules load once it is online, ``mqttfl.runtime.preload``,
so its cold start does not wait for them); a process of virtual devices (``mqttfl.tools.virtual``) builds many,
sharing one opened shard and one loaded torch, each with its own MQTT connection, session, presence and will.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mqttfl.ml.shard import label_counts, open_shard
from mqttfl.protocol.device import DeviceMachine
from mqttfl.protocol.helper import HelperDevice, StageServer
from mqttfl.runtime.config import AgentConfig, DeviceSection, parse_section
from mqttfl.runtime.journal import Journal
from mqttfl.runtime.loop import Machine
from mqttfl.runtime.netloop import SocketLoop
from mqttfl.runtime.node import Node
from mqttfl.runtime.persist import load_state
from mqttfl.runtime.preload import DeferredBackend, Preload, deferred
from mqttfl.runtime.replay import ReplayBackend

STATE_FILE = "device.state"  # the top-k error-feedback residual (docs/algorithms.md, "Compression")


def build_device(cfg: AgentConfig, *, data: Any = None, held_out: Any = None, replay: bool = False,
                 driver: SocketLoop | None = None, journal: Journal | None = None) -> Node:
    """The device node of ``cfg``. ``data``/``held_out``: shards already open (virtual devices share them; by
    default the ``[device]`` paths are opened). ``replay``: a fixed update instead of training
    (:class:`ReplayBackend`). ``driver``: the network loop serving its client and ``journal`` the journal holding its
    outbox and keyed state (virtual devices share both). A node without data and with ``serve`` is a helper only."""
    sec: DeviceSection = parse_section(DeviceSection, cfg.section, "device")
    if data is None and sec.data:
        data = open_shard(sec.data)  # memory-mapped: batches are read from disk as training asks for them
        held_out = open_shard(sec.eval_data) if sec.eval_data else None
    preload = Preload(("mqttfl.ml.backend", "mqttfl.ml.models"))
    schemas = deferred(preload, "mqttfl.ml.models", "schema_of")
    prefix = os.urandom(4).hex()
    device: DeviceMachine | None = None
    if data is not None:
        labels = label_counts(data.labels()) if sec.share_labels else None
        restored = load_state(Path(cfg.state_dir) / STATE_FILE) if cfg.state_dir else None
        device = DeviceMachine(
            cfg.node, edge=sec.edge, cloud=sec.cloud, n_samples=len(data), cut=sec.cut if sec.cut > 0 else None,
            labels=labels, label_format=data.label_format, eval_samples=len(held_out) if held_out else 0,
            schemas=schemas, act_timeout_s=sec.act_timeout_s, migrate_timeout_s=sec.migrate_timeout_s,
            id_prefix=prefix, encodings=sec.encodings(), topk_ratio=sec.topk_ratio, attack_scale=sec.attack_scale,
            restored=restored, klass=sec.klass, memory_limit=int(sec.memory_mb * 2**20))
    machine: Machine
    if sec.serve or device is None:
        # Middle stages of the pipelines of the devices ``serve`` names (docs/design.md, "Pipeline").
        server = StageServer(cfg.node, serve=tuple(sec.serve), schemas=schemas,
                             memory_bytes=int(sec.memory_mb * 2**20), act_timeout_s=sec.act_timeout_s, id_prefix=prefix)
        machine = HelperDevice(device, server)  # with data it also trains its own and helps its neighbours
    else:
        machine = device

    def backend() -> Any:
        if replay:
            return ReplayBackend(cfg.node, len(data) if data is not None else 0)
        return preload.module("mqttfl.ml.backend").TorchBackend(cfg.node, data=data, test=held_out,
                                                                  slowdown=sec.slowdown, step_delay_s=sec.step_delay_s,
                                                                  block_ms=sec.block_ms)

    # A device hears its edge's group announcements (model broadcasts) besides its own inbox.
    return Node(cfg, machine, DeferredBackend(backend), cloud=sec.cloud, edge_brokers=sec.brokers(),
                state_file=STATE_FILE, preload=preload, driver=driver, journal=journal, edge_broadcasts=("model",))
