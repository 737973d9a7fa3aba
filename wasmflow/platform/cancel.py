"""Cancelling runs: the request's outcome, and how the worker holding a running run hears of it.

A cancel is a row update (`runs.cancel_requested_at`, `runs.cancelled_by`): a queued run is finished on
the spot, a running one is marked and stopped by the worker that holds it. That worker learns of the
mark from the store itself, so a canceller in another process or on another machine needs nothing but
the database: on PostgreSQL the canceller's transaction sends `NOTIFY wasmflow_cancel` with the run id
and the worker's listener hears it at commit; on SQLite (one database file, one machine) the worker
reads the marks of the runs it holds every `POLL_SECONDS`. The poll runs on PostgreSQL too, less often,
so a lost notification (a reconnect) delays a cancel by a poll at most.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import sqlalchemy as sa

from wasmflow.platform.loop_failures import log_retry
from wasmflow.storage.driver import DriverStatement, driver_transaction, in_slots, slot_params
from wasmflow.storage.schema import runs_table

log = logging.getLogger("wasmflow.cancel")

CHANNEL = "wasmflow_cancel"
POLL_SECONDS = 0.05  # SQLite: how often a worker reads the cancel marks of the runs it holds
PG_POLL_SECONDS = 1.0  # PostgreSQL: the fallback poll behind LISTEN


@dataclass(frozen=True)
class CancelResult:
    """What `Queue.cancel` did.

    outcome: `cancelled` (it was queued or waiting: finished now, it will never run), `cancelling` (it is
    running: its worker stops the guest at once), `finished` (it had already ended: nothing to do) or
    `not_found`. `state` is the run's queue state after the request.
    """

    run_id: str
    outcome: str
    state: Optional[str] = None
    by: str = ""

    @property
    def accepted(self) -> bool:
        return self.outcome in ("cancelled", "cancelling")


def cancel_reason(by: Optional[str]) -> str:
    return f"cancelled by {by or 'unknown'}"


def notify_cancel(conn: sa.Connection, run_ids: list[str]) -> None:
    """Inside the transaction that marked running runs: wake the workers holding them (PostgreSQL)."""
    if conn.dialect.name != "postgresql":
        return
    for run_id in run_ids:
        conn.execute(sa.text("SELECT pg_notify(:channel, :id)"), {"channel": CHANNEL, "id": run_id})


def cancel_marks(db: sa.Engine, run_ids: list[str]) -> dict[str, str]:
    """run id -> who cancelled it, for those of `run_ids` marked for cancellation.

    On the driver's cursor (`DriverStatement`): on SQLite a worker asks every 50 ms while it holds runs,
    and through SQLAlchemy's execution that poll took more of the interpreter than finishing the runs."""
    if not run_ids:
        return {}
    ids = in_slots(run_ids)
    query = _marks_query(db.dialect, len(ids))
    with driver_transaction(db) as raw:
        cursor = raw.cursor()
        try:
            cursor.execute(query.sql, query.params(ids))
            rows = cursor.fetchall()
        finally:
            cursor.close()
    return {run_id: by or "" for run_id, by in rows}


@functools.lru_cache(maxsize=None)
def _marks_query(dialect: sa.Dialect, n: int) -> DriverStatement:
    r = runs_table
    return DriverStatement(sa.select(r.c.id, r.c.cancelled_by).where(
        r.c.id.in_(slot_params(n)), r.c.cancel_requested_at.is_not(None)), dialect)


class CancelWatcher:
    """A thread that tells `on_cancel(run_id, by)` about cancel marks on the runs `held()` returns.

    It polls the marks (often on SQLite, rarely on PostgreSQL) and, on PostgreSQL, listens on CHANNEL
    for the ids of runs marked just now. `on_cancel` may be called more than once for a run.
    """

    def __init__(self, db: sa.Engine, held: Callable[[], list[str]],
                 on_cancel: Callable[[str, str], None]) -> None:
        self.db = db
        self.held = held
        self.on_cancel = on_cancel
        self.postgres = db.dialect.name == "postgresql"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll_loop, name="wasmflow-cancel", daemon=True)]
        if self.postgres:
            self._threads.append(threading.Thread(target=self._listen_loop, name="wasmflow-cancel-listen",
                                                  daemon=True))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():  # a dispatcher stopped without being started never started them
                thread.join(timeout=3)

    def _poll_loop(self) -> None:
        interval = PG_POLL_SECONDS if self.postgres else POLL_SECONDS
        while not self._stop.wait(interval):
            try:
                ids = self.held()
                for run_id, by in cancel_marks(self.db, ids).items():
                    self.on_cancel(run_id, by)
            except Exception as exc:  # whatever failed, a later poll must still stop cancelled runs
                log_retry(log, exc, "reading cancel requests")
                self._stop.wait(1.0)

    def _listen_loop(self) -> None:
        import psycopg

        url = self.db.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            held = set(self.held())
                            if note.payload in held:
                                by = cancel_marks(self.db, [note.payload]).get(note.payload)
                                if by is not None:
                                    self.on_cancel(note.payload, by)
            except Exception as exc:  # the database restarted, the network blipped: listen again
                log.warning("LISTEN %s failed (%s); polling until it is back", CHANNEL, exc.__class__.__name__)
                self._stop.wait(2.0)
