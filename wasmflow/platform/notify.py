"""Wake-ups across processes on PostgreSQL: LISTEN/NOTIFY on one channel.

Whoever stores runnable runs sends `NOTIFY` in the same transaction (PostgreSQL delivers it at commit,
and only then); every worker process LISTENs on a dedicated connection and claims at once instead of at
its next poll. A notification is only a hint: losing one (a reconnect) costs at most a poll interval, and
a spurious one an empty claim. SQLite has no such channel, and needs none: one process serves it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import sqlalchemy as sa

log = logging.getLogger("wasmflow.notify")

CHANNEL = "wasmflow_runs"
NOTIFY_NEW_RUNS = f"NOTIFY {CHANNEL}"


def notify_new_runs(conn: sa.Connection) -> None:
    """Inside the transaction that stored runnable runs: tell the listening workers (PostgreSQL only)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(NOTIFY_NEW_RUNS))


class Listener:
    """A thread that calls `on_notify` for each notification on CHANNEL until `stop`."""

    def __init__(self, db: sa.Engine, on_notify: Callable[[], None]) -> None:
        self.db = db
        self.on_notify = on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wasmflow-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def _connect(self):  # type: ignore[no-untyped-def]
        import psycopg

        url = self.db.url.set(drivername="postgresql")
        return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self.on_notify()
            except Exception as exc:  # the database restarted, the network blipped: listen again
                log.warning("LISTEN %s failed (%s); polling until it is back", CHANNEL, exc.__class__.__name__)
                self._stop.wait(2.0)
