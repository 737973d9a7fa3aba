"""One writer at a time per SQLite file in this process, handed over by a Python lock.

Why: SQLite lets one connection write at a time, and a connection that finds the file locked sleeps in
its busy handler (1, 2, 5, 10 ms and more) before it looks again. In `wasmflow up` on SQLite the
ingress writer, the claimer, the finisher, the transcript writer and each running guest's kv calls all
write: under a burst of webhooks much of an acknowledgement's time went to those sleeps while the
process had CPU to spare (py-spy: the GIL held 45% of the time). A lock in the process gives the write
turn to the next writer as soon as the last one has committed. Other processes (a CLI command, a
second `up`) still meet SQLite's own locking and busy timeout.

A connection takes the lock before its transaction's first statement that may write (anything but
SELECT, PRAGMA and EXPLAIN) and gives it back once the transaction has ended (commit, rollback, close).
Waiting for it is bounded by the busy timeout; past that the statement goes on and SQLite's own locking
decides, as without this module, so a mistake here can slow a write but never hang one.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

WAIT = 10.0  # seconds, as the connections' busy_timeout
_READS = ("SELECT", "PRAGMA", "EXPLAIN")

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def lock_for(database: str) -> threading.Lock:
    """The process's write lock of one SQLite file (one per file, whichever engine opened it)."""
    key = database if database in ("", ":memory:") or database.startswith("file:") else str(Path(database).resolve())
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


class WriteTurnBusy(Exception):
    """`take_write_turn(wait=...)` found the turn taken for longer than the caller may wait."""


class WriteTurnConnection(sqlite3.Connection):
    """A sqlite3 connection that holds its file's write lock from its first write to the end of the
    transaction (`sqlite3.connect(..., factory=WriteTurnConnection)`)."""

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self._write_lock = lock_for(str(database))
        self._holding = False
        self._short_wait = False  # the busy timeout is a `take_write_turn(wait)`'s until the transaction ends

    def take_write_turn(self, wait: "float | None" = None) -> None:
        """Wait (at most WAIT) for the write turn; a no-op while this connection holds it.

        With `wait`, for a caller that must not block (the event loop): WriteTurnBusy unless the turn
        comes within `wait` seconds, and until the transaction ends SQLite's busy timeout is `wait` too,
        so a lock another process holds fails the statement ("database is locked") instead of sleeping.
        """
        if self._holding:
            return
        if wait is None:
            self._holding = self._write_lock.acquire(timeout=WAIT)
            return
        if not self._write_lock.acquire(timeout=wait):  # 0: a try, no wait
            raise WriteTurnBusy("another writer of this process has the write turn")
        self._holding = True
        self.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
        self._short_wait = True

    def _give_back(self, closed: bool = False) -> None:
        try:
            if self._short_wait:
                self._short_wait = False
                if not closed:
                    self.execute(f"PRAGMA busy_timeout={int(WAIT * 1000)}")
        finally:
            if self._holding:
                self._holding = False
                self._write_lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._give_back()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._give_back()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._give_back(closed=True)


def install(engine: sa.Engine) -> None:
    """Take the write turn before each statement of `engine` that may write (its connections must be
    `WriteTurnConnection`s: `connect_args={"factory": WriteTurnConnection}`)."""

    def before_execute(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.lstrip()[:7].upper().startswith(_READS):
            dbapi = conn.connection.dbapi_connection
            if isinstance(dbapi, WriteTurnConnection):
                dbapi.take_write_turn()

    event.listen(engine, "before_cursor_execute", before_execute)


def take_write_turn(raw: Any, wait: "float | None" = None) -> None:
    """For a hot path on a pooled DBAPI connection (`engine.raw_connection()`, kv): take the turn
    before writing; commit or rollback gives it back. `wait`: see `WriteTurnConnection.take_write_turn`."""
    dbapi = getattr(raw, "dbapi_connection", raw)
    if isinstance(dbapi, WriteTurnConnection):
        dbapi.take_write_turn(wait)
