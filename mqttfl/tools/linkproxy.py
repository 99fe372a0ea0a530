"""An emulated link between one agent and its broker: a real TCP forwarder that can be cut, slowed and delayed.

Tests and benchmarks point a device's ``[mqtt] port`` at a :class:`LinkProxy` instead of the broker:

- :meth:`LinkProxy.sever` closes every forwarded connection at once (both sockets shut down, as when a Wi-Fi
  link dies mid-transfer) and, until :meth:`LinkProxy.restore`, accepts new connections only to close them, so
  the client's reconnect attempts fail the way they do against an unreachable broker;
  :meth:`LinkProxy.sever_after` arms a cut that fires inside the client-to-broker byte stream, so a cut lands
  while a message is half sent without guessing at timing;
- :meth:`LinkProxy.shape` gives each direction of each connection a bandwidth and a one-way delay: a chunk
  is serialised at the rate behind the chunks before it, then arrives ``delay_s`` later (a cellular or
  long-range link; the planner's ``2 (lat + a / B)`` per mini-batch, docs/algorithms.md, "Split-point
  planning"). TCP's own flow control still holds: at most ``MAX_IN_FLIGHT`` bytes wait inside the proxy per
  direction, beyond that the proxy stops reading.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

CHUNK = 65536
SHAPED_CHUNK = 4096  # finer pacing when a rate is set
MAX_IN_FLIGHT = 8 * 2**20  # bytes held per direction before the proxy stops reading (bounded)


class _Line:
    """One direction of one connection: chunks with the time they may be delivered, bounded by bytes."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self.held = 0
        self.closed = False
        self.busy_until = 0.0  # when the link finishes serialising what it holds
        self.sever_when_drained = False

    def put(self, data: bytes, rate: float | None, delay_s: float) -> bool:
        with self.cond:
            while self.held >= MAX_IN_FLIGHT and not self.closed:
                self.cond.wait()
            if self.closed:
                return False
            now = time.monotonic()
            start = max(now, self.busy_until)
            self.busy_until = start + (len(data) / rate if rate else 0.0)
            self.chunks.append((self.busy_until + delay_s, data))
            self.held += len(data)
            self.cond.notify_all()
            return True

    def get(self) -> bytes | None:
        """The next chunk once it is due; None when the line is closed and drained."""
        with self.cond:
            while not self.chunks:
                if self.closed:
                    return None
                self.cond.wait()
            due, data = self.chunks[0]
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with self.cond:
            self.chunks.popleft()
            self.held -= len(data)
            self.cond.notify_all()
        return data

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class LinkProxy:
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
        self.delay_s = 0.0  # one-way delay each way
        self.severed_event = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="link-proxy", daemon=True)

    def start(self) -> LinkProxy:
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

    def shape(self, bytes_per_s: float | None = None, delay_s: float = 0.0) -> None:
        """Each direction of every connection: at most ``bytes_per_s`` (None: no limit), and ``delay_s`` one
        way. Applies to the bytes read from now on."""
        if bytes_per_s is not None and not bytes_per_s > 0:
            raise ValueError("bytes_per_s must be > 0 or None")
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self.rate, self.delay_s = bytes_per_s, delay_s

    def throttle(self, bytes_per_s: float | None) -> None:
        """Forward at most this many bytes per second in each direction (None: no limit); the delay stays."""
        self.shape(bytes_per_s, self.delay_s)

    @property
    def severed(self) -> bool:
        return self._severed

    def stop(self) -> None:
        self._closed = True
        self.sever()
        _kill(self._listener)
        self._thread.join(2.0)

    def __enter__(self) -> LinkProxy:
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
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                line = _Line()
                threading.Thread(target=self._read, args=(src, dst, line, up), daemon=True).start()
                threading.Thread(target=self._write, args=(src, dst, line), daemon=True).start()

    def _read(self, src: socket.socket, dst: socket.socket, line: _Line, up: bool) -> None:
        """Read from ``src`` into the line (the cut of :meth:`sever_after` lands here, mid-stream)."""
        while True:
            try:
                data = src.recv(SHAPED_CHUNK if self.rate else CHUNK)
            except OSError:
                data = b""
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
            if not line.put(data, self.rate, self.delay_s) or fire:
                # A cut: the writer delivers what came before it, then severs every connection.
                line.sever_when_drained = fire
                break
        line.close()

    def _write(self, src: socket.socket, dst: socket.socket, line: _Line) -> None:
        """Deliver the line's chunks to ``dst`` when due; close both ends when the line ends or ``dst`` fails."""
        while (data := line.get()) is not None:
            try:
                dst.sendall(data)
            except OSError:
                break
        line.close()
        if line.sever_when_drained:
            self.sever()
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
