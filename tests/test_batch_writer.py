"""The ingress's group commit on real SQLite (platform/store.py `BatchWriter`, storage/sqlite_writes.py):
written on the event loop when nothing holds a lock, handed to the writer thread when something does,
and never a stall of the loop meanwhile."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from wasmflow.platform import store
from wasmflow.platform.store import BatchWriter, NewEvent, NewRun, record_events
from wasmflow.storage import open_database
from wasmflow.storage.engine import AUTOCHECKPOINT_PAGES
from wasmflow.storage.sqlite_writes import WAIT, WriteTurnBusy, lock_for

from platform_support import scalar


def delivery(n: int) -> NewEvent:
    return NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                    dedupe_key=f"github:d{n}", delivery_id=f"d{n}", runs=[NewRun(flow="f", trigger="github")])


@pytest.fixture
def sqlite_db(tmp_path: Path):
    engine = open_database(f"sqlite:///{tmp_path / 'w.db'}")
    yield engine
    engine.dispose()


async def submit_and_watch(writer: BatchWriter, events: list[NewEvent], hold: float) -> tuple[list, float]:
    """Submit from the loop; the lock holder lets go after `hold` seconds. Returns the outcomes and the
    longest store call the loop itself made (`record_events` on the loop's thread): how long this
    design may hold the loop for a lock. (The loop's every pause is not measured: on an overloaded
    machine the interpreter lock can hold it up while the writer thread works, whoever writes.)"""
    spent: list[float] = []
    loop_thread = threading.current_thread()

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        try:
            return record_events(*args, **kwargs)
        finally:
            if threading.current_thread() is loop_thread:
                spent.append(time.monotonic() - started)

    store.record_events = timed  # type: ignore[assignment]
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*(writer.submit_async(e) for e in events)), hold + 10)
    finally:
        store.record_events = record_events  # type: ignore[assignment]
    return outcomes, max(spent, default=0.0)


def test_the_loop_writes_a_batch_itself_and_the_connection_keeps_its_busy_timeout(sqlite_db):
    commits = []
    writer = BatchWriter(sqlite_db, inline=True, on_commit=lambda: commits.append(threading.current_thread()))
    try:
        outcomes, _ = asyncio.run(submit_and_watch(writer, [delivery(i) for i in range(20)], 0))
    finally:
        writer.close()
    assert [o.duplicate for o in outcomes] == [False] * 20
    assert scalar(sqlite_db, "SELECT count(*) FROM runs") == 20
    assert commits == [threading.main_thread()]  # one batch, committed by the loop's own thread
    with sqlite_db.connect() as conn:  # every pooled connection is back to the usual busy timeout
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == int(WAIT * 1000)
        # and leaves checkpoints to the serving process's checkpoint thread, not to a commit of the loop
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == AUTOCHECKPOINT_PAGES > 1000


def test_while_another_writer_of_the_process_has_the_turn_the_thread_waits_not_the_loop(sqlite_db):
    writer = BatchWriter(sqlite_db, inline=True)
    turn = lock_for(sqlite_db.url.database)
    turn.acquire()
    threading.Timer(0.5, turn.release).start()
    try:
        started = time.monotonic()
        outcomes, longest_write = asyncio.run(submit_and_watch(writer, [delivery(i) for i in range(5)], 0.5))
    finally:
        writer.close()
    assert time.monotonic() - started >= 0.45  # stored only once the turn was free
    assert 0 < longest_write < 0.1  # the loop tried, and handed them over instead of waiting
    assert [o.duplicate for o in outcomes] == [False] * 5
    assert scalar(sqlite_db, "SELECT count(*) FROM events") == 5


def test_while_another_process_holds_the_file_the_loop_does_not_sleep_in_sqlites_busy_handler(sqlite_db):
    other = sqlite3.connect(sqlite_db.url.database, isolation_level=None, check_same_thread=False)  # no turn lock
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO kv (flow, key, value, updated_at) VALUES ('x', 'y', x'00', 0)")
    threading.Timer(0.5, other.execute, ("COMMIT",)).start()
    writer = BatchWriter(sqlite_db, inline=True)
    try:
        outcomes, longest_write = asyncio.run(submit_and_watch(writer, [delivery(i) for i in range(5)], 0.5))
    finally:
        writer.close()
        other.close()
    assert 0 < longest_write < 0.1
    assert [o.duplicate for o in outcomes] == [False] * 5
    assert scalar(sqlite_db, "SELECT count(*) FROM events") == 5
    with sqlite_db.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == int(WAIT * 1000)


def test_a_write_that_may_not_wait_says_so_and_leaves_nothing_half_done(sqlite_db):
    turn = lock_for(sqlite_db.url.database)
    with turn:
        with pytest.raises(WriteTurnBusy):
            record_events(sqlite_db, [delivery(1)], wait=0)
    assert scalar(sqlite_db, "SELECT count(*) FROM events") == 0
    (stored,) = record_events(sqlite_db, [delivery(1)], wait=0)  # free now: stored, on the same pool
    assert not stored.duplicate and scalar(sqlite_db, "SELECT count(*) FROM runs") == 1


def test_duplicates_in_an_inline_batch_are_found_as_in_the_thread(sqlite_db):
    writer = BatchWriter(sqlite_db, inline=True)
    try:
        first, _ = asyncio.run(submit_and_watch(writer, [delivery(1), delivery(2)], 0))
        again, _ = asyncio.run(submit_and_watch(writer, [delivery(2), delivery(3), delivery(3)], 0))
    finally:
        writer.close()
    assert [o.duplicate for o in first] == [False, False]
    assert [o.duplicate for o in again] == [True, False, True]
    assert again[0].event_id == first[1].event_id and again[2].event_id == again[1].event_id
    with sqlite_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar() == 3
