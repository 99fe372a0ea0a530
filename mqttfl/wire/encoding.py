"""Tensor encodings: how a message's tensors look on the wire (docs/design.md, "Wire format").

A sender may encode the float32 tensors of a message (fewer bytes on a device's link) and names the encoding in
the message body (``enc``); the receiver decodes before the message is parsed and validated, so machines only
ever see float32 tensors. The encoding is chosen per message by whoever builds it (a ``Send`` effect names it),
so it can differ per kind and per device. Today's only encoding is the identity; compressed encodings
(reduced precision, quantisation, sparsification) register in :data:`ENCODINGS` with the same interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from mqttfl.wire.codec import CodecError

IDENTITY = "none"


class Encoding(Protocol):
    name: str

    def encode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def decode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Identity:
    name = IDENTITY

    def encode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(tensors)

    def decode(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(tensors)


ENCODINGS: dict[str, Encoding] = {IDENTITY: Identity()}


def encode_tensors(name: str, body: dict[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encode ``tensors`` with the encoding ``name``, recording it in ``body`` (nothing for the identity)."""
    enc = ENCODINGS.get(name)
    if enc is None:
        raise ValueError(f"unknown tensor encoding {name!r}; known: {sorted(ENCODINGS)}")
    if name != IDENTITY:
        body["enc"] = name
    return enc.encode(tensors)


def decode_tensors(body: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a received message as the sender had them before encoding; CodecError when the message
    names an encoding this node does not know or its tensors do not decode under it."""
    name = body.get("enc", IDENTITY)
    enc = ENCODINGS.get(name) if isinstance(name, str) else None
    if enc is None:
        raise CodecError("bad_encoding", f"unknown tensor encoding {name!r}")
    try:
        return enc.decode(tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise CodecError("bad_encoding", f"tensors do not decode as {name!r}: {e}") from None
