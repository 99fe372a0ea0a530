"""`mqttfl-device` / `python -m device_agent`."""

from __future__ import annotations

import sys

from mqttfl.runtime.runner import agent_main


def main(argv: list[str] | None = None) -> int:
    from device_agent.agent import build

    return agent_main("device", build, argv)


if __name__ == "__main__":
    sys.exit(main())
