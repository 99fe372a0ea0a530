"""The tensor-encoding seam: senders name an encoding, receivers decode before parsing or refuse."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mqttfl.protocol.events import Received
from mqttfl.protocol.messages import Gradients
from mqttfl.runtime.config import load_config
from mqttfl.runtime.node import Node
from mqttfl.runtime.transport import Inbound
from mqttfl.wire import encoding
from mqttfl.wire.codec import CodecError, Envelope
from mqttfl.wire.topics import Topic


class Halves:
    """A test encoding: float16 on the wire."""

    name = "halves"

    def encode(self, tensors):
        return {k: np.asarray(v, np.float16) for k, v in tensors.items()}

    def decode(self, tensors):
        return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


@pytest.fixture
def halves():
    encoding.ENCODINGS["halves"] = Halves()
    yield
    del encoding.ENCODINGS["halves"]


def test_identity_sends_the_tensors_unchanged_and_marks_nothing() -> None:
    body: dict = {}
    t = {"g": np.ones(3, np.float32)}
    assert encoding.encode_tensors("none", body, t) == t and body == {}
    assert encoding.decode_tensors(body, t) == t


def test_a_named_encoding_travels_in_the_body_and_is_undone_on_receipt(halves) -> None:
    body: dict = {}
    wire = encoding.encode_tensors("halves", body, {"g": np.full(3, 0.5, np.float32)})
    assert body == {"enc": "halves"} and wire["g"].dtype == np.float16
    assert encoding.decode_tensors(body, wire)["g"].dtype == np.float32
    with pytest.raises(ValueError, match="unknown tensor encoding"):
        encoding.encode_tensors("zip9", {}, wire)
    with pytest.raises(CodecError) as e:
        encoding.decode_tensors({"enc": "zip9"}, wire)
    assert e.value.code == "bad_encoding"


class Recorder:
    commands = ()

    def __init__(self) -> None:
        self.events: list = []

    def handle(self, ev, now):
        self.events.append(ev)
        return []

    def presence(self):
        return {}

    def metrics(self):
        return {}


def _grad_inbound(body: dict, g: np.ndarray) -> Inbound:
    env = Envelope(kind="grad", src="edge1", dst="dev1", body={"op": "micro", "step": 0, "micro": 0, "loss_sum": 1.0,
                                                               "correct": 1, **body}, tensors={"g": g}, ts=time.time())
    return Inbound(Topic("f", "grad", "edge1", "dev1"), env, None, False, time.monotonic())


def test_the_node_decodes_before_parsing_and_drops_an_unknown_encoding(halves) -> None:
    machine = Recorder()
    node = Node(load_config(None, "device", environ={}, node="dev1", fleet="f"), machine)
    node.dispatch(_grad_inbound({"enc": "halves"}, np.full(4, 0.25, np.float16)))
    [ev] = machine.events
    assert isinstance(ev, Received) and isinstance(ev.msg, Gradients) and ev.msg.g.dtype == np.float32
    node.dispatch(_grad_inbound({"enc": "zip9"}, np.ones(4, np.float32)))
    assert len(machine.events) == 1
    assert node.transport.stats_snapshot()["drop_bad_encoding"] == 1
