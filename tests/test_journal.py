"""The node's journal (mqttfl/runtime/journal.py) and what is built on it: the outbox and keyed state."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from mqttfl.runtime.config import load_config
from mqttfl.runtime.journal import MAGIC, Journal, JournalError
from mqttfl.runtime.node import KEYED_DIR, KEYED_PREFIX, Node, load_keyed_states, open_journal
from mqttfl.runtime.outbox import JOURNAL_FILE, Outbox
from mqttfl.runtime.persist import dumps, save_state
from mqttfl.runtime.transport import Transport
from mqttfl.tools.cli import main


def _j(tmp_path: Path, **kw: int) -> Journal:
    return Journal(tmp_path / "j.log", **kw)


def test_round_trip_and_restart_replay(tmp_path: Path) -> None:
    j = _j(tmp_path)
    j.put("a", b"1")
    j.put("b", b"")
    j.put("c", bytes(range(256)) * 100)
    assert (j.get("a"), j.get("b"), j.get("c")) == (b"1", b"", bytes(range(256)) * 100)
    assert j.get("missing") is None
    j.close()
    again = _j(tmp_path)
    assert again.keys() == ["a", "b", "c"]
    assert dict(again.items()) == {"a": b"1", "b": b"", "c": bytes(range(256)) * 100}
    assert again.stats()["torn_bytes"] == 0


def test_last_write_wins_and_delete(tmp_path: Path) -> None:
    j = _j(tmp_path)
    j.put("k", b"old")
    j.put("other", b"x")
    j.put("k", b"new")
    assert j.get("k") == b"new"
    assert j.delete("other") and not j.delete("other")
    j.sync()
    again = _j(tmp_path)
    assert dict(again.items()) == {"k": b"new"}
    assert "other" not in again and len(again) == 1


def test_the_barrier_syncs_once_per_group_of_writes(tmp_path: Path) -> None:
    j = _j(tmp_path)
    for i in range(5):
        j.put(f"k{i}", b"v")
    assert j.sync() and not j.sync(), "five writes, one fdatasync; nothing new: none"
    j.delete("k0")
    assert j.sync()
    assert j.stats()["syncs"] == 2
    j.delete("k1", durable=False)
    assert not j.sync(), "a delete that needs no barrier of its own costs none"
    j.put("k5", b"v")
    assert j.sync()
    j.close()
    assert _j(tmp_path).keys() == ["k2", "k3", "k4", "k5"], "it was made durable with the next barrier"


def _three_records(tmp_path: Path) -> tuple[Path, int]:
    j = _j(tmp_path)
    j.put("first", b"one")
    j.put("second", b"two" * 10)
    before_last = j.stats()["file_bytes"]
    j.put("third", b"three" * 10)
    j.close()
    return tmp_path / "j.log", before_last


def test_a_torn_tail_at_every_byte_is_cut_off_and_earlier_records_survive(tmp_path: Path) -> None:
    path, before_last = _three_records(tmp_path)
    whole = path.read_bytes()
    for cut in range(before_last, len(whole)):
        path.write_bytes(whole[:cut])
        j = Journal(path)
        assert dict(j.items()) == {"first": b"one", "second": b"two" * 10}, cut
        assert j.stats()["torn_bytes"] == cut - before_last
        assert path.stat().st_size == before_last, "the torn record is truncated away"
        j.put("after", b"ok")  # and the journal goes on from the last good record
        j.close()
        assert dict(Journal(path).items()) == {"first": b"one", "second": b"two" * 10, "after": b"ok"}
    path.write_bytes(whole)
    assert len(Journal(path)) == 3


def test_a_corrupt_crc_ends_the_log_there(tmp_path: Path) -> None:
    path, before_last = _three_records(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a bit flip inside the last record's value
    path.write_bytes(bytes(data))
    j = Journal(path)
    assert dict(j.items()) == {"first": b"one", "second": b"two" * 10}
    assert j.stats()["torn_bytes"] == len(data) - before_last


def test_a_foreign_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "j.log"
    path.write_bytes(b"hello world, not a journal")
    with pytest.raises(JournalError, match="not a journal"):
        Journal(path)
    assert path.read_bytes() == b"hello world, not a journal"
    torn_start = tmp_path / "t.log"
    torn_start.write_bytes(MAGIC[:3])  # a crash while the journal was being created
    assert len(Journal(torn_start)) == 0 and torn_start.read_bytes() == MAGIC


def test_compaction_keeps_live_data_and_shrinks_the_file(tmp_path: Path) -> None:
    j = _j(tmp_path, compact_floor=4096)
    j.put("keep", b"K" * 100)
    for i in range(200):
        j.put(f"churn{i % 3}", bytes([i % 256]) * 500)  # overwritten over and over: dead bytes pile up
    for i in range(3):
        j.delete(f"churn{i}")
    j.put("late", b"L")
    stats = j.stats()
    assert stats["compactions"] >= 1
    assert stats["file_bytes"] - len(MAGIC) - stats["live_bytes"] <= max(stats["live_bytes"], 4096)
    assert (tmp_path / "j.log").stat().st_size == stats["file_bytes"] < 200 * 500
    assert dict(j.items()) == {"keep": b"K" * 100, "late": b"L"}
    j.close()
    assert dict(_j(tmp_path).items()) == {"keep": b"K" * 100, "late": b"L"}
    assert [p.name for p in tmp_path.iterdir()] == ["j.log"], "no temporary file left behind"


def test_bounds_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    j = _j(tmp_path, max_keys=2, max_bytes=1000)
    j.put("a", b"x")
    j.put("b", b"x")
    with pytest.raises(OverflowError, match="2 keys"):
        j.put("c", b"x")
    j.put("a", b"y")  # replacing a key is not a new one
    with pytest.raises(OverflowError, match="1000 bytes"):
        j.put("b", b"z" * 2000)
    assert dict(j.items()) == {"a": b"y", "b": b"x"}, "a refused put changes nothing"
    with pytest.raises(ValueError):
        j.put("", b"x")


def test_readonly_repairs_nothing(tmp_path: Path) -> None:
    path, _ = _three_records(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-2])
    ro = Journal(path, readonly=True)
    assert ro.keys() == ["first", "second"] and path.read_bytes() == whole[:-2]
    with pytest.raises(PermissionError):
        ro.put("x", b"y")


# ------------------------------------------------------------------------------------------------ outbox


def test_outbox_survives_a_restart_and_forgets_what_is_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")
    box.put("aa", "mqttfl/v1/f/delta/alice/bob", b"p1", now=1.0)
    box.put("bb", "mqttfl/v1/f/delta/alice/carol", b"p2" * 1000, now=2.0)
    assert not box.ack("aa", by="carol"), "only the receiver's ack counts"
    assert box.ack("aa", by="bob")
    box.sync()
    again = Outbox(tmp_path / "ob")
    assert [(e.key, e.payload) for e in again.pending()] == [("bb", b"p2" * 1000)]
    with pytest.raises(OverflowError, match="outbox full"):
        small = Outbox(tmp_path / "small", max_entries=1)
        small.put("01", "t", b"", now=0.0)
        small.put("02", "t", b"", now=0.0)


def test_outbox_folds_in_the_files_of_the_earlier_format(tmp_path: Path) -> None:
    d = tmp_path / "ob"
    d.mkdir()
    (d / "cc.msg").write_bytes(msgpack.packb({"topic": "mqttfl/v1/f/delta/a/b", "payload": b"old", "created": 3.0}))
    (d / "dd.msg").write_bytes(b"\x93torn")
    box = Outbox(d)
    assert [(e.key, e.topic, e.payload) for e in box.pending()] == [("cc", "mqttfl/v1/f/delta/a/b", b"old")]
    assert sorted(p.name for p in d.iterdir()) == [JOURNAL_FILE], "the old files are gone once folded in"
    assert Outbox(d).keys() == ["cc"]


# ------------------------------------------------------------------------------------------------ keyed state


def test_keyed_state_files_of_the_earlier_format_are_folded_in_once(tmp_path: Path) -> None:
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": 4}
    save_state(tmp_path / KEYED_DIR / "session.dev1.state", state)
    (tmp_path / KEYED_DIR / "session.dev2.state").write_bytes(b"\xc1 not msgpack")
    restored = load_keyed_states(tmp_path)
    assert set(restored) == {"session.dev1"}, "an unreadable state is skipped"
    np.testing.assert_array_equal(restored["session.dev1"]["w"], state["w"])
    assert list((tmp_path / KEYED_DIR).glob("*.state")) == []
    assert set(load_keyed_states(tmp_path)) == {"session.dev1"}, "from the journal after the files are gone"
    j = open_journal(tmp_path)
    j.put(KEYED_PREFIX + "session.dev3", dumps({"step": 1}))
    j.delete(KEYED_PREFIX + "session.dev1")
    j.close()
    assert set(load_keyed_states(tmp_path)) == {"session.dev3"}
    assert os.path.exists(tmp_path / JOURNAL_FILE)


def test_the_transport_syncs_the_journal_before_anything_is_published(tmp_path: Path) -> None:
    journal = open_journal(tmp_path)
    cfg = load_config(None, "test", environ={}, node="alice", fleet="f", state_dir=str(tmp_path),
                      mqtt={"host": "127.0.0.1", "port": 1})
    t = Transport(cfg, outbox=Outbox(tmp_path / "outbox", journal=journal), inbox=False)
    dirty_at_publish: list[bool] = []
    real = t.client.publish
    t.client.publish = lambda *a, **kw: (dirty_at_publish.append(journal._dirty), real(*a, **kw))[1]  # type: ignore
    journal.put(KEYED_PREFIX + "session.dev1", dumps({"step": 1}))  # a machine's Persist, then its Send
    journal.put(KEYED_PREFIX + "session.dev2", dumps({"step": 1}))
    t.send("delta", "bob", body={"x": 1}, reliable=True)
    t.event("something")
    assert dirty_at_publish == [False, False], "nothing is published while a write is not yet durable"
    assert journal.stats()["syncs"] == 1, "two persists and an outbox entry: one fdatasync"


def test_the_journal_bench_runs_at_a_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "journal", "--small", "--json", "--out", str(tmp_path / "out")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"outbox_files_ops_per_s", "outbox_journal_ops_per_s", "outbox_speedup", "keyed_files_ops_per_s",
            "keyed_journal_ops_per_s", "keyed_speedup", "keyed_journal_syncs", "loadavg"} <= set(r)
    assert r["keyed_journal_syncs"] == 2 + 1, "20 sessions in groups of 10: a barrier per group and one at the end"
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == r
    assert list(tmp_path.iterdir()) == [tmp_path / "out"], "the bench's files go into --out and a removed temp dir"


class _Quiet:
    """A machine that does nothing: the test drives the node's effect methods itself."""

    commands: tuple[str, ...] = ()

    def handle(self, ev: object, now: float) -> list[object]:
        return []

    def presence(self) -> dict[str, object]:
        return {}

    def metrics(self) -> dict[str, object]:
        return {}


def test_a_node_keeps_keyed_state_in_its_journal_durable_before_its_next_publish(tmp_path: Path) -> None:
    cfg = load_config(None, "edge", environ={}, node="edge1", fleet="f", state_dir=str(tmp_path),
                      mqtt={"host": "127.0.0.1", "port": 1})
    node = Node(cfg, _Quiet())  # type: ignore[arg-type]
    assert node.journal is not None and node.state_dir == tmp_path / "edge1"
    node.persist({"step": np.int64(3)}, key="session.dev1")
    node.persist({"step": 1}, key="session.dev2")
    node.persist(None, key="session.dev2")
    assert node.journal.stats()["syncs"] == 0, "no sync until something leaves the node"
    node.emit("something", "info", {})
    # Group commit: what follows an unsynced write waits for the node's next flush (its inbox drained), and so
    # does everything after it; several messages' writes and effects then cost one sync.
    assert node.transport.deferred == 1 and node.journal.stats()["syncs"] == 0
    node.persist({"step": 4}, key="session.dev3")
    node.emit("something else", "info", {})
    assert node.transport.deferred == 2 and node.journal.stats()["syncs"] == 0
    node.transport.flush()
    assert node.transport.deferred == 0 and node.journal.stats()["syncs"] == 1
    node.emit("clean", "info", {})  # nothing unsynced: out at once, no sync
    assert node.transport.deferred == 0 and node.journal.stats()["syncs"] == 1
    node.persist(None, key="session.dev3")
    node.stop()
    node._lock.close()  # the lock lasts as long as the process; the next life starts here
    assert load_keyed_states(tmp_path / "edge1") == {"session.dev1": {"step": 3}}
    with open(tmp_path / "edge1" / JOURNAL_FILE, "ab") as f:
        f.write(b"\x01\x02\x03")  # a crash mid-append
    again = Node(cfg, _Quiet())  # type: ignore[arg-type]
    assert again.journal is not None and again.journal.stats()["torn_bytes"] == 3
    again.stop()


def test_a_network_loop_syncs_its_journals_once_before_it_writes_any_socket(tmp_path: Path) -> None:
    """Virtual devices (docs/design.md, "The journal"): nodes sharing one journal publish without a barrier of their
    own; the loop that writes their sockets syncs the journal first, once for every node that wrote."""
    from mqttfl.runtime.netloop import SocketLoop

    journal = Journal(tmp_path / "shared.journal")
    order: list[str] = []

    class Client:
        def __init__(self, name: str) -> None:
            self.name = name

        def on_readable(self) -> None: ...

        def on_writable(self) -> None:
            order.append(f"write {self.name} (syncs so far: {journal.syncs})")

        def tend(self, now: float) -> None: ...

        def wants_write(self) -> bool:
            return False

    loop = SocketLoop()
    loop.add_barrier(journal)
    loop.add_barrier(journal)  # every node of the process adds the one journal: it counts once
    clients = [Client(f"dev{i}") for i in range(3)]
    for c in clients:
        journal.put(f"{c.name}/outbox.00", b"update")
        loop.want_write(c, None, True)
    assert journal.syncs == 0
    loop.poll(0.0)
    assert sorted(order) == [f"write dev{i} (syncs so far: 1)" for i in range(3)]
    loop.poll(0.0)  # nothing to write: no sync
    assert journal.syncs == 1
    loop.close()
    journal.close()


def test_a_reopened_journal_syncs_what_it_replayed_at_its_first_barrier(tmp_path: Path) -> None:
    """After a crash the page cache may hold writes that were never synced; replay accepts them, so the first
    barrier of the next life must sync before anything resumed from them is published."""
    crashed = Journal(tmp_path / "j.log")
    crashed.put("outbox.00", b"update")  # never synced: the process dies here
    again = Journal(tmp_path / "j.log")
    assert again.get("outbox.00") == b"update" and again.dirty
    assert again.sync() and not again.dirty
    assert not Journal(tmp_path / "empty.log").dirty  # nothing replayed: nothing to sync


def test_held_publishes_go_out_before_a_job_holds_the_node(tmp_path: Path) -> None:
    """A message whose effects save state, send, and then run a job (an edge announcing a round, then profiling):
    the sends are not held behind the job."""
    from mqttfl.protocol import stage

    cfg = load_config(None, "edge", environ={}, node="edge1", fleet="f", state_dir=str(tmp_path),
                      mqtt={"host": "127.0.0.1", "port": 1})
    node = Node(cfg, _Quiet())  # type: ignore[arg-type]
    assert node.journal is not None
    node.persist({"step": 1}, key="session.dev1")
    node.emit("round start", "info", {})
    assert node.transport.deferred == 1
    node.run_job(stage.Measure(session=""))
    assert node.transport.deferred == 0 and node.journal.stats()["syncs"] == 1
    node.stop()
