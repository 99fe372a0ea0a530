"""``mqttfl ctl NODE CMD [key=value ...]``: send one control command and print the node's reply.

The command goes out as JSON ``{"id", "cmd", "args"}`` on ``mqttfl/v1/{fleet}/ctl/{as}/{NODE}``; the node
answers on ``mqttfl/v1/{fleet}/reply/{NODE}/{as}`` with the same ``id`` (``MachineRunner.on_ctl`` in
mqttfl/runtime/loop.py). With the production ACL the broker only lets a client publish with its own
username as the sender level, so ``--as`` defaults to the MQTT username when one is given.

Exit status: 0 the node replied ok, 1 it replied with an error, 2 usage or configuration error, 3 no
connection or no reply within ``--timeout``.

Console connections (:class:`ToolTransport`, also used by ``mqttfl monitor``) differ from an agent's: a
client id unique to the process, so an operator's ``ctl`` never takes over the session of a ``monitor``
running under the same node id; no persistent session, so nothing queues on the broker after the tool exits;
and no retained presence or last will, so tools never show up as fleet members. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from mqttfl.runtime.config import AgentConfig, ConfigError, apply_env, load_config, read_toml
from mqttfl.runtime.transport import Transport, TransportError
from mqttfl.wire.topics import TopicError, filter_for, validate_id

EXIT_OK, EXIT_ERROR_REPLY, EXIT_USAGE, EXIT_NO_REPLY = 0, 1, 2, 3


class UsageError(ValueError):
    """Bad command-line input (exit status 2)."""


class ToolTransport(Transport):
    """A short-lived console connection: unique client id, no persistent session, no presence."""

    def __init__(self, cfg: AgentConfig, *, filters: Iterable[str] | None = None, **kwargs: Any) -> None:
        # Session expiry 0: the broker drops the session (and stops queueing for it) when the tool exits.
        super().__init__(replace(cfg, mqtt=replace(cfg.mqtt, session_expiry=0)), boot=1, presence=False,
                         client_suffix=f"{os.getpid()}-{uuid.uuid4().hex[:8]}",
                         inbox=filters is None, subscriptions=list(filters or ()), **kwargs)

    def close(self) -> None:
        self.stop(publish_offline=False, timeout=1.0)


# ---------------------------------------------------------------------- connection flags (ctl and monitor)
def add_connection_arguments(p: argparse.ArgumentParser, *, default_as: str) -> None:
    g = p.add_argument_group("connection (flags override --config, which overrides MQTTFL_* variables)")
    g.add_argument("--config", metavar="TOML", help="a TOML file with fleet and [mqtt] settings, e.g. "
                   "an agent's config or an operator's own")
    g.add_argument("--fleet", help="fleet id (default: from --config, else 'default')")
    g.add_argument("--host", help="broker host (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="broker port (default 1883)")
    g.add_argument("--tls", action="store_true", default=None, help="connect with TLS")
    g.add_argument("--ca-file", help="CA certificate that signed the broker's certificate")
    g.add_argument("--cert-file", help="client certificate (mutual TLS)")
    g.add_argument("--key-file", help="client key (mutual TLS)")
    g.add_argument("--username", help="MQTT username (with the mqttfl ACL: the node id you act as)")
    g.add_argument("--password-file", help="file holding the MQTT password")
    g.add_argument("--as", dest="as_node", metavar="NODE_ID",
                   help=f"node id to act as (default: the MQTT username, else '{default_as}')")


_FLAG_KEYS = {"host": "host", "port": "port", "tls": "tls", "ca_file": "ca_file", "cert_file": "cert_file",
              "key_file": "key_file", "username": "username", "password_file": "password_file"}


def tool_config(args: argparse.Namespace, role: str, default_as: str,
                environ: dict[str, str] | None = None) -> AgentConfig:
    """The tool's AgentConfig from --config, MQTTFL_* variables and flags (raises ConfigError/TopicError)."""
    environ = dict(os.environ) if environ is None else environ
    data = apply_env(read_toml(args.config) if getattr(args, "config", None) else {}, environ)
    mqtt = dict(data.get("mqtt", {}))
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            mqtt[key] = value
    username = str(mqtt.get("username") or "")
    node = args.as_node or username or str(data.get("node") or "") or default_as
    validate_id(node)
    if username and node != username:
        print(f"warning: acting as {node!r} with MQTT username {username!r}: an mqttfl ACL drops such "
              "messages silently", file=sys.stderr)
    fleet = args.fleet or str(data.get("fleet") or "default")
    return load_config(None, role, environ=environ, node=node, fleet=fleet, mqtt=mqtt)


# ---------------------------------------------------------------------- ctl
def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value is JSON when it parses as JSON (5, 0.05, true, "x", [1,2]), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"argument {item!r} is not key=value")
        if key in out:
            raise UsageError(f"argument {key!r} given twice")
        out[key] = parse_value(raw)
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(name)


def parse_value(raw: str) -> Any:
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except ValueError:
        return raw
    if isinstance(value, float) and not math.isfinite(value):  # 1e999
        return raw
    return value


def command(transport: Transport, node: str, cmd: str, args: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Send one command and wait for the reply that echoes its id; None when none came within the timeout."""
    cmd_id = uuid.uuid4().hex
    transport.send_json("ctl", node, {"id": cmd_id, "cmd": cmd, "args": args})
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        msg = transport.get(timeout=remaining)
        if (msg is not None and msg.kind == "reply" and msg.src == node and msg.data is not None
                and str(msg.data.get("id")) == cmd_id):
            return msg.data
    return None


def format_reply(reply: dict[str, Any]) -> str:
    node, cmd = reply.get("node", "?"), reply.get("cmd", "?")
    if not reply.get("ok"):
        return f"{node} {cmd}: error [{reply.get('code', '?')}] {reply.get('error', '')}"
    result = reply.get("result")
    lines = [f"{node} {cmd}: ok"]
    if isinstance(result, dict):
        width = max((len(str(k)) for k in result), default=0)
        for k, v in result.items():
            shown = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            lines.append(f"  {str(k).ljust(width)}  {shown}")
    elif isinstance(result, list):
        lines += [f"  {json.dumps(v, sort_keys=True, default=str)}" for v in result]
    elif result is not None:
        lines.append(f"  {json.dumps(result, default=str)}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Send a control command to a node and print its reply. Exit status: 0 ok, 1 error reply, "
                     "2 usage error, 3 no connection or no reply.")
    p.add_argument("node", help="the node to command (cloud, edge1, dev1, ...)")
    p.add_argument("cmd", help="command: ping, status, shutdown; cloud: start, stop, pause, resume, set, new-run, "
                   "fleet, history, move; device: move, train_stats, set_edge")
    p.add_argument("params", nargs="*", metavar="key=value",
                   help="command arguments; values are JSON when they parse (rounds=5 lr=0.05), else strings")
    add_connection_arguments(p, default_as="operator")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to connect and to wait for the reply")
    p.add_argument("--json", action="store_true", help="print the reply as one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        params = parse_params(args.params)
        validate_id(args.node)
        if args.timeout <= 0:
            raise UsageError("--timeout must be > 0")
        cfg = tool_config(args, "operator", "operator")
    except (UsageError, ConfigError, TopicError) as e:
        print(f"mqttfl ctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    deadline = time.monotonic() + args.timeout
    transport = ToolTransport(cfg, filters=[filter_for(cfg.fleet, "reply", src=args.node, dst=cfg.node)])
    try:
        transport.start(timeout=args.timeout)
    except TransportError as e:
        print(f"mqttfl ctl: {e}", file=sys.stderr)
        return EXIT_NO_REPLY
    try:
        reply = command(transport, args.node, args.cmd, params, max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        return 130
    finally:
        transport.close()
    if reply is None:
        print(f"mqttfl ctl: no reply from {args.node} in fleet {cfg.fleet} within {args.timeout:g}s "
              f"(is it running and connected to {cfg.mqtt.host}:{cfg.mqtt.port}?)", file=sys.stderr)
        return EXIT_NO_REPLY
    ok = bool(reply.get("ok"))
    if args.json:
        print(json.dumps(reply, sort_keys=True, default=str))
    else:
        print(format_reply(reply), file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_ERROR_REPLY
