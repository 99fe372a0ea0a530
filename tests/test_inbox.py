"""The queue between paho's thread and the agent's loop: fair across senders, bounded per sender (no broker)."""

from __future__ import annotations

import threading

from mqttfl.runtime.inbox import FairInbox


def inbox(**kw: int | float) -> FairInbox:
    args = {"max_messages": 100, "max_bytes": 10_000, "sender_messages": 10, "sender_bytes": 1_000,
            "sender_rate": 1000.0, **kw}
    return FairInbox(**args)  # type: ignore[arg-type]


def test_senders_are_served_in_turn_so_a_flood_delays_others_by_one_message_at_most() -> None:
    q = inbox()
    for i in range(10):
        assert q.put("mallory", ("mallory", i), 10, now=0.0) is None
    q.put("edge1", ("edge1", 0), 10, now=0.0)
    q.put("edge1", ("edge1", 1), 10, now=0.0)
    got = [q.get() for _ in range(4)]
    assert got == [("mallory", 0), ("edge1", 0), ("mallory", 1), ("edge1", 1)]


def test_a_flooding_sender_fills_and_loses_only_its_own_queue() -> None:
    q = inbox()
    reasons = [q.put("mallory", i, 10, now=0.0) for i in range(15)]
    assert reasons[:10] == [None] * 10 and set(reasons[10:]) == {"sender_queue_full"}
    assert q.put("edge1", "legit", 10, now=0.0) is None
    big = inbox()
    assert big.put("mallory", "x", 900, now=0.0) is None
    assert big.put("mallory", "y", 200, now=0.0) == "sender_queue_full", "bytes are budgeted too"
    assert big.put("edge1", "z", 900, now=0.0) is None and big.queued_by("mallory") == (1, 900)


def test_order_is_kept_per_sender_and_everything_queued_comes_out() -> None:
    q = inbox(sender_messages=100)
    for i in range(30):
        q.put(f"n{i % 3}", (f"n{i % 3}", i), 1, now=0.0)
    out = [q.get() for _ in range(30)]
    for n in ("n0", "n1", "n2"):
        mine = [i for s, i in out if s == n]
        assert mine == sorted(mine) and len(mine) == 10
    assert q.get(timeout=0.0) is None and len(q) == 0 and q.bytes == 0


def test_messages_per_second_are_capped_per_sender_with_a_burst_of_two_seconds() -> None:
    q = inbox(sender_rate=5.0, sender_messages=1000)
    accepted = [q.put("mallory", i, 1, now=0.0) for i in range(20)]
    assert accepted.count(None) == 10 and "rate_limited" in accepted
    assert q.put("edge1", "x", 1, now=0.0) is None, "another sender has its own bucket"
    assert q.put("mallory", "later", 1, now=1.0) is None, "the bucket refills at the rate"


def test_the_whole_inbox_is_bounded_too() -> None:
    q = inbox(max_messages=5, sender_messages=5)
    for i in range(5):
        assert q.put(f"n{i}", i, 1, now=0.0) is None
    assert q.put("n9", 9, 1, now=0.0) == "inbox_full"


def test_get_waits_for_a_put_from_another_thread() -> None:
    q = inbox()
    threading.Timer(0.05, lambda: q.put("edge1", "late", 1)).start()
    assert q.get(timeout=5.0) == "late"
