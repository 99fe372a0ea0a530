"""Cloud agent: the cloud's protocol machine, the global model's evaluation, and the run's state on disk.

Everything the cloud decides is in :mod:`mqttfl.protocol.cloud`; this shell reads ``[cloud]``, restores the
persisted run, builds the initial model and wires machine, torch backend and transport together.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.models import initial_state, schema_of
from mqttfl.ml.shard import open_shard
from mqttfl.protocol.cloud.machine import CloudMachine
from mqttfl.runtime.config import AgentConfig, read_cloud_section
from mqttfl.runtime.node import Node
from mqttfl.runtime.persist import load_state

STATE_FILE = "cloud.state"


def build(cfg: AgentConfig) -> Node:
    rt, roles, settings = read_cloud_section(cfg.section)
    restored = load_state(Path(cfg.state_dir) / STATE_FILE) if cfg.state_dir else None
    machine = CloudMachine(cfg.node, settings=settings, restored=restored, schemas=schema_of, roles=roles,
                           initial_state=initial_state(settings.training.model_ref, settings.training.seed),
                           run_ids=lambda: f"run-{uuid.uuid4().hex[:8]}")
    test = open_shard(rt.test_data) if rt.test_data else None
    return Node(cfg, machine, TorchBackend(cfg.node, test=test), cloud=cfg.node, state_file=STATE_FILE,
                broadcasts=("status",), keep_models=rt.keep_models)
