"""Database access shared by the store, the queue and the key-value capability.

SQLite (WAL) in the state directory by default; PostgreSQL by URL when several workers share one store.
The schema is created by the program: a user never runs SQL by hand.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy import event as sa_event

log = logging.getLogger("wasmflow.db")

metadata = sa.MetaData()

kv_table = sa.Table(
    "kv",
    metadata,
    sa.Column("flow", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


# --- control plane (wasmflow.platform): events in, runs out ------------------------------------------

# Every event the platform accepted or recorded: GitHub deliveries, schedule ticks, HTTP requests.
# `dedupe_key` is unique, so a redelivered webhook or a tick fired by two schedulers is stored once.
events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("source", sa.String(16), nullable=False),  # github | schedule | http | manual
    sa.Column("name", sa.String(128), nullable=False),  # X-GitHub-Event, "schedule", "http"
    sa.Column("action", sa.String(128)),
    sa.Column("repo", sa.String(256)),
    sa.Column("dedupe_key", sa.String(320), unique=True),
    sa.Column("delivery_id", sa.String(128), index=True),
    sa.Column("headers", sa.Text, nullable=False, default="{}"),  # JSON object, lower-case names
    sa.Column("body", sa.LargeBinary, nullable=False, default=b""),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),  # accepted | ignored | skipped
    sa.Column("runs_created", sa.Integer, nullable=False, default=0),
    sa.Column("note", sa.Text),
)

# One row per (event, flow[, replay]): the unit of work the queue hands out. `state` is the queue's view
# (queued, running, done, dead); `status` the outcome of the latest attempt (ok, trap, timeout, ...).
runs_table = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("event_id", sa.String(32), sa.ForeignKey("events.id"), nullable=False, index=True),
    sa.Column("flow", sa.String(128), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False, default=0),  # 0: the original; n: the n-th replay
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("idempotency_key", sa.String(320)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16)),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False, default=1),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("available_at", sa.Float, nullable=False),  # not claimed before (retry backoff)
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("duration_ms", sa.Float),
    sa.Column("lease_owner", sa.String(160)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("lease_expiries", sa.Integer, nullable=False, default=0),
    # Claims so far, counting those released or taken back (an attempt is not counted then): the number
    # the guest sees as its execution, which never repeats for a run, so effects can be keyed on it.
    sa.Column("executions", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("logs", sa.Text),  # JSON [[unix_time, level, message], ...] of the latest attempt
    sa.Column("output", sa.LargeBinary),
    sa.Column("stdout", sa.LargeBinary),
    sa.Column("stderr", sa.LargeBinary),
    sa.Column("error", sa.Text),
    sa.Column("replay_of", sa.String(32)),
    sa.UniqueConstraint("event_id", "flow", "seq", name="uq_runs_event_flow_seq"),
    sa.Index("ix_runs_claim", "state", "available_at"),
    sa.Index("ix_runs_flow_created", "flow", "created_at"),
)

# One row per claim of a run, written in the claim's own transaction: the audit trail that shows
# whether a run was ever executed twice, and the attempt history `wasmflow logs` prints.
attempts_table = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("worker", sa.String(160), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("status", sa.String(16)),
    sa.Column("error", sa.Text),
    sa.Column("duration_ms", sa.Float),
)

# The last tick the scheduler enqueued (or skipped) per schedule trigger, so a restart knows what it missed.
schedule_state_table = sa.Table(
    "schedule_state",
    metadata,
    sa.Column("flow", sa.String(128), primary_key=True),
    sa.Column("trigger", sa.String(256), primary_key=True),  # "cron|timezone"
    sa.Column("last_tick", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

schema_version_table = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.Float, nullable=False),
)

# Versioned migrations: `create_all` creates missing tables; each later change to an existing table is one
# function here, keyed by the version it brings the schema to. A fresh database starts at SCHEMA_VERSION.

def _add_run_executions(conn: sa.Connection) -> None:
    """Version 2: `runs.executions`; a run stored before has been executed at least `attempt` times."""
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN executions INTEGER NOT NULL DEFAULT 0"))
    conn.execute(sa.text("UPDATE runs SET executions = attempt"))


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {2: _add_run_executions}
SCHEMA_VERSION = max([1, *MIGRATIONS])


def default_url(state_dir: Path) -> str:
    """`WASMFLOW_DATABASE_URL` if set, else a SQLite file in the state directory."""
    url = os.environ.get("WASMFLOW_DATABASE_URL")
    if url:
        return url
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(state_dir / 'wasmflow.db').resolve()}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_database(url: str) -> sa.Engine:
    """Open (and create or migrate) the database at `url`."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        # Every worker thread, the ingress writer and the kv capability may each hold a connection.
        pool = {} if url in ("sqlite://", "sqlite:///:memory:") else {"pool_size": 20, "max_overflow": 40}
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        sa_event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    migrate(engine)
    return engine


def is_postgres(engine: sa.Engine) -> bool:
    return engine.dialect.name == "postgresql"


_MIGRATION_LOCK = 0x77666D6967  # pg_advisory_xact_lock key: one process migrates at a time


def migrate(engine: sa.Engine) -> int:
    """Create missing tables and apply pending migrations; returns the schema version.

    Several processes may start at once (workers on PostgreSQL), so the whole step runs under a
    transaction-scoped advisory lock there; on SQLite the write lock taken by DDL serialises it, and a
    concurrent creator losing the race just retries.
    """
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                if is_postgres(engine):
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                metadata.create_all(conn)
                current = conn.execute(sa.select(sa.func.max(schema_version_table.c.version))).scalar()
                if current is None:
                    conn.execute(schema_version_table.insert().values(version=SCHEMA_VERSION, applied_at=time.time()))
                    return SCHEMA_VERSION
                if current > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"the database schema is version {current}, newer than this wasmflow ({SCHEMA_VERSION}); "
                        "upgrade wasmflow")
                for version in sorted(v for v in MIGRATIONS if v > current):
                    log.info("migrating the database schema to version %d", version)
                    MIGRATIONS[version](conn)
                    conn.execute(schema_version_table.insert().values(version=version, applied_at=time.time()))
                return max(current, SCHEMA_VERSION)
        except (sa.exc.OperationalError, sa.exc.IntegrityError):  # lost a creation race: look again
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")
