"""Splitting large payloads into chunk frames and putting them back together.

Why chunk at all (docs/design.md, "Wire format" and "Transport"): paho ignores the broker's Maximum Packet
Size, managed brokers cap messages at 128 KiB, and on loopback ~1 MiB messages were 3-4x faster than 50-100
MiB ones, which also hog broker memory. A payload larger than ``chunk_bytes`` is sent as frames on the same
topic::

    {"v": 1, "chunk": {"tid": bin16, "i": int, "n": int, "total": int[, "sha256": bin32]}, "data": bin}

``sha256`` (of the whole payload) rides on the last frame only. Every frame, header included, is at most
``chunk_bytes`` long, so ``chunk_bytes`` can be set to a broker's hard limit.

Theory of operation of :class:`Reassembler`: transfers are keyed by ``(src, tid)`` where ``src`` comes from
the topic, which the broker authenticates, so one sender cannot disturb another's transfers. A transfer
reserves its declared ``total`` when its first frame arrives; admission fails if that would exceed the
sender's own budget (``sender_bytes``, ``sender_transfers``: code ``sender_budget``) or the whole budget
(``max_bytes``, ``max_transfers``: ``too_large``), so memory is bounded by declarations, not by how many
frames eventually arrive, and one sender can exhaust only its own share (docs/design.md, "Trust"). Only a
frame that brings new data keeps a transfer alive: a duplicate never extends its life, and no transfer lives
longer than ``max_life_s`` whatever arrives. Any error discards the transfer and releases its memory.
Finished keys (completed or failed) are remembered per sender in a bounded FIFO so that QoS 1 redeliveries
arriving late are ignored instead of opening a partial transfer that could only expire; a sender churning
through keys evicts only its own. Time is a parameter; nothing here reads a clock.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mqttfl.wire.codec import PROTOCOL_VERSION, CodecError

TID_BYTES = 16
SHA256_BYTES = 32
# Upper bound of a frame's msgpack framing (maps, keys, three uint64s, tid, sha256, bin32 header: ~130 bytes).
FRAME_OVERHEAD = 160
# The msgpack encoding of the fixed frame start {"v": 1, "chunk": ...: fixmap(3), "v", 1, "chunk". Frames are
# always packed with this key order, and an envelope is an 11-entry map (first byte 0x8b), so a prefix
# comparison tells the two apart without unpacking a possibly 1 MiB frame twice.
_FRAME_PREFIX = b"\x83\xa1v\x01\xa5chunk"
_FRAME_KEYS = frozenset({"v", "chunk", "data"})
_HEADER_KEYS = frozenset({"tid", "i", "n", "total"})


class ChunkError(CodecError):
    """A chunk frame or transfer that must be dropped; codes: malformed, checksum, too_large, inconsistent."""


def make_chunks(payload: bytes, chunk_bytes: int, tid: bytes | None = None) -> list[bytes]:
    """Frames for ``payload``, each at most ``chunk_bytes`` long; a payload that fits is returned unframed."""
    if chunk_bytes <= 2 * FRAME_OVERHEAD:
        raise ValueError(f"chunk_bytes must exceed {2 * FRAME_OVERHEAD}, got {chunk_bytes}")
    if len(payload) <= chunk_bytes:
        return [payload]
    if tid is None:
        tid = os.urandom(TID_BYTES)
    if len(tid) != TID_BYTES:
        raise ValueError(f"tid must be {TID_BYTES} bytes")
    step = chunk_bytes - FRAME_OVERHEAD
    total = len(payload)
    n = -(-total // step)
    view = memoryview(payload)
    frames = []
    for i in range(n):
        header: dict[str, Any] = {"tid": tid, "i": i, "n": n, "total": total}
        if i == n - 1:
            header["sha256"] = hashlib.sha256(view).digest()
        # A memoryview slice lets msgpack copy straight from the payload, without an intermediate bytes.
        data = view[i * step : (i + 1) * step]
        frames.append(msgpack.packb({"v": PROTOCOL_VERSION, "chunk": header, "data": data}))
    return frames


def is_chunk_frame(frame: bytes | bytearray | memoryview) -> bool:
    """Whether a received payload is a chunk frame (cheap: compares a fixed prefix, see _FRAME_PREFIX)."""
    return bytes(frame[: len(_FRAME_PREFIX)]) == _FRAME_PREFIX


@dataclass
class _Transfer:
    n: int
    total: int
    started: float
    last_seen: float  # the last frame that brought new data
    chunks: dict[int, bytes] = field(default_factory=dict)
    held: int = 0
    sha256: bytes | None = None


@dataclass
class _Sender:
    """What one sender holds: its open transfers' declared bytes, and its recently finished keys."""

    reserved: int = 0
    transfers: int = 0
    finished: OrderedDict[bytes, None] = field(default_factory=OrderedDict)


@dataclass(frozen=True)
class _Frame:
    tid: bytes
    i: int
    n: int
    total: int
    sha256: bytes | None
    data: bytes


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_frame(frame: bytes | bytearray | memoryview) -> _Frame:
    try:
        size = memoryview(frame).nbytes
        msg = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_bin_len=size,
            max_str_len=16,
            max_array_len=0,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as exc:
        raise ChunkError("malformed", f"not a valid chunk frame: {exc}") from None
    if not isinstance(msg, dict) or set(msg) != _FRAME_KEYS or msg["v"] != PROTOCOL_VERSION:
        raise ChunkError("malformed", "chunk frame must be {'v': 1, 'chunk': {...}, 'data': bin}")
    header, data = msg["chunk"], msg["data"]
    if not isinstance(header, dict) or not isinstance(data, bytes):
        raise ChunkError("malformed", "chunk frame header must be a map and data binary")
    h: dict[str, Any] = header
    keys = set(h)
    if not (_HEADER_KEYS <= keys <= _HEADER_KEYS | {"sha256"}):
        raise ChunkError(
            "malformed", f"chunk header fields {sorted(map(str, keys))} != tid, i, n, total[, sha256]"
        )
    tid, i, n, total = h["tid"], h["i"], h["n"], h["total"]
    if not isinstance(tid, bytes) or len(tid) != TID_BYTES:
        raise ChunkError("malformed", f"chunk tid must be {TID_BYTES} bytes")
    if not (_is_int(i) and _is_int(n) and _is_int(total)):
        raise ChunkError("malformed", "chunk i, n and total must be ints")
    # Every chunk carries at least one byte, so n <= total; this bounds the number of chunks per transfer.
    if not (1 <= n <= total and 0 <= i < n and 1 <= len(data) <= total):
        raise ChunkError("malformed", f"chunk {i}/{n} of {len(data)} bytes cannot be part of {total} bytes")
    sha = h.get("sha256")
    if (sha is not None) != (i == n - 1):
        raise ChunkError("malformed", "sha256 must be present on the last chunk and only there")
    if sha is not None and (not isinstance(sha, bytes) or len(sha) != SHA256_BYTES):
        raise ChunkError("malformed", f"sha256 must be {SHA256_BYTES} bytes")
    return _Frame(tid=tid, i=i, n=n, total=total, sha256=sha, data=data)


class Reassembler:
    """Reassembles chunked payloads per ``(src, tid)`` within fixed memory and transfer-count bounds, overall and
    per sender."""

    def __init__(
        self,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        timeout_s: float = 30.0,
        max_transfers: int = 64,
        max_finished: int = 1024,
        sender_bytes: int | None = None,
        sender_transfers: int | None = None,
        max_life_s: float | None = None,
        max_senders: int = 4096,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_transfers = max_transfers
        self.max_finished = max_finished
        self.sender_bytes = max_bytes if sender_bytes is None else sender_bytes
        self.sender_transfers = max_transfers if sender_transfers is None else sender_transfers
        self.max_life_s = 10 * timeout_s if max_life_s is None else max_life_s
        self.max_senders = max_senders  # senders remembered (their finished keys); the idle ones go first
        self._open: dict[tuple[str, bytes], _Transfer] = {}
        self._senders: OrderedDict[str, _Sender] = OrderedDict()
        self._reserved = 0
        self._held = 0

    @property
    def bytes_held(self) -> int:
        """Chunk bytes currently buffered."""
        return self._held

    @property
    def bytes_reserved(self) -> int:
        """Sum of the declared sizes of open transfers; this is what ``max_bytes`` bounds."""
        return self._reserved

    @property
    def transfers(self) -> int:
        return len(self._open)

    def reserved_by(self, src: str) -> int:
        """Declared bytes of ``src``'s open transfers; what ``sender_bytes`` bounds."""
        s = self._senders.get(src)
        return s.reserved if s is not None else 0

    def _sender(self, src: str) -> _Sender:
        s = self._senders.get(src)
        if s is None:
            s = self._senders[src] = _Sender()
            while len(self._senders) > self.max_senders:
                victim = next((k for k, v in self._senders.items() if v.transfers == 0 and k != src), None)
                if victim is None:
                    break
                del self._senders[victim]
        self._senders.move_to_end(src)
        return s

    def feed(self, src: str, frame: bytes | bytearray | memoryview, now: float) -> bytes | None:
        """Add one frame; return the whole payload once complete and verified, else None.

        Raises ChunkError for a bad frame or a failed transfer; the transfer is then discarded.
        """
        f = _parse_frame(frame)
        key = (src, f.tid)
        sender = self._sender(src)
        if f.tid in sender.finished:
            return None
        t = self._open.get(key)
        if t is None:
            t = self._admit(key, sender, f, now)
        elif f.n != t.n or f.total != t.total:
            self._close(key)
            raise ChunkError(
                "inconsistent",
                f"transfer from {src!r}: chunk says {f.n} chunks/{f.total} bytes, earlier {t.n}/{t.total}",
            )
        if f.i in t.chunks:
            return None  # a duplicate: ignored, and it does not keep the transfer alive
        if t.held + len(f.data) > t.total:
            self._close(key)
            raise ChunkError("inconsistent", f"transfer from {src!r}: chunks exceed its {t.total} bytes")
        t.last_seen = now
        t.chunks[f.i] = f.data
        t.held += len(f.data)
        self._held += len(f.data)
        if f.sha256 is not None:
            t.sha256 = f.sha256
        if len(t.chunks) < t.n:
            return None
        return self._complete(key, t)

    def expire(self, now: float) -> list[tuple[str, bytes]]:
        """Drop transfers idle for more than ``timeout_s`` or older than ``max_life_s``; return their keys."""
        stale = [key for key, t in self._open.items()
                 if now - t.last_seen > self.timeout_s or now - t.started > self.max_life_s]
        for key in stale:
            self._close(key)
        return stale

    def _admit(self, key: tuple[str, bytes], sender: _Sender, f: _Frame, now: float) -> _Transfer:
        src = key[0]
        if f.total > min(self.max_bytes, self.sender_bytes):
            self._remember(key)
            raise ChunkError("too_large", f"transfer of {f.total} bytes from {src!r} exceeds what this node takes "
                                          f"from one sender ({min(self.max_bytes, self.sender_bytes)} bytes)")
        if sender.transfers >= self.sender_transfers or sender.reserved + f.total > self.sender_bytes:
            self._remember(key)
            raise ChunkError(
                "sender_budget",
                f"transfer of {f.total} bytes from {src!r} would exceed its budget ({sender.transfers} open, "
                f"{sender.reserved} of {self.sender_bytes} bytes reserved, cap {self.sender_transfers} transfers)",
            )
        if len(self._open) >= self.max_transfers:
            self._remember(key)
            raise ChunkError("too_large", f"{len(self._open)} transfers open, cap {self.max_transfers}")
        if self._reserved + f.total > self.max_bytes:
            self._remember(key)
            raise ChunkError(
                "too_large",
                f"transfer of {f.total} bytes from {src!r} would exceed the {self.max_bytes}-byte buffer "
                f"({self._reserved} reserved)",
            )
        t = _Transfer(n=f.n, total=f.total, started=now, last_seen=now)
        self._open[key] = t
        self._reserved += f.total
        sender.reserved += f.total
        sender.transfers += 1
        return t

    def _complete(self, key: tuple[str, bytes], t: _Transfer) -> bytes:
        payload = b"".join(t.chunks[i] for i in range(t.n))
        expected = t.sha256
        self._close(key)
        if len(payload) != t.total:
            raise ChunkError("inconsistent", f"transfer from {key[0]!r}: {len(payload)} bytes, not {t.total}")
        if hashlib.sha256(payload).digest() != expected:
            raise ChunkError("checksum", f"transfer from {key[0]!r}: SHA-256 of the payload does not match")
        return payload

    def _close(self, key: tuple[str, bytes]) -> None:
        """Release a transfer's memory and remember its key (used for success too: the key is finished)."""
        t = self._open.pop(key, None)
        if t is not None:
            self._reserved -= t.total
            self._held -= t.held
            s = self._senders.get(key[0])
            if s is not None:
                s.reserved -= t.total
                s.transfers -= 1
            t.chunks.clear()
        self._remember(key)

    def _remember(self, key: tuple[str, bytes]) -> None:
        finished = self._sender(key[0]).finished
        finished[key[1]] = None
        finished.move_to_end(key[1])
        while len(finished) > self.max_finished:
            finished.popitem(last=False)
