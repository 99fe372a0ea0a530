"""Edge agent: the edge's protocol machine and its per-device last stages, on the runtime loop.

Everything the edge decides is in :mod:`mqttfl.protocol.edge`; this shell reads ``[edge]`` and wires
machine, torch backend and transport together.
"""

from __future__ import annotations

import os

from mqttfl.ml.backend import TorchBackend
from mqttfl.ml.models import schema_of
from mqttfl.protocol.edge import EdgeMachine
from mqttfl.runtime.config import AgentConfig, EdgeSection, parse_section
from mqttfl.runtime.node import Node, load_keyed_states


def build(cfg: AgentConfig) -> Node:
    sec: EdgeSection = parse_section(EdgeSection, cfg.section, "edge")
    # The sessions a killed edge left in its state directory: the rounds in progress resume (edge resume).
    machine = EdgeMachine(cfg.node, schemas=schema_of, cloud=sec.cloud, deadline_fraction=sec.deadline_fraction,
                          id_prefix=os.urandom(4).hex(), restored=load_keyed_states(cfg.state_dir),
                          delta_encoding=sec.delta_encoding, group_downloads=sec.group_downloads)
    return Node(cfg, machine, TorchBackend(cfg.node, slowdown=sec.slowdown, block_ms=sec.block_ms), cloud=sec.cloud)
