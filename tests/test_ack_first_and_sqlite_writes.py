"""Two scheduling aids of `wasmflow up` on one machine: runs give way to webhook acknowledgements
(platform/ack_first.py), and the process's SQLite writers take turns through a lock instead of SQLite's
sleeping busy handler (storage/sqlite_writes.py). Real threads, a real SQLite file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy as sa

from wasmflow.platform.ack_first import AckFirst
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
