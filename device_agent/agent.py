"""Device agent: the device's protocol machine, its local data and its first stage, on the runtime loop.

Everything the device decides is in :mod:`mqttfl.protocol.device`; this shell only reads ``[device]``, opens
the data shard and wires machine, torch backend and transport together. With ``serve`` the node is also (or,
without data, only) a helper: a middle stage of its neighbours' pipelines (:mod:`mqttfl.protocol.helper`).
"""

from __future__ import annotations

import os
from pathlib import Path

from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.models import schema_of
from mqttfl.ml.shard import label_counts, open_shard
from mqttfl.protocol.device import DeviceMachine
from mqttfl.protocol.helper import HelperDevice, StageServer
from mqttfl.runtime.config import AgentConfig, DeviceSection, parse_section
from mqttfl.runtime.loop import Machine
from mqttfl.runtime.node import Node
from mqttfl.runtime.persist import load_state

STATE_FILE = "device.state"  # the top-k error-feedback residual (docs/algorithms.md, "Compression")


def build(cfg: AgentConfig) -> Node:
    sec: DeviceSection = parse_section(DeviceSection, cfg.section, "device")
    data = open_shard(sec.data) if sec.data else None  # memory-mapped: batches are read as training asks
    held_out = open_shard(sec.eval_data) if sec.eval_data else None
    prefix = os.urandom(4).hex()
    device: DeviceMachine | None = None
    if data is not None:
        labels = label_counts(data.labels()) if sec.share_labels else None
        restored = load_state(Path(cfg.state_dir) / STATE_FILE) if cfg.state_dir else None
        device = DeviceMachine(
            cfg.node, edge=sec.edge, cloud=sec.cloud, n_samples=len(data), cut=sec.cut if sec.cut > 0 else None,
            labels=labels, label_format=data.label_format, eval_samples=len(held_out) if held_out else 0,
            schemas=schema_of, act_timeout_s=sec.act_timeout_s, migrate_timeout_s=sec.migrate_timeout_s,
            id_prefix=prefix, encodings=sec.encodings(), topk_ratio=sec.topk_ratio,
            attack_scale=sec.attack_scale, restored=restored, klass=sec.klass,
            memory_limit=int(sec.memory_mb * 2**20))
    machine: Machine = device if device is not None else HelperDevice(None, _server(cfg, sec, prefix))
    if device is not None and sec.serve:
        machine = HelperDevice(device, _server(cfg, sec, prefix))  # trains its own data and helps its neighbours
    backend = TorchBackend(cfg.node, data=data, test=held_out, slowdown=sec.slowdown, step_delay_s=sec.step_delay_s,
                           block_ms=sec.block_ms)
    return Node(cfg, machine, backend, cloud=sec.cloud, edge_brokers=sec.brokers(), state_file=STATE_FILE)


def _server(cfg: AgentConfig, sec: DeviceSection, prefix: str) -> StageServer:
    """Middle stages of the pipelines of the devices ``[device] serve`` names (docs/design.md, "Pipeline")."""
    return StageServer(cfg.node, serve=tuple(sec.serve), schemas=schema_of, memory_bytes=int(sec.memory_mb * 2**20),
                       act_timeout_s=sec.act_timeout_s, id_prefix=prefix)
