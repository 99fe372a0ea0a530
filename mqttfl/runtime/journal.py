"""A node's journal: a small log-structured key-value store in one append-only file (docs/design.md, "Trust").

Why: a file per keyed state or outbox entry costs a create, an fsync, a rename and a directory fsync per write
and an unlink per delete; at a thousand devices that is most of an edge's time. Here a write is one append and
durability is a barrier: :meth:`Journal.sync` makes everything appended so far durable with one ``fdatasync``,
and the node calls it before anything leaves it (``Transport.publish``), so several writes between two visible
effects cost one sync (group commit) and no effect is seen before the state it follows.

Format: an 8-byte magic, then records ``crc32 u32 | op u8 | key length u16 | value length u32 | key | value``
(little endian; the CRC covers everything after itself). ``op`` 1 is a put, 2 a delete (no value). On open the
file is replayed, the last record of a key wins; a record cut short or failing its CRC ends the log there: the
file is truncated to the last good record and the loss counted (a crash mid-append loses only what was not yet
synced). Values are read lazily by offset, so memory is O(live keys), not O(bytes). When dead bytes exceed
both the live bytes and a floor, the live records are rewritten to a temporary file that is fsynced and renamed
over the journal (compaction).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from mqttfl.runtime.persist import fsync_dir

MAGIC = b"MQFLJ1\n\0"
_HEAD = struct.Struct("<IBHI")  # crc32, op, key length, value length
_PUT, _DEL = 1, 2
MAX_KEY_BYTES = 0xFFFF
MAX_VALUE_BYTES = 0xFFFFFFFF


class JournalError(ValueError):
    """The file is not a journal (refused rather than overwritten)."""


def _write_all(fd: int, data: bytes, at: int) -> None:
    written = os.pwrite(fd, data, at)
    while written < len(data):  # a short write (rare: signals, full disk) is finished or raises
        written += os.pwrite(fd, data[written:], at + written)


def _record(op: int, key: bytes, value: bytes) -> bytes:
    rest = struct.pack("<BHI", op, len(key), len(value)) + key + value
    return struct.pack("<I", zlib.crc32(rest)) + rest


class Journal:
    """One append-only file of keyed values. Thread-safe; one process at a time (the node's state-directory
    lock). ``max_keys``/``max_bytes`` bound the live data: a put beyond them raises :class:`OverflowError`.
    ``readonly``: look at a journal another process may be writing (a test, an operator): nothing is repaired
    or written."""

    def __init__(self, path: str | Path, *, max_keys: int = 100_000, max_bytes: int = 1 << 30,
                 compact_floor: int = 1 << 20, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.compact_floor = compact_floor
        self.torn_bytes = 0  # bytes cut off a torn or corrupt tail when the file was opened
        self.compactions = 0
        self.syncs = 0
        self._lock = threading.RLock()
        self._index: dict[str, tuple[int, int, int]] = {}  # key -> (value offset, value length, record length)
        self._live = 0  # bytes of the live records
        self._dirty = False
        self._fd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._end = self._replay()
        except BaseException:
            os.close(self._fd)
            raise
        # After a crash the page cache may still hold writes that were never synced, and replay accepts them:
        # the first barrier syncs them before anything resumed from them is published.
        self._dirty = not readonly and bool(self._index)

    # ------------------------------------------------------------------ open
    def _replay(self) -> int:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, len(MAGIC), 0)
        if len(head) < len(MAGIC):
            if not MAGIC.startswith(head):
                raise JournalError(f"{self.path} is not a journal")
            if self.readonly:
                return len(head)
            # New, or torn while being created: start it.
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, MAGIC, 0)
            os.fsync(self._fd)
            fsync_dir(self.path.parent)
            return len(MAGIC)
        if head != MAGIC:
            raise JournalError(f"{self.path} is not a journal (bad magic)")
        pos = len(MAGIC)
        with open(self.path, "rb", buffering=1 << 16) as f:
            f.seek(pos)
            while True:
                raw = f.read(_HEAD.size)
                if len(raw) < _HEAD.size:
                    break
                crc, op, klen, vlen = _HEAD.unpack(raw)
                if op not in (_PUT, _DEL) or (op == _DEL and vlen) or pos + _HEAD.size + klen + vlen > size:
                    break
                key = f.read(klen)
                # The CRC needs the value; read it in pieces so a large value costs no large buffer.
                c = zlib.crc32(raw[4:] + key)
                left = vlen
                while left:
                    piece = f.read(min(left, 1 << 20))
                    if not piece:
                        break
                    c = zlib.crc32(piece, c)
                    left -= len(piece)
                if left or c != crc:
                    break
                try:
                    name = key.decode()
                except UnicodeDecodeError:
                    break
                length = _HEAD.size + klen + vlen
                self._drop(name)
                if op == _PUT:
                    self._index[name] = (pos + _HEAD.size + klen, vlen, length)
                    self._live += length
                pos += length
        if pos < size:
            self.torn_bytes = size - pos
            if self.readonly:
                return pos
            os.ftruncate(self._fd, pos)
            os.fsync(self._fd)
        return pos

    def _drop(self, key: str) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            self._live -= old[2]

    # ------------------------------------------------------------------ reads
    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return None
            off, vlen, _ = entry
            return os.pread(self._fd, vlen, off) if vlen else b""

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self, prefix: str = "") -> list[str]:
        """Live keys starting with ``prefix``, oldest write first."""
        with self._lock:
            return [k for k in self._index if k.startswith(prefix)]

    def items(self, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        for key in self.keys(prefix):
            value = self.get(key)
            if value is not None:
                yield key, value

    def stats(self) -> dict[str, int]:
        """For the node's metrics: the barrier's syncs, what opening cut off, compactions, live and file bytes."""
        return {"keys": len(self._index), "live_bytes": self._live, "file_bytes": self._end, "syncs": self.syncs,
                "torn_bytes": self.torn_bytes, "compactions": self.compactions}

    # ------------------------------------------------------------------ writes
    def put(self, key: str, value: bytes) -> None:
        """Append ``value`` under ``key`` (not yet durable: see :meth:`sync`)."""
        if self.readonly:
            raise PermissionError(f"journal {self.path} opened read-only")
        k = key.encode()
        if not k or len(k) > MAX_KEY_BYTES:
            raise ValueError(f"journal key {key!r}: 1 to {MAX_KEY_BYTES} bytes")
        if len(value) > MAX_VALUE_BYTES:
            raise OverflowError(f"journal value of {len(value)} bytes is too large")
        with self._lock:
            length = _HEAD.size + len(k) + len(value)
            old = self._index.get(key)
            if old is None and len(self._index) >= self.max_keys:
                raise OverflowError(f"journal {self.path} full ({self.max_keys} keys)")
            if self._live - (old[2] if old else 0) + length > self.max_bytes:
                raise OverflowError(f"journal {self.path} full ({self.max_bytes} bytes of live data)")
            self._append(_record(_PUT, k, bytes(value)))
            self._drop(key)
            self._index[key] = (self._end - len(value), len(value), length)
            self._live += length
            self._maybe_compact()

    def delete(self, key: str, *, durable: bool = True) -> bool:
        """Forget ``key``; whether it was there. ``durable=False``: the delete needs no barrier of its own (it
        becomes durable with the next one); a power cut before that may bring the key back."""
        with self._lock:
            if key not in self._index:
                return False
            if self.readonly:
                raise PermissionError(f"journal {self.path} opened read-only")
            dirty = self._dirty
            self._append(_record(_DEL, key.encode(), b""))
            self._dirty = dirty or durable
            self._drop(key)
            self._maybe_compact()
            return True

    def _append(self, rec: bytes) -> None:
        _write_all(self._fd, rec, self._end)
        self._end += len(rec)
        self._dirty = True

    @property
    def dirty(self) -> bool:
        """Whether something was written since the last sync."""
        return self._dirty

    def sync(self) -> bool:
        """The barrier: make every write so far durable (one ``fdatasync`` if anything changed); whether it
        synced."""
        if not self._dirty:
            return False
        with self._lock:
            if not self._dirty:
                return False
            os.fdatasync(self._fd)
            self._dirty = False
            self.syncs += 1
            return True

    # ------------------------------------------------------------------ compaction
    def _maybe_compact(self) -> None:
        dead = self._end - len(MAGIC) - self._live
        if dead > self._live and dead > self.compact_floor:
            self.compact()

    def compact(self) -> None:
        """Rewrite the live records to a fresh file, fsync it and rename it over the journal: the old file
        stays whole until the rename, so a crash during compaction loses nothing."""
        with self._lock:
            tmp = self.path.with_name(f".{self.path.name}.compact{os.getpid()}")
            index: dict[str, tuple[int, int, int]] = {}
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                pos = 0
                for chunk in self._live_records(index):
                    _write_all(fd, chunk, pos)
                    pos += len(chunk)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            os.close(self._fd)
            self._fd = fd
            self._index, self._end, self._dirty = index, pos, False
            self.compactions += 1

    def _live_records(self, index: dict[str, tuple[int, int, int]]) -> Iterator[bytes]:
        yield MAGIC
        pos = len(MAGIC)
        for key, (off, vlen, length) in self._index.items():
            k = key.encode()
            rec = _record(_PUT, k, os.pread(self._fd, vlen, off) if vlen else b"")
            index[key] = (pos + _HEAD.size + len(k), vlen, length)
            pos += length
            yield rec

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self.sync()
            os.close(self._fd)
            self._fd = -1
