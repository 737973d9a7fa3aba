"""Two scheduling aids of `wasmflow up` on one machine: runs give way to webhook acknowledgements
(platform/ack_first.py), and the process's SQLite writers take turns through a lock instead of SQLite's
sleeping busy handler (storage/sqlite_writes.py). Real threads, a real SQLite file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy as sa

from wasmflow.platform.ack_first import STALE, ActivityFile, AckFirst
from wasmflow.host_functions.kv import KeyValueStore
from wasmflow.storage import open_database
from wasmflow.storage.sqlite_writes import lock_for


def test_claims_wait_while_a_delivery_is_answered_and_never_longer_than_the_bound() -> None:
    acks = AckFirst(quiet=0.01, longest=0.2)
    stopping = threading.Event()
    t0 = time.monotonic()
    acks.wait(stopping)
    assert time.monotonic() - t0 < 0.05  # idle: no wait at all
    acks.arrived()  # a delivery that is never answered (a stuck handler): the bound holds
    t0 = time.monotonic()
    acks.wait(stopping)
    assert 0.18 <= time.monotonic() - t0 < 1.0
    acks.answered()
    time.sleep(0.02)
    assert not acks.busy()
    acks.arrived()
    threading.Timer(0.05, acks.answered).start()  # answered after 50 ms: the wait ends soon after
    t0 = time.monotonic()
    acks.wait(stopping)
    assert 0.04 <= time.monotonic() - t0 < 0.15
    acks.arrived()
    stopping.set()  # shutting down: no waiting
    t0 = time.monotonic()
    acks.wait(stopping)
    assert time.monotonic() - t0 < 0.05


def _waited(acks: AckFirst) -> float:
    t0 = time.monotonic()
    acks.wait(threading.Event())
    return time.monotonic() - t0


def test_a_process_without_ingress_gives_way_to_the_ingress_of_its_machine(tmp_path: Path) -> None:
    """`wasmflow worker` beside `up --workers 0`: the two share the state directory's activity file."""
    path = tmp_path / "ingress-activity"
    worker = AckFirst(quiet=0.01, longest=0.2, neighbour=ActivityFile(path))
    assert _waited(worker) < 0.05  # no ingress on this machine (no file): no waiting
    ingress = AckFirst(quiet=0.01, longest=0.2, neighbour=ActivityFile(path))
    ingress.serve_ingress()
    worker.neighbour._next_look = 0.0  # (it looks for a missing file once a second)
    assert _waited(worker) < 0.05  # an ingress with nothing to do
    ingress.arrived()  # a delivery in progress there
    assert 0.18 <= _waited(worker) < 1.0  # waits, never longer than the bound
    assert _waited(ingress) >= 0.18  # (the ingress's own claims wait on its own count, as before)
    threading.Timer(0.05, ingress.answered).start()
    waited = _waited(worker)
    assert 0.05 <= waited < 0.15  # answered after 50 ms: the worker goes on `quiet` later
    time.sleep(0.02)
    assert _waited(worker) < 0.05


def test_a_neighbour_stuck_or_from_before_a_reboot_holds_nobody_back(tmp_path: Path) -> None:
    path = tmp_path / "ingress-activity"
    ingress = AckFirst(quiet=0.01, neighbour=ActivityFile(path))
    ingress.serve_ingress()
    worker = AckFirst(quiet=0.01, longest=0.2, neighbour=ActivityFile(path))
    ingress.neighbour.publish(time.monotonic() - STALE - 0.1, 3)  # answering, but unchanged for too long
    assert _waited(worker) < 0.05
    ingress.neighbour.publish(time.monotonic() + 3600.0, 0)  # a time this boot's clock has not reached
    assert _waited(worker) < 0.05
    ingress.neighbour.publish(time.monotonic(), 0)  # a delivery answered just now: busy for `quiet`
    assert 0.005 <= _waited(worker) < 0.1
    path.write_bytes(b"\0")  # a file cut short: no neighbour, and no fault in a reader that has it open
    assert _waited(worker) < 0.05
    assert _waited(AckFirst(quiet=0.01, neighbour=ActivityFile(path))) < 0.05
    ingress.close()
    worker.close()


def test_an_unwritable_state_directory_only_costs_the_hint(tmp_path: Path, caplog) -> None:
    ingress = AckFirst(neighbour=ActivityFile(tmp_path / "missing-directory" / "ingress-activity"))
    ingress.serve_ingress()  # logged, not raised: `up` starts all the same
    ingress.arrived()
    ingress.answered()
    assert "will not give way" in caplog.text


def test_writers_of_one_process_take_turns_and_readers_do_not_wait(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    first, second = open_database(f"sqlite:///{path}"), open_database(f"sqlite:///{path}")  # one file: one turn
    turn = lock_for(str(path))
    with first.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
    assert not turn.locked()  # given back at commit
    held, go_on = threading.Event(), threading.Event()
    order: list[str] = []

    def long_writer() -> None:
        with first.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'a')"))
            held.set()
            go_on.wait(5)
            order.append("first commits")

    thread = threading.Thread(target=long_writer)
    thread.start()
    assert held.wait(5)
    assert turn.locked()  # from the first write to the end of the transaction
    with second.connect() as conn:  # a reader neither takes the turn nor waits for it
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 0
    writer = threading.Thread(target=lambda: _write(second, 2, order))
    writer.start()
    time.sleep(0.1)
    assert order == []  # the second writer waits for its turn
    go_on.set()
    thread.join(5)
    writer.join(5)
    assert order == ["first commits", "second writes"]
    assert not turn.locked()
    try:  # a failed transaction gives the turn back too
        with second.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (3, 'c')"))
            conn.execute(sa.text("INSERT INTO t VALUES (3, 'duplicate')"))
    except sa.exc.IntegrityError:
        pass
    assert not turn.locked()
    kv = KeyValueStore(second)  # the kv hot path writes on a raw connection: it takes and gives back too
    assert kv.increment("flow", "n", 5) == 5
    assert not turn.locked()
    with second.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 2
    first.dispose()
    second.dispose()


def _write(db: sa.Engine, key: int, order: list[str]) -> None:
    with db.begin() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (:k, 'b')"), {"k": key})
        order.append("second writes")
