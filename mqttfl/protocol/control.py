"""Control commands: argument checks shared by the machines, and who may command whom.

A command is ``{"id", "cmd", "args"}`` on ``ctl`` (JSON); the answer goes back on ``reply`` with the same
``id``. The runtime refuses a sender that may not command the node before any machine sees the command;
machines check arguments with :func:`arg`, whose errors name the argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from mqttfl.protocol.events import CommandError
from mqttfl.wire.topics import TopicError, validate_id


def may_command(src: str, node: str, commanders: Iterable[str]) -> bool:
    """Operators and the cloud may command a node; a node may command itself."""
    return src == node or src in set(commanders)


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], *, default: Any = ...,
        check: Callable[[Any], bool] | None = None, why: str = "") -> Any:
    """Fetch and check one command argument, raising a CommandError that names it."""
    if name not in args:
        if default is ...:
            raise CommandError(f"missing argument '{name}'")
        return default
    value = args[name]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise CommandError(f"argument '{name}' must be a number")
    if not isinstance(value, kind):
        raise CommandError(f"argument '{name}' has the wrong type ({type(value).__name__})")
    if check is not None and not check(value):
        raise CommandError(f"argument '{name}' is out of range{': ' + why if why else ''}")
    return value


def check_id(value: str, what: str) -> str:
    try:
        return validate_id(value)
    except TopicError as e:
        raise CommandError(f"{what}: {e}") from None
