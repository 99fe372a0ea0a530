"""MQTT transport over paho-mqtt 2.x: with mqttfl/runtime/netloop.py, the only module that touches sockets.

Theory of operation
-------------------
paho runs its own network thread, or, with ``driver=SocketLoop()`` (mqttfl/runtime/netloop.py), none: the
loop's owner serves the socket from its own thread, with many transports in one selector (``mqttfl virtual``);
reconnects with backoff, keepalive, the will, sessions and TLS work the same in both. Its callbacks only
enqueue (raw topic + payload, or a link change) on a bounded queue; blocking there would starve keepalive
(docs/design.md, "Transport"). The agent's single thread calls :meth:`Transport.get`, which parses the topic,
reassembles chunks, decodes and validates the envelope, drops duplicates and spoofed senders, and returns one
:class:`Inbound`. Everything that can be wrong with a
message becomes a counted drop reported on the ``event`` topic — never an exception in the agent loop.

Session rules measured with Mosquitto 2.0.11 / paho 2.2.0: MQTT v5, stable client id, never ``clean_start``
(so queued QoS 1 messages survive a restart and a broker restart), session expiry > 0, QoS 1,
``TCP_NODELAY`` on the client socket (paho leaves Nagle on: 44 ms vs 0.84 ms per small round trip),
retained status with a last will carrying the boot number, and jittered exponential reconnect backoff.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import itertools
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqttfl.runtime.config import AgentConfig
from mqttfl.runtime.inbox import FairInbox
from mqttfl.runtime.outbox import Outbox
from mqttfl.runtime.persist import atomic_write
from mqttfl.wire.chunking import ChunkError, Reassembler, is_chunk_frame, make_chunks
from mqttfl.wire.codec import CodecError, Envelope, Limits, decode, decode_json, encode, encode_json
from mqttfl.wire.dedupe import RecentIds
from mqttfl.wire.topics import BROADCAST, JSON_KINDS, Topic, TopicError, inbox_filters, parse, topic

if TYPE_CHECKING:
    from mqttfl.runtime.netloop import SocketLoop


MAX_DEFERRED = 256  # publishes a group commit holds at most before it syncs and sends them anyway


class TransportError(RuntimeError):
    """The link could not be established (bad credentials, refused, timeout)."""


@dataclass(frozen=True)
class Inbound:
    topic: Topic
    env: Envelope | None  # binary kinds
    data: dict[str, Any] | None  # JSON kinds
    retained: bool
    received: float  # time.monotonic() at arrival

    @property
    def src(self) -> str:
        return self.topic.src

    @property
    def kind(self) -> str:
        return self.topic.kind


@dataclass(frozen=True)
class LinkChange:
    up: bool
    session_present: bool = False
    reason: str = ""


_CONNACK_HINTS = {
    134: "bad user name or password",
    135: "not authorized",
    133: "client identifier not valid",
}


def next_boot(state_dir: str | Path | None) -> int:
    """Boot counter persisted in the state dir: pairs a retained status with the will of the same session
    (Sparkplug's bdSeq idea), and tells a first-ever boot (clean session) from a restart."""
    if not state_dir:
        return int(time.time() * 1000)  # no state dir: monotone enough across restarts of one host
    path = Path(state_dir) / "boot"
    try:
        n = int(path.read_text().strip()) + 1
    except (OSError, ValueError):
        n = 1
    atomic_write(path, str(n).encode())
    return n


def _read_lines(path: Path | None) -> list[str]:
    try:
        return path.read_text().split() if path is not None else []
    except (OSError, UnicodeDecodeError):
        return []


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()


def release_memory() -> bool:
    """Hand freed heap memory back to the system (glibc's malloc_trim; False where there is none).

    Chunks are ~1 MiB buffers; once glibc has freed one mmapped buffer it serves later ones from its heap, where
    a freed buffer stays part of the process. Measured: three never-completed transfers left 40-60 MB of RSS
    behind after they expired, until a trim (docs/operations.md, "Budgets")."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def sender_of(raw_topic: str) -> str:
    """The sender level of a raw topic without validating it (the network thread's cheap look)."""
    levels = raw_topic.split("/")
    return levels[4] if len(levels) == 6 else "?"


def _covers(general: str, specific: str) -> bool:
    g, s = general.split("/"), specific.split("/")
    for i, level in enumerate(g):
        if level == "#":
            return True
        if i >= len(s) or (level != "+" and level != s[i]) or (s[i] == "#"):
            return False
    return len(g) == len(s)


def minimal_filters(filters: Iterable[str]) -> list[str]:
    """Drop filters covered by another one: Mosquitto delivers one copy per matching subscription, so
    overlapping filters would hand every message over twice."""
    unique = list(dict.fromkeys(filters))
    return [f for f in unique if not any(g != f and _covers(g, f) for g in unique)]


class Transport:
    """One MQTT connection for one node. Thread-safe publishing; :meth:`get` belongs to one thread."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        limits: Limits | None = None,
        log: Any = None,
        subscriptions: Iterable[str] = (),
        outbox: Outbox | None = None,
        boot: int | None = None,
        status_fields: Mapping[str, Any] | None = None,
        presence: bool = True,
        inbox: bool = True,
        client_suffix: str = "",
        tcp_nodelay: bool = True,
        driver: SocketLoop | None = None,
        group_commit: bool = False,
    ) -> None:
        """``presence=False``/``client_suffix`` are for console tools (ctl, monitor): no retained status or
        will, and a client id of their own so they never take over a running agent's session.
        ``inbox=False`` subscribes to ``subscriptions`` only. ``tcp_nodelay=False`` exists to measure
        what Nagle costs (bench). ``driver``: no network thread; the loop's owner drives this client (its
        :meth:`SocketLoop.poll` reads, writes, pings and reconnects), and waits here drive that loop.
        ``group_commit``: a publish that follows an unsynced journal write waits, with every publish after it, for
        :meth:`flush` (one sync for a burst of messages' writes; the node's loop flushes when its inbox is drained)."""
        self.cfg = cfg
        self.node, self.fleet, self.role = cfg.node, cfg.fleet, cfg.role
        self.limits = limits or cfg.limits
        self.log = log
        self.outbox = outbox
        self.boot = boot if boot is not None else next_boot(cfg.state_dir or None)
        self.first_boot = self.boot == 1
        self.stats: collections.Counter[str] = collections.Counter()
        self._stats_lock = threading.Lock()
        b = cfg.budget
        # Fair across senders, bounded per sender (docs/design.md, "Trust"): one node flooding this one
        # fills and loses only its own queue.
        self._raw = FairInbox(max_messages=cfg.mqtt.inbox_size, max_bytes=b.memory_bytes,
                              sender_messages=b.sender_queue, sender_bytes=b.sender_bytes, sender_rate=b.sender_rate)
        self._refused: collections.Counter[tuple[str, str]] = collections.Counter()  # (src, reason), network thread
        self._links: collections.deque[LinkChange] = collections.deque(maxlen=64)
        # A transfer may not hold more than one whole message may be (the codec's cap applies after it).
        self._reassembler = Reassembler(
            timeout_s=b.transfer_idle_s, max_bytes=min(b.memory_bytes, self.limits.max_message_bytes),
            sender_bytes=min(b.sender_bytes, self.limits.max_message_bytes), sender_transfers=b.sender_transfers)
        self.reconnect_cap: float | None = None  # set while the node takes part in a round (set_reconnect_cap)
        self._recent = RecentIds(20_000)
        self._acked = RecentIds(20_000)
        self._seq = itertools.count(1)
        self.presence = presence
        self._client_suffix = client_suffix
        self._tcp_nodelay = tcp_nodelay
        self._subs = minimal_filters([*(inbox_filters(cfg.fleet, cfg.node) if inbox else []), *subscriptions])
        self._base_subs = list(self._subs)
        self._following: list[str] = []  # filters that change with the node's edge (follow)
        # What the last life followed: its persistent session still holds those filters, so the ones this life
        # does not follow are unsubscribed at the next connection (as are those dropped while offline).
        self._follow_file = Path(cfg.state_dir) / "following" if cfg.state_dir else None
        self._followed = _read_lines(self._follow_file)
        self._unfollow: set[str] = set(self._followed) - set(self._subs)
        self._subs_lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending_sub_mid: int | None = None
        self._attempt = 0
        self._last_error = ""
        self._closing = False
        self._status: dict[str, Any] = {"state": "starting", **(status_fields or {})}
        self._event_times: collections.deque[float] = collections.deque(maxlen=50)
        self.driver = driver
        self.group_commit = group_commit and driver is None and outbox is not None
        self._deferred: list[tuple[str, str, bytes, int, bool]] = []  # publishes waiting for the next sync
        self.deferred_since = 0.0
        if driver is not None and outbox is not None:
            driver.add_barrier(outbox.journal)  # the loop syncs before it writes any socket: see publish()
        self._started = False
        self._reconnect_at: float | None = None  # driven: when to try again (paho's loop_forever does it otherwise)
        self._misc_at = 0.0
        self.client = self._make_client()

    # ------------------------------------------------------------------ setup
    @property
    def client_id(self) -> str:
        base = f"mqttfl-{self.fleet}-{self.node}"
        return f"{base}-{self._client_suffix}" if self._client_suffix else base

    def topic(self, kind: str, dst: str) -> str:
        return topic(self.fleet, kind, self.node, dst)

    def _status_payload(self, state: str | None = None) -> bytes:
        body = dict(self._status)
        if state is not None:
            body["state"] = state
        body.update(node=self.node, role=self.role, boot=self.boot, ts=time.time())
        return encode_json(body)

    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
        )
        if m.tls:
            c.tls_set(
                ca_certs=m.ca_file or None,
                certfile=m.cert_file or None,
                keyfile=m.key_file or None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if m.username:
            c.username_pw_set(m.username, m.password or None)
        if self.presence:
            will = Properties(PacketTypes.WILLMESSAGE)
            c.will_set(self.topic("status", BROADCAST), self._status_payload("offline"), qos=1, retain=True,
                       properties=will)
        c.max_inflight_messages_set(64)
        # paho annotates these as int but uses them as seconds in float arithmetic; jitter needs fractions.
        c.reconnect_delay_set(m.reconnect_min_s, m.reconnect_max_s)  # type: ignore[arg-type]
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._on_socket_open
        if self.driver is not None:
            c.on_socket_close = self._on_socket_close
            c.on_socket_register_write = self._on_register_write
            c.on_socket_unregister_write = self._on_unregister_write
        return c

    def start(self, timeout: float | None = 15.0) -> Transport:
        """Connect in the background; with a timeout, wait until connected and subscribed. Started already: only
        the wait (a process of virtual devices connects them all first, then waits for each)."""
        if not self._started:
            self._started = True
            self._connect()
        if timeout is not None and not self.wait_ready(timeout):
            m = self.cfg.mqtt
            self.stop(publish_offline=False)
            raise TransportError(
                f"{self.node}: no connection to {m.host}:{m.port} within {timeout:.0f}s"
                + (f" ({self._last_error})" if self._last_error else "")
            )
        return self

    def _connect(self) -> None:
        m = self.cfg.mqtt
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = m.session_expiry
        # Never clean_start: Mosquitto 2.0.11 persists only sessions whose current connection did not ask
        # for a clean start, so a first boot with clean_start would lose its queue over a broker restart.
        # A stale session left by an earlier install only replays messages of old runs, which the
        # protocol checks (run, round) reject.
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive, clean_start=False, properties=props)
        if self.driver is None:
            self.client.loop_start()
            return
        self.driver.add(self)
        self._attempt_connect()

    def _attempt_connect(self) -> None:
        """Driven: one connection attempt now (TCP, TLS handshake, CONNECT queued); a failure backs off."""
        self._reconnect_at = None
        try:
            self.client.reconnect()
        except (OSError, ValueError) as e:  # refused, unreachable, timed out, TLS (ssl.SSLError is an OSError)
            self._last_error = str(e) or type(e).__name__
            self._count("connect_failed")
            self._backoff()

    def _drive(self, done: Any, deadline: float) -> bool:
        """Driven: serve the loop until ``done()`` or the deadline; whether done."""
        assert self.driver is not None
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.driver.poll(min(left, 0.02))
        return True

    def move_to(self, host: str, port: int, timeout: float = 10.0) -> bool:
        """Leave this broker for another (a device that moved to another site's edge; docs/operations.md,
        "Several sites"). What was published here is delivered first (QoS 1 acknowledged by the broker), the
        departure is clean (no will: the node is not offline, it is elsewhere), and the session here stays for
        a return. The outbox re-sends what is unacknowledged, and the link change makes the machine re-send
        what it has in flight. Returns whether the new broker was reached within ``timeout``."""
        deadline = time.monotonic() + timeout
        if self.driver is not None:
            self._drive(lambda: not self.client._out_messages, deadline)
            self.client.disconnect()
            # Written before the next connection starts, or the broker would see an unclean end and fire the will.
            self._drive(lambda: self.client.socket() is None, deadline)
        while self.client._out_messages and time.monotonic() < deadline:  # paho has no public count of these
            time.sleep(0.005)
        if self.driver is None:
            self.client.disconnect()
            self.client.loop_stop()
        self._connected.clear()
        self._subscribed.clear()
        self.cfg = replace(self.cfg, mqtt=replace(self.cfg.mqtt, host=host, port=port))
        self._count("broker_moves")
        self._connect()
        return self.wait_ready(max(0.1, deadline - time.monotonic()))

    def visit(self, host: str, port: int, timeout: float = 10.0, extra: Iterable[str] = ()) -> bool:
        """Open this node's session at another broker and leave (no presence): messages sent to it there while
        it is away are kept for its arrival, instead of being discarded for want of a subscriber. ``extra``:
        filters to hold there besides this node's own."""
        cfg = replace(self.cfg, mqtt=replace(self.cfg.mqtt, host=host, port=port))
        guest = Transport(cfg, limits=self.limits, subscriptions=[*self._subs, *extra], presence=False, inbox=False,
                          boot=self.boot, driver=self.driver)
        try:
            guest.start(timeout=timeout)
        except TransportError:
            return False
        guest.stop(publish_offline=False)
        return True

    def wait_ready(self, timeout: float) -> bool:
        if self.driver is not None:
            return self._drive(lambda: self._connected.is_set() and self._subscribed.is_set(),
                               time.monotonic() + timeout)
        return self._connected.wait(timeout) and self._subscribed.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------------ driven: called by the SocketLoop
    def on_readable(self) -> None:
        self.client.loop_read()
        sock: Any = self.client.socket()
        # TLS: records already decrypted into the SSL object's buffer wake no selector.
        while isinstance(sock, ssl.SSLSocket) and sock.pending():
            self.client.loop_read()
            sock = self.client.socket()

    def on_writable(self) -> None:
        self.client.loop_write()

    def wants_write(self) -> bool:
        return self.client.want_write()

    def tend(self, now: float) -> None:
        """Keepalive once a second while connected; the next reconnect attempt once its backoff has passed."""
        if self._closing:
            return
        if self.client.socket() is None:
            if self._reconnect_at is None:
                self._backoff(again=True)
            elif now >= self._reconnect_at:
                self._attempt_connect()
        elif now >= self._misc_at:
            self._misc_at = now + 1.0
            self.client.loop_misc()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.driver is not None:
            self.driver.closed(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.driver is not None:
            self.driver.want_write(self, sock, True)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.driver is not None:
            self.driver.want_write(self, sock, False)

    # ------------------------------------------------------- paho callbacks (network thread: enqueue only)
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.driver is not None:
            self.driver.opened(self, sock)
        if not self._tcp_nodelay:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._last_error = _CONNACK_HINTS.get(rc.value, str(rc))
            self._count("connect_refused")
            return
        self._attempt = 0
        self._connected.set()
        self._subscribed.clear()
        with self._subs_lock:
            result, mid = client.subscribe([(f, SubscribeOptions(qos=1)) for f in self._subs])
            self._pending_sub_mid = mid
            if self._unfollow and client.unsubscribe(sorted(self._unfollow))[0] == mqtt.MQTT_ERR_SUCCESS:
                self._unfollow.clear()
        if self.presence:
            # online after CONNACK (docs/design.md, "Transport"); retained so late subscribers see presence.
            client.publish(self.topic("status", BROADCAST), self._status_payload(), qos=1, retain=True)
        self._links.append(LinkChange(True, bool(flags.session_present)))
        self._wake()

    def _wake(self) -> None:
        if self.driver is not None:
            self.driver.ready.add(self)

    def follow(self, filters: Iterable[str]) -> None:
        """Replace the subscriptions that follow the node's edge (a device hears its current edge's group
        announcements, no other edge's). The session is persistent, so the broker keeps the new filter's
        messages while the node is offline; a filter dropped while offline is unsubscribed on reconnecting."""
        new = list(dict.fromkeys(filters))
        with self._subs_lock:
            if new == self._following:
                return
            added = [f for f in new if f not in self._following]
            gone = [f for f in self._following if f not in new]
            self._following = new
            self._subs = minimal_filters([*self._base_subs, *new])
            self._unfollow = (self._unfollow | set(gone)) - set(new)
            if self._follow_file is not None and new != self._followed:
                atomic_write(self._follow_file, "".join(f"{f}\n" for f in new).encode())
                self._followed = new
            if not self.connected:
                return  # the next connection subscribes self._subs and drops self._unfollow
            if added:
                self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in added])
            if self._unfollow and self.client.unsubscribe(sorted(self._unfollow))[0] == mqtt.MQTT_ERR_SUCCESS:
                self._unfollow.clear()
        self._count("follow_changes")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        if mid == self._pending_sub_mid:
            if any(r.is_failure for r in rcs):
                self._last_error = "subscription refused (ACL?)"
                self._count("subscribe_refused")
            self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._connected.clear()
        self._links.append(LinkChange(False, reason=str(rc)))
        self._wake()
        self._backoff()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._backoff()

    def backoff_delay(self) -> float:
        """The next reconnect delay: exponential from reconnect_min_s up to the cap, times a jitter in [0.5, 1].
        The cap is ``reconnect_max_s``, or less while the node takes part in a round (``reconnect_cap``), so a
        device whose link comes back returns before its edge gives up on it (docs/design.md, "Transport")."""
        m = self.cfg.mqtt
        cap = m.reconnect_max_s if self.reconnect_cap is None else min(m.reconnect_max_s, self.reconnect_cap)
        delay = min(cap, m.reconnect_min_s * 2 ** min(self._attempt - 1, 16))
        return delay * random.uniform(0.5, 1.0)

    def set_reconnect_cap(self, seconds: float | None) -> None:
        self.reconnect_cap = seconds
        if not self.connected:  # already waiting: the next attempt comes no later than the new cap
            self._backoff(again=True)

    def _backoff(self, again: bool = False) -> None:
        # paho's backoff has no jitter: a fleet reconnecting after a broker restart would stampede.
        if not again:
            self._attempt += 1
        delay = self.backoff_delay()
        if self.driver is not None:
            self._reconnect_at = time.monotonic() + delay
            return
        self.client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        src = sender_of(msg.topic)
        reason = self._raw.put(src, (msg.topic, msg.payload, bool(msg.retain), time.monotonic()), len(msg.payload))
        if reason is not None:
            # Bounded by design; the protocols above recover by acknowledgement and re-send. Counted here,
            # reported from the agent's thread (report_refused).
            with self._stats_lock:
                self._refused[(src, reason)] += 1
        elif self.driver is not None:
            self.driver.ready.add(self)

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    _count = count

    # ------------------------------------------------------------------ receiving (agent thread)
    def link_changes(self) -> list[LinkChange]:
        out = []
        while self._links:
            out.append(self._links.popleft())
        return out

    def get(self, timeout: float = 0.0) -> Inbound | None:
        """Next valid message, or None when the timeout passes. Bad input is dropped and reported. Driven: the
        wait serves the loop (so one transport can be used alone, as a console tool's is)."""
        if self.driver is not None and timeout > 0:
            self._drive(lambda: len(self._raw) > 0, time.monotonic() + timeout)
            timeout = 0.0
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            raw = self._raw.get(max(0.0, deadline - time.monotonic()))
            if raw is None:
                return None
            raw_topic, payload, retained, received = raw
            item = self._process(raw_topic, payload, retained, received)
            if item is not None:
                return item

    def _process(self, raw_topic: str, payload: bytes | bytearray, retained: bool, received: float
                 ) -> Inbound | None:
        self._count("rx_bytes", len(payload))
        try:
            t = parse(raw_topic)
        except TopicError as e:
            self.drop("bad_topic", str(e), raw_topic)
            return None
        if t.src == self.node and t.dst == BROADCAST:
            return None  # our own broadcast echoed back
        if t.kind in JSON_KINDS:
            if not payload:
                return None  # a cleared retained message
            try:
                data = decode_json(payload, self.limits)
            except CodecError as e:
                self.drop(e.code, str(e), raw_topic)
                return None
            if t.kind == "ctl" and "id" in data and self._recent.seen(("ctl", t.src, str(data["id"]))):
                self._count("duplicate")
                return None
            self._count(f"rx_{t.kind}")
            return Inbound(t, None, data, retained, received)
        try:
            if is_chunk_frame(payload):
                self._expire(received)
                whole = self._reassembler.feed(t.src, payload, received)
                if whole is None:
                    return None
                payload = whole
            env = decode(payload, self.limits)
        except (CodecError, ChunkError) as e:
            self.drop(getattr(e, "code", "malformed"), str(e), raw_topic)
            return None
        if env.src != t.src or env.kind != t.kind or env.dst != t.dst:
            # The topic's src level is what the broker authenticates (ACL %u); the envelope must agree.
            self.drop("spoofed", f"envelope says {env.src}/{env.kind}/{env.dst}", raw_topic)
            return None
        if self._recent.seen(env.id):
            self._count("duplicate")
            if env.body.get("reliable") and env.id in self._acked:
                self._send_ack(env)  # our earlier ack was lost: the sender is still re-sending
            return None
        if env.kind == "ack":
            self._handle_ack(env)
            return None
        self._count(f"rx_{env.kind}")
        return Inbound(t, env, None, retained, received)

    def _handle_ack(self, env: Envelope) -> None:
        ids = env.body.get("ids", [])
        if self.outbox is None or not isinstance(ids, list):
            return
        for key in ids[:256]:
            if not isinstance(key, str):
                continue
            if self.outbox.ack(key, by=env.src):
                self._count("acked")
            elif key in self.outbox:
                # Only the node the message went to may say it applied it (docs/design.md, "Trust").
                self.drop("ack_not_from_receiver", f"{env.src} acknowledged {key} sent to "
                                                   f"{self.outbox.destination(key)}", env.src)

    def _expire(self, now: float) -> None:
        held = self._reassembler.bytes_held
        expired = self._reassembler.expire(now)
        for src, _ in expired:
            self.drop("expired", f"a partial chunked message from {src} got no new chunk for "
                                 f"{self._reassembler.timeout_s:.0f}s", src)
        if expired and held - self._reassembler.bytes_held >= 1024 * 1024 and release_memory():
            self._count("memory_released")

    def report_refused(self) -> None:
        """Count and report what the network thread refused since the last call: one event per sender and
        reason, with how many (a flood costs a few events a second, not one per message)."""
        with self._stats_lock:
            refused, self._refused = self._refused, collections.Counter()
        for (src, reason), n in sorted(refused.items()):
            self.drop(reason, f"{n} message(s) from {src}", src, n=n)

    def drop(self, reason: str, detail: str, where: str = "", n: int = 1) -> None:
        """Count a dropped message and report it on the event topic (rate-limited against floods)."""
        self._count("dropped", n)
        self._count(f"drop_{reason}", n)
        if self.log is not None:
            self.log.warning("message dropped", reason=reason, detail=detail[:300], topic=where)
        now = time.monotonic()
        if len(self._event_times) == self._event_times.maxlen and now - self._event_times[0] < 1.0:
            self._count("events_suppressed")
            return
        self._event_times.append(now)
        self.event("dropped", level="warning", reason=reason, detail=detail[:300], topic=where)

    # ------------------------------------------------------------------ sending
    def publish(self, kind: str, dst: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if self.group_commit and self.outbox is not None and (self._deferred or self.outbox.journal.dirty):
            # Group commit: this waits for the sync that makes what came before it durable, in order with every
            # publish after it; the node flushes when its inbox is drained (docs/design.md, "The journal").
            if not self._deferred:
                self.deferred_since = time.monotonic()
            self._deferred.append((kind, dst, payload, qos, retain))
            if len(self._deferred) >= MAX_DEFERRED:
                self.flush()
            return
        self._publish(kind, dst, payload, qos=qos, retain=retain)

    @property
    def deferred(self) -> int:
        """How many publishes wait for the next :meth:`flush`."""
        return len(self._deferred)

    def flush(self) -> None:
        """One sync for every journal write so far, then the publishes that waited for it, in order."""
        if not self._deferred:
            return
        pending, self._deferred = self._deferred, []
        for kind, dst, payload, qos, retain in pending:
            self._publish(kind, dst, payload, qos=qos, retain=retain)  # the first one syncs

    def _publish(self, kind: str, dst: str, payload: bytes, *, qos: int, retain: bool) -> None:
        t = self.topic(kind, dst)
        if self.outbox is not None and self.driver is None:
            # The durability barrier: what the node wrote before this (its outbox entries and keyed state share
            # one journal) is on disk before anything that follows it can be seen (docs/design.md, "Trust").
            # Driven, the bytes only leave when the loop writes the socket, and the loop syncs before it does.
            self.outbox.sync()
        chunks = make_chunks(payload, self.cfg.mqtt.chunk_bytes)
        for chunk in chunks:
            info = self.client.publish(t, chunk, qos=qos, retain=retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._count("publish_error")
        self._count(f"tx_{kind}")
        self._count("tx_bytes", len(payload))

    def send(
        self,
        kind: str,
        dst: str,
        *,
        body: Mapping[str, Any] | None = None,
        tensors: Mapping[str, Any] | None = None,
        run: str = "",
        round: int = 0,
        reliable: bool = False,
    ) -> Envelope:
        """Encode and publish one envelope. ``reliable`` goes through the on-disk outbox and is re-sent
        by :meth:`housekeeping` until the receiver acknowledges it."""
        b = dict(body or {})
        if reliable:
            b["reliable"] = True
        env = Envelope(kind=kind, src=self.node, dst=dst, body=b, tensors=dict(tensors or {}), run=run,
                       round=round, seq=next(self._seq), ts=time.time())
        payload = encode(env)
        if reliable:
            if self.outbox is None:
                raise RuntimeError("reliable send needs an outbox (configure state_dir)")
            self.outbox.put(env.id.hex(), self.topic(kind, dst), payload, time.monotonic())
        self.publish(kind, dst, payload)
        return env

    def send_json(self, kind: str, dst: str, obj: Mapping[str, Any], *, retain: bool = False) -> None:
        self.publish(kind, dst, encode_json(obj), retain=retain)

    def ack(self, inbound: Inbound) -> None:
        """Application-level acknowledgement: the message is applied (and persisted) here."""
        if inbound.env is not None:
            self._acked.seen(inbound.env.id)
            self._send_ack(inbound.env)

    def _send_ack(self, env: Envelope) -> None:
        self.ack_id(env.src, env.id, env.kind, env.run, env.round)

    def ack_id(self, src: str, msg_id: bytes, kind: str, run: str, round: int) -> None:
        """Acknowledge the message ``msg_id`` from ``src``: it is applied here, stop re-sending it."""
        self._acked.seen(msg_id)
        self.send("ack", src, body={"ids": [msg_id.hex()], "of": kind}, run=run, round=round)

    def event(self, name: str, *, level: str = "info", **fields: Any) -> None:
        self.send_json("event", BROADCAST, {"event": name, "level": level, "node": self.node,
                                            "role": self.role, "ts": time.time(), **fields})

    def metrics(self, **fields: Any) -> None:
        self.send_json("metrics", BROADCAST, {"node": self.node, "role": self.role, "ts": time.time(), **fields})

    def set_status(self, state: str, **fields: Any) -> None:
        self._status.update(fields)
        self._status["state"] = state
        if self.presence:
            self.publish("status", BROADCAST, self._status_payload(), retain=True)

    @property
    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def housekeeping(self, now: float, *, resend_after: float = 5.0) -> int:
        """Expire stale partial transfers, report refusals, re-send outbox entries not yet acknowledged."""
        self._expire(now)
        self.report_refused()
        if self.outbox is None or not self.connected:
            return 0
        due = self.outbox.due(now, resend_after)
        for e in due:
            for chunk in make_chunks(e.payload, self.cfg.mqtt.chunk_bytes):
                self.client.publish(e.topic, chunk, qos=1)
            self.outbox.mark_sent(e.key, now)
            self._count("resent")
        return len(due)

    def stats_snapshot(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self.stats)

    def stop(self, *, publish_offline: bool = True, timeout: float = 3.0) -> None:
        """Clean stop: publish offline ourselves (the will is only for unclean ends), then disconnect."""
        if self._closing:
            return
        self._closing = True
        deadline = time.monotonic() + timeout
        try:
            if publish_offline and self.presence and self.connected:
                info = self.client.publish(self.topic("status", BROADCAST), self._status_payload("offline"),
                                           qos=1, retain=True)
                if self.driver is not None:
                    self._drive(info.is_published, deadline)
                while not info.is_published() and time.monotonic() < deadline:
                    time.sleep(0.01)
            self.client.disconnect()
            if self.driver is not None:
                self._drive(lambda: self.client.socket() is None, deadline)
        finally:
            if self.driver is None:
                self.client.loop_stop()
            else:
                self.driver.remove(self)
                self.client._reset_sockets()  # not written within the timeout: closed anyway (paho has no public way)
