"""Versioned schema migrations: create what is missing, bring what exists to `SCHEMA_VERSION`.

The schema is created by the program: a user never runs SQL by hand.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import sqlalchemy as sa

from .schema import metadata

log = logging.getLogger("wasmflow.db")

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


def _add_run_concurrency(conn: sa.Connection) -> None:
    """Version 3: the run's concurrency key, its cancel request and the LLM tokens it spent."""
    existing = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    for name, ddl in (("concurrency_key", "VARCHAR(320)"), ("cancel_requested_at", "FLOAT"),
                      ("cancelled_by", "VARCHAR(160)"), ("llm_tokens", "INTEGER NOT NULL DEFAULT 0"),
                      ("budget_key", "VARCHAR(320)"), ("debounce_since", "FLOAT")):
        if name not in existing:  # create_all never adds columns, but a half-applied start may have
            conn.execute(sa.text(f"ALTER TABLE runs ADD COLUMN {name} {ddl}"))
    conn.execute(sa.text(
        "CREATE INDEX IF NOT EXISTS ix_runs_concurrency ON runs (flow, concurrency_key, state)"))


# Version 4: indexes for the console's runs list, newest first under any one filter, cut by keyset
# (created_at, id): each starts with the filtered column and ends with the sort, so a page of 100,000 runs
# reads only its own rows. Defined on the tables in schema.py too, where create_all makes them.
CONSOLE_INDEXES = (
    ("ix_runs_created", "runs", "created_at, id"),
    ("ix_runs_state_created", "runs", "state, created_at, id"),
    ("ix_runs_status_created", "runs", "status, created_at, id"),
    ("ix_runs_trigger_created", "runs", "trigger, created_at, id"),
    ("ix_events_repo_received", "events", "repo, received_at"),
)


def _add_console_indexes(conn: sa.Connection) -> None:
    """Version 4: the console's list indexes (IF NOT EXISTS: a fresh database already has them)."""
    for name, table, columns in CONSOLE_INDEXES:
        conn.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"))


# Version 5: two indexes that duplicated others, dropped. Each stored delivery wrote them for nothing: a
# GitHub event's `dedupe_key` is "github:" + its delivery id (unique, indexed), and the unique
# (event_id, flow, seq) of runs starts with event_id. Their keys are random, so each insert dirtied a
# page of its own: without them storing a delivery took about 30% less of the ingress writer's CPU
# (docs/control-plane.md).
REDUNDANT_INDEXES = ("ix_events_delivery_id", "ix_runs_event_id")


def _drop_redundant_indexes(conn: sa.Connection) -> None:
    """Version 5: the indexes other indexes already serve (IF EXISTS: a fresh database never had them)."""
    for name in REDUNDANT_INDEXES:
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {2: _add_run_executions, 3: _add_run_concurrency,
                                                          4: _add_console_indexes, 5: _drop_redundant_indexes}
SCHEMA_VERSION = max([1, *MIGRATIONS])


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
                if engine.dialect.name == "postgresql":
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
