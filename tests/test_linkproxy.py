"""The emulated link (mqttfl/tools/linkproxy.py) against a plain TCP echo server: bytes arrive whole and in
order, no earlier than its delay and bandwidth allow, and a cut armed mid-stream lands there."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mqttfl.tools.linkproxy import LinkProxy


class Echo:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.received: list[bytes] = []  # what each connection brought, once it closed


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    out = Echo(server.getsockname()[:2])

    def serve(conn: socket.socket) -> None:
        seen = b""
        with conn:
            try:
                while data := conn.recv(65536):
                    seen += data
                    conn.sendall(data)
            except OSError:
                pass
        out.received.append(seen)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield out
    stop.set()
    server.close()


def _roundtrip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            assert chunk, "the proxy closed the connection"
            got += chunk
        return got, time.monotonic() - t0


def test_shaped_bytes_arrive_whole_in_order_and_no_sooner_than_the_link_allows(echo: Echo) -> None:
    payload = bytes(range(256)) * 1024  # 256 KB
    with LinkProxy(*echo.address) as proxy:
        got, plain = _roundtrip(proxy.port, payload)
        assert got == payload
        proxy.shape(2_000_000, delay_s=0.05)
        got, shaped = _roundtrip(proxy.port, payload)
        assert got == payload
        # 0.05 s of delay each way, and 256 KB at 2 MB/s (0.13 s) once: the echo answers each chunk as it comes,
        # so the way back serialises while the way out still does.
        assert shaped >= 2 * 0.05 + len(payload) / 2_000_000, (plain, shaped)
        proxy.shape(None)
        small, t = _roundtrip(proxy.port, b"x")
        assert small == b"x"
    assert proxy.bytes_up == proxy.bytes_down == 2 * len(payload) + 1


def test_a_cut_armed_mid_stream_delivers_what_came_before_it_and_refuses_until_restored(
        echo: Echo) -> None:
    with LinkProxy(*echo.address) as proxy:
        proxy.shape(None, delay_s=0.02)
        s = socket.create_connection(("127.0.0.1", proxy.port))
        proxy.sever_after(1000)
        s.sendall(b"a" * 600)
        s.sendall(b"b" * 600)
        assert proxy.severed_event.wait(5)
        deadline = time.monotonic() + 5
        while not echo.received and time.monotonic() < deadline:
            time.sleep(0.01)
        s.close()
        assert echo.received == [b"a" * 600 + b"b" * 400]  # the first 1000 bytes, in order, then the cut
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", proxy.port)) as refused:
            refused.settimeout(5)
            if not refused.recv(1):
                raise ConnectionResetError("closed at once")
        proxy.restore()
        assert _roundtrip(proxy.port, b"back")[0] == b"back"
    with pytest.raises(ValueError):
        LinkProxy(*echo.address).shape(0)
