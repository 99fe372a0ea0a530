from __future__ import annotations

import os
import random

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttfl.wire.chunking import FRAME_OVERHEAD, ChunkError, Reassembler, is_chunk_frame, make_chunks
from mqttfl.wire.codec import CodecError, Envelope, encode

CHUNK = 1024


def _feed_all(r: Reassembler, frames: list[bytes], src: str = "dev1", now: float = 0.0) -> list[bytes]:
    return [out for f in frames if (out := r.feed(src, f, now)) is not None]


def _tamper(frame: bytes) -> bytes:
    msg = msgpack.unpackb(frame, raw=False)
    data = bytearray(msg["data"])
    data[len(data) // 2] ^= 0x01
    msg["data"] = bytes(data)
    return msgpack.packb(msg)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 7])
def test_round_trip_around_the_chunk_boundary(size: int) -> None:
    payload = os.urandom(size)
    frames = make_chunks(payload, CHUNK)
    if size <= CHUNK:
        assert frames == [payload]
        return
    assert len(frames) >= 2
    assert all(len(f) <= CHUNK for f in frames)
    assert all(is_chunk_frame(f) for f in frames)
    r = Reassembler()
    assert _feed_all(r, frames) == [payload]
    assert r.bytes_held == 0 and r.transfers == 0 and r.bytes_reserved == 0


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=CHUNK + 1, max_value=20 * CHUNK), seed=st.integers(0, 2**32 - 1))
def test_shuffled_and_duplicated_frames_reassemble_exactly_once(size: int, seed: int) -> None:
    payload = random.Random(seed).randbytes(size)
    frames = make_chunks(payload, CHUNK)
    rng = random.Random(seed)
    delivered = frames + rng.sample(frames, k=len(frames) // 2)
    rng.shuffle(delivered)
    r = Reassembler()
    assert _feed_all(r, delivered) == [payload]
    assert r.bytes_held == 0


def test_envelopes_are_never_mistaken_for_chunk_frames() -> None:
    data = encode(Envelope(kind="act", src="dev1", dst="edge1", tensors={"x": np.zeros(10, np.float32)}))
    assert not is_chunk_frame(data)
    assert not is_chunk_frame(b"")


def test_duplicate_frames_do_not_grow_memory() -> None:
    frames = make_chunks(os.urandom(4 * CHUNK), CHUNK)
    r = Reassembler()
    r.feed("dev1", frames[0], 0.0)
    held = r.bytes_held
    for _ in range(5):
        assert r.feed("dev1", frames[0], 0.0) is None
    assert r.bytes_held == held


def test_lost_chunk_never_completes_and_expiry_releases_memory() -> None:
    frames = make_chunks(os.urandom(4 * CHUNK), CHUNK)
    r = Reassembler(timeout_s=10.0)
    assert _feed_all(r, frames[:1] + frames[2:], now=1.0) == []
    assert r.transfers == 1 and r.bytes_held > 0
    assert r.expire(now=11.0) == []  # idle exactly timeout_s: kept
    expired = r.expire(now=11.5)
    assert len(expired) == 1 and expired[0][0] == "dev1" and len(expired[0][1]) == 16
    assert r.transfers == 0 and r.bytes_held == 0 and r.bytes_reserved == 0


def test_activity_postpones_expiry() -> None:
    frames = make_chunks(os.urandom(4 * CHUNK), CHUNK)
    r = Reassembler(timeout_s=10.0)
    r.feed("dev1", frames[0], 0.0)
    r.feed("dev1", frames[1], 8.0)
    assert r.expire(15.0) == []
    assert _feed_all(r, frames[2:], now=16.0) != []


def test_tampered_chunk_fails_checksum_and_releases_memory() -> None:
    payload = os.urandom(3 * CHUNK)
    frames = make_chunks(payload, CHUNK)
    frames[1] = _tamper(frames[1])
    r = Reassembler()
    with pytest.raises(ChunkError) as info:
        _feed_all(r, frames)
    assert info.value.code == "checksum"
    assert isinstance(info.value, CodecError)
    assert r.bytes_held == 0 and r.transfers == 0 and r.bytes_reserved == 0


def test_transfer_larger_than_max_bytes_is_refused_and_nothing_is_held() -> None:
    frames = make_chunks(os.urandom(10 * CHUNK), CHUNK)
    r = Reassembler(max_bytes=5 * CHUNK)
    with pytest.raises(ChunkError) as info:
        r.feed("dev1", frames[0], 0.0)
    assert info.value.code == "too_large"
    assert r.bytes_held == 0 and r.transfers == 0
    # the rest of a refused transfer is dropped quietly instead of opening a transfer that cannot complete
    assert _feed_all(r, frames[1:]) == []
    assert r.bytes_held == 0 and r.transfers == 0


def test_concurrent_transfers_share_the_max_bytes_budget() -> None:
    a = make_chunks(os.urandom(3 * CHUNK), CHUNK)
    b = make_chunks(os.urandom(3 * CHUNK), CHUNK)
    r = Reassembler(max_bytes=4 * CHUNK)
    r.feed("dev1", a[0], 0.0)
    with pytest.raises(ChunkError) as info:
        r.feed("dev2", b[0], 0.0)
    assert info.value.code == "too_large"
    assert len(_feed_all(r, a[1:])) == 1  # the admitted transfer still completes


def test_max_transfers_caps_open_transfers() -> None:
    r = Reassembler(max_transfers=2)
    for src in ("dev1", "dev2"):
        r.feed(src, make_chunks(os.urandom(2 * CHUNK), CHUNK)[0], 0.0)
    held = r.bytes_held
    with pytest.raises(ChunkError) as info:
        r.feed("dev3", make_chunks(os.urandom(2 * CHUNK), CHUNK)[0], 0.0)
    assert info.value.code == "too_large"
    assert r.transfers == 2 and r.bytes_held == held


def test_late_duplicate_after_completion_is_ignored() -> None:
    payload = os.urandom(3 * CHUNK)
    frames = make_chunks(payload, CHUNK)
    r = Reassembler()
    assert _feed_all(r, frames) == [payload]
    for f in frames:
        assert r.feed("dev1", f, 1.0) is None
    assert r.transfers == 0 and r.bytes_held == 0


def test_finished_set_is_bounded() -> None:
    r = Reassembler(max_finished=3)
    for _ in range(10):
        _feed_all(r, make_chunks(os.urandom(2 * CHUNK), CHUNK))
    assert len(r._senders["dev1"].finished) == 3


def test_one_sender_exhausts_only_its_own_budget_of_transfers_and_bytes() -> None:
    """Finding: one sender's 64 never-finished tiny transfers filled the table for everyone."""
    r = Reassembler(max_transfers=64, sender_transfers=4, max_bytes=64 * CHUNK, sender_bytes=16 * CHUNK)
    for _ in range(4):
        r.feed("mallory", make_chunks(os.urandom(2 * CHUNK), CHUNK)[0], 0.0)
    with pytest.raises(ChunkError) as info:
        r.feed("mallory", make_chunks(os.urandom(2 * CHUNK), CHUNK)[0], 0.0)
    assert info.value.code == "sender_budget"
    r2 = Reassembler(max_bytes=64 * CHUNK, sender_bytes=16 * CHUNK)
    r2.feed("mallory", make_chunks(os.urandom(10 * CHUNK), CHUNK)[0], 0.0)
    with pytest.raises(ChunkError) as info:  # free transfers, but its bytes are reserved
        r2.feed("mallory", make_chunks(os.urandom(10 * CHUNK), CHUNK)[0], 0.0)
    assert info.value.code == "sender_budget"
    with pytest.raises(ChunkError) as info:  # larger than any sender may send
        r2.feed("edge1", make_chunks(os.urandom(20 * CHUNK), CHUNK)[0], 0.0)
    assert info.value.code == "too_large"
    payload = os.urandom(10 * CHUNK)
    assert _feed_all(r, make_chunks(payload, CHUNK), src="edge1") == [payload], "others still get through"
    assert r.reserved_by("mallory") > 0 and r.reserved_by("edge1") == 0


def test_duplicate_frames_never_extend_a_transfers_life() -> None:
    """Finding: a duplicate frame re-sent every 20 s kept a transfer (and its reservation) open forever."""
    frames = make_chunks(os.urandom(4 * CHUNK), CHUNK)
    r = Reassembler(timeout_s=30.0)
    r.feed("mallory", frames[0], 0.0)
    for t in (20.0, 29.0):
        assert r.feed("mallory", frames[0], t) is None
    assert r.expire(31.0) != [] and r.transfers == 0 and r.bytes_reserved == 0


def test_a_trickle_of_new_frames_cannot_keep_a_transfer_alive_past_its_lifetime() -> None:
    frames = make_chunks(os.urandom(40 * CHUNK), CHUNK)
    r = Reassembler(timeout_s=10.0, max_life_s=50.0)
    for i, f in enumerate(frames[:-1]):
        r.feed("mallory", f, 9.0 * i)
        if 9.0 * i > 50.0:
            break
    assert r.expire(9.0 * 6 + 1) != [] and r.transfers == 0 and r.bytes_held == 0


def test_a_sender_churning_through_finished_keys_evicts_only_its_own() -> None:
    r = Reassembler(max_finished=3)
    legit = make_chunks(os.urandom(2 * CHUNK), CHUNK)
    _feed_all(r, legit, src="edge1")
    for _ in range(10):
        _feed_all(r, make_chunks(os.urandom(2 * CHUNK), CHUNK), src="mallory")
    assert r.feed("edge1", legit[0], 1.0) is None and r.transfers == 0, "a late redelivery reopens nothing"


def test_same_tid_from_different_senders_are_separate_transfers() -> None:
    tid = os.urandom(16)
    p1, p2 = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
    f1, f2 = make_chunks(p1, CHUNK, tid), make_chunks(p2, CHUNK, tid)
    r = Reassembler()
    out = []
    for a, b in zip(f1, f2, strict=True):
        out += [r.feed("a", a, 0.0), r.feed("b", b, 0.0)]
    assert [o for o in out if o is not None] == [p1, p2]


def test_frame_disagreeing_with_earlier_frames_is_inconsistent_and_drops_the_transfer() -> None:
    tid = os.urandom(16)
    first = make_chunks(os.urandom(3 * CHUNK), CHUNK, tid)
    other = make_chunks(os.urandom(5 * CHUNK), CHUNK, tid)
    r = Reassembler()
    r.feed("dev1", first[0], 0.0)
    with pytest.raises(ChunkError) as info:
        r.feed("dev1", other[1], 0.0)
    assert info.value.code == "inconsistent"
    assert r.transfers == 0 and r.bytes_held == 0


def _frame(header: dict, data: bytes = b"x") -> bytes:
    return msgpack.packb({"v": 1, "chunk": header, "data": data})


TID = b"t" * 16
SHA = b"s" * 32


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x83\xa1v\x01\xa5chunk",  # truncated
        msgpack.packb([1, 2]),
        msgpack.packb({"v": 2, "chunk": {"tid": TID, "i": 0, "n": 2, "total": 2}, "data": b"x"}),
        msgpack.packb({"v": 1, "chunk": {"tid": TID, "i": 0, "n": 2, "total": 2}}),
        _frame({"tid": b"short", "i": 0, "n": 2, "total": 2}),
        _frame({"tid": TID, "i": 2, "n": 2, "total": 2}),  # index out of range
        _frame({"tid": TID, "i": -1, "n": 2, "total": 2}),
        _frame({"tid": TID, "i": 0, "n": 0, "total": 2}),
        _frame({"tid": TID, "i": 0, "n": 10**9, "total": 2}),  # more chunks than bytes
        _frame({"tid": TID, "i": 0, "n": 2, "total": 2}, b""),  # empty chunk
        _frame({"tid": TID, "i": 0, "n": 2, "total": 2}, b"xyz"),  # chunk bigger than the payload
        _frame({"tid": TID, "i": 1, "n": 2, "total": 2}),  # last chunk without sha256
        _frame({"tid": TID, "i": 0, "n": 2, "total": 2, "sha256": SHA}),  # sha256 not on the last chunk
        _frame({"tid": TID, "i": 1, "n": 2, "total": 2, "sha256": b"short"}),
        _frame({"tid": TID, "i": True, "n": 2, "total": 2}),
        _frame({"tid": TID, "i": 0, "n": 2, "total": 2, "extra": 1}),
    ],
)
def test_malformed_frames_are_rejected(frame: bytes) -> None:
    with pytest.raises(ChunkError) as info:
        Reassembler().feed("dev1", frame, 0.0)
    assert info.value.code == "malformed"


def test_chunks_summing_past_the_declared_total_are_inconsistent() -> None:
    r = Reassembler()
    r.feed("dev1", _frame({"tid": TID, "i": 0, "n": 3, "total": 4}, b"abc"), 0.0)
    with pytest.raises(ChunkError) as info:
        r.feed("dev1", _frame({"tid": TID, "i": 1, "n": 3, "total": 4}, b"de"), 0.0)
    assert info.value.code == "inconsistent"
    assert r.bytes_held == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_feed_of_random_bytes_raises_only_chunk_error(data: bytes) -> None:
    try:
        Reassembler().feed("dev1", data, 0.0)
    except ChunkError:
        pass


def test_make_chunks_refuses_a_chunk_size_smaller_than_its_framing() -> None:
    with pytest.raises(ValueError):
        make_chunks(b"x" * 1000, FRAME_OVERHEAD)
