"""A tiny real TCP forwarder between one agent and the broker, which a test can sever and restore.

Severing closes every forwarded connection at once (both sockets shut down, as when a Wi-Fi link dies
mid-transfer) and, until :meth:`TcpProxy.restore`, accepts new connections only to close them at once,
so the client's reconnect attempts fail the way they do against an unreachable broker.
:meth:`TcpProxy.sever_after` arms a cut that fires inside the client-to-broker byte stream, so a test
can cut a link while a message is half sent without guessing at timing. :meth:`TcpProxy.throttle` paces the
bytes it forwards, each way, to a given rate: a link that turns slow.
"""

from __future__ import annotations

import socket
import threading
import time


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, 0))
        self._listener.listen(16)
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._severed = False
        self._closed = False
        self._arm_at: int | None = None
        self.bytes_up = 0  # client -> broker, all connections
        self.bytes_down = 0
        self.accepted = 0
        self.refused = 0
        self.severs = 0
        self.rate: float | None = None  # bytes per second each way; None: as fast as it goes
        self.severed_event = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    # ------------------------------------------------------------------ control
    def sever(self) -> None:
        """Cut every live connection and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._severed = True
            self._arm_at = None
            pairs, self._pairs = self._pairs, []
            self.severs += 1
        for a, b in pairs:
            _kill(a)
            _kill(b)
        self.severed_event.set()

    def sever_after(self, n_bytes: int) -> None:
        """Sever once ``n_bytes`` more have gone from the client to the broker."""
        with self._lock:
            self._arm_at = self.bytes_up + n_bytes

    def restore(self) -> None:
        with self._lock:
            self._severed = False
        self.severed_event.clear()

    def throttle(self, bytes_per_s: float | None) -> None:
        """Forward at most this many bytes per second in each direction (None: no limit)."""
        self.rate = bytes_per_s

    @property
    def severed(self) -> bool:
        return self._severed

    def stop(self) -> None:
        self._closed = True
        self.sever()
        _kill(self._listener)
        self._thread.join(2.0)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ forwarding
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._severed or self._closed:
                self.refused += 1
                _kill(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
                upstream.settimeout(None)
            except OSError:
                _kill(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        while True:
            rate = self.rate
            try:
                data = src.recv(4096 if rate else 65536)
            except OSError:
                data = b""
            if rate and data:
                time.sleep(len(data) / rate)
            if not data:
                break
            fire = False
            if up:
                with self._lock:
                    if self._arm_at is not None and self.bytes_up + len(data) >= self._arm_at:
                        # Forward only part of this read so the cut lands inside a message.
                        data = data[: max(0, self._arm_at - self.bytes_up)]
                        fire = True
                    self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
            try:
                if data:
                    dst.sendall(data)
            except OSError:
                break
            if fire:
                self.sever()
                return
        _kill(src)
        _kill(dst)


def _kill(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
