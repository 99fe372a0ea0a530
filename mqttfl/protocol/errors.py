"""The protocol's one error type: a message that is well-formed on the wire but wrong for the protocol."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A peer's message that must not be used (wrong round, shape, sender, field); ``code`` names the reason
    for counters and ``dropped`` events. A remote error: the receiver's state is unchanged."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
