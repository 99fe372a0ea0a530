"""Shared ``main`` for the three agent programs: parse flags, load config, set up logs, run the loop."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from mqttfl.runtime.config import AgentConfig, ConfigError, load_config
from mqttfl.runtime.log import setup_logging
from mqttfl.runtime.transport import TransportError


def agent_main(role: str, factory: Callable[[AgentConfig], Any], argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"mqttfl-{role}", description=f"mqttfl {role} agent")
    p.add_argument("--config", "-c", default=os.environ.get("MQTTFL_CONFIG"), help="TOML config file")
    p.add_argument("--node", help="node id (overrides the config)")
    p.add_argument("--fleet", help="fleet id (overrides the config)")
    p.add_argument("--state-dir", help="state directory (overrides the config)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default 1: agents share small boards with other work)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, role, node=a.node, fleet=a.fleet, state_dir=a.state_dir)
    except ConfigError as e:
        print(f"mqttfl-{role}: config error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        agent = factory(cfg)  # checks the role's section before torch is imported: a bad config fails fast
    except ConfigError as e:
        print(f"mqttfl-{role}: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError) as e:
        print(f"mqttfl-{role}: cannot start: {e}", file=sys.stderr)
        return 2
    threads = a.threads or int(cfg.section.get("threads", 1))  # checked by the section's schema in factory()
    preload = getattr(agent, "preload", None)
    if preload is not None:
        preload.threads = threads  # torch loads once the agent is online (a device)
    else:
        import torch

        torch.set_num_threads(threads)
    try:
        rc = int(agent.run())
    except TransportError as e:
        print(f"mqttfl-{role}: {e}", file=sys.stderr)
        return 3
    # The agent has published offline and disconnected; state is on disk. Interpreter teardown with torch
    # loaded takes seconds on a small board (measured 1.8 s here, more under load), which systemd and
    # supervisors would count against the stop timeout, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
