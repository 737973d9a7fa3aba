"""Opening the database: SQLite (WAL) in the state directory by default, PostgreSQL by URL when
several workers share one store. Shared by the store, the queue and the key-value capability.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from .migrations import migrate
from .sqlite_writes import WAIT, WriteTurnConnection, install as serialize_writes


def default_url(state_dir: Path) -> str:
    """`WASMFLOW_DATABASE_URL` if set, else a SQLite file in the state directory."""
    url = os.environ.get("WASMFLOW_DATABASE_URL")
    if url:
        return url
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(state_dir / 'wasmflow.db').resolve()}"


# The size of the write-ahead log (pages of 4 KiB) past which a commit checkpoints it itself, syncing
# the log and the database inside that commit. A serving process checkpoints from a thread of its own
# every 0.2 s (platform/app.py), so this is a backstop. The log only starts over from its beginning when
# no reader is using it, which under steady load is about once a second, and a burst of deliveries
# wrote up to 2,700 pages between two checkpoints: at SQLite's default (1,000) and at 10,000 the event
# loop's commit that crossed the size stalled every acknowledgement for two syncs (1-7 ms each, seen
# with `perf trace`). WAL_KEPT_BYTES: what is kept of a log that grew, once it starts over.
AUTOCHECKPOINT_PAGES = 50_000
WAL_KEPT_BYTES = 64 * 1024 * 1024


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(WAIT * 1000)}")  # the write turn's wait, too
    cursor.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
    cursor.close()


def open_database(url: str) -> sa.Engine:
    """Open (and create or migrate) the database at `url`."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        # Every worker thread, the ingress writer and the kv capability may each hold a connection.
        pool = {} if url in ("sqlite://", "sqlite:///:memory:") else {"pool_size": 20, "max_overflow": 40}
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30,
                                                    "factory": WriteTurnConnection}, **pool)
        sa_event.listen(engine, "connect", _sqlite_pragmas)
        serialize_writes(engine)  # the process's writers take turns (sqlite_writes.py)
    else:
        engine = sa.create_engine(url, pool_size=10, max_overflow=20)
        _ping_when_idle(engine)
    migrate(engine)
    return engine


PING_AFTER_IDLE = 5.0  # seconds a pooled PostgreSQL connection may rest before it is checked at checkout


def _ping_when_idle(engine: sa.Engine) -> None:
    """Check a pooled connection at checkout only when it rested `PING_AFTER_IDLE` seconds or more.

    SQLAlchemy's `pool_pre_ping` pings at every checkout: a round trip before each transaction, the
    most frequent statement a busy worker sent (about two per run of the hello flow). A connection in
    steady use is known alive by its last statement; one that rested may have been cut (a database
    restart, an idle timeout), and a failed ping has the pool connect afresh (`DisconnectionError`).
    """

    @sa_event.listens_for(engine, "checkin")
    def _rested(_dbapi_conn, record) -> None:  # type: ignore[no-untyped-def]
        record.info["checked_in"] = time.monotonic()

    @sa_event.listens_for(engine, "checkout")
    def _check(dbapi_conn, record, _proxy) -> None:  # type: ignore[no-untyped-def]
        since = record.info.get("checked_in")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the driver's error, whichever: this connection is gone
            raise sa.exc.DisconnectionError(f"pooled connection failed its ping: {exc}") from exc
