"""Events and runs in the database: writing what arrived, reading what happened.

Ingress, the scheduler and replays all create work the same way, as one event row and its run rows in one
transaction, so a crash never leaves an acknowledged event without its runs. `BatchWriter` groups the
inserts of concurrent requests into one transaction: the ack waits for a commit, and a commit per batch
instead of per request is what keeps the ack fast on PostgreSQL (one WAL flush for many deliveries).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import queue as queue_mod
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import sqlalchemy as sa

from wasmflow.storage.schema import attempts_table, events_table, runs_table
from wasmflow.platform.notify import NOTIFY_NEW_RUNS, notify_new_runs
from wasmflow.storage.driver import DriverCopy, DriverStatement, driver_transaction, in_slots, slot_params
from wasmflow.storage.sqlite_writes import take_write_turn
from wasmflow.storage.text import storable_text

log = logging.getLogger("wasmflow.store")

# Queue states of a run; `status` (ok, trap, timeout, ...) is the outcome of its latest attempt.
# WAITING: a schedule tick under `overlap: queue` held back until the flow's previous run is over.
QUEUED, RUNNING, DONE, DEAD, WAITING = "queued", "running", "done", "dead", "waiting"


_ids = random.Random(os.urandom(32))


def new_id() -> str:
    """16 hex digits, random: a run's id, which people name by a short prefix (`wasmflow logs 3fa9c1`,
    `cancel`, `replay`, the console), so its first digits must tell runs apart. Not uuid4: it reads the
    kernel's random source on every call, a system call that costs as much as the rest of an
    acknowledgement in a sandbox; one seed per process is enough for ids that only need to be unique (a
    collision is an IntegrityError, never a silent merge)."""
    return f"{_ids.getrandbits(64):016x}"


def new_event_id() -> str:
    """24 hex digits: the time in milliseconds (11), then 52 random bits (13), as UUIDv7 orders them.

    An event is never named by a prefix, so its id can put the time first: a batch's new events then
    land at the end of the events' primary key, and their runs at the end of `(event_id, flow, seq)`, a
    few pages for the whole batch, where random ids put each row on a page of its own in both (on
    SQLite every page a commit dirtied is written to the log; docs/control-plane.md). 52 random bits a
    millisecond keep the ids of processes sharing a database apart."""
    return f"{time.time_ns() // 1_000_000 << 52 | _ids.getrandbits(52):024x}"


@dataclass
class NewRun:
    flow: str
    trigger: str
    max_attempts: int = 1
    idempotency_key: Optional[str] = None
    id: str = field(default_factory=new_id)
    state: str = QUEUED
    lease_owner: Optional[str] = None  # set with state RUNNING for runs executed in place (HTTP)
    lease_expires_at: Optional[float] = None
    seq: int = 0
    replay_of: Optional[str] = None


@dataclass
class NewEvent:
    source: str
    name: str
    headers: dict[str, str]
    body: bytes
    status: str  # accepted | ignored | skipped
    runs: list[NewRun] = field(default_factory=list)
    action: Optional[str] = None
    repo: Optional[str] = None
    dedupe_key: Optional[str] = None
    delivery_id: Optional[str] = None
    note: Optional[str] = None
    id: str = field(default_factory=new_event_id)
    received_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Recorded:
    """What happened to a NewEvent: stored (with its runs) or a duplicate of `event_id`."""

    event_id: str
    duplicate: bool
    run_ids: tuple[str, ...] = ()


def insert_ignore(conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row went in. Both dialects have it natively."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    # RETURNING rather than rowcount: psycopg reports -1 for some INSERT forms.
    key = list(table.primary_key.columns)[0]
    return conn.execute(insert(table).values(**values).on_conflict_do_nothing().returning(key)).first() is not None


def run_row(run: NewRun, event_id: str, now: float) -> dict[str, Any]:
    return dict(
        id=run.id, event_id=event_id, flow=run.flow, seq=run.seq, trigger=run.trigger,
        idempotency_key=run.idempotency_key, state=run.state, attempt=1 if run.state == RUNNING else 0,
        executions=1 if run.state == RUNNING else 0, max_attempts=run.max_attempts, created_at=now, available_at=now,
        started_at=now if run.state == RUNNING else None, lease_owner=run.lease_owner,
        lease_expires_at=run.lease_expires_at, lease_expiries=0, replay_of=run.replay_of,
    )


_ACTION_CHARS = events_table.c.action.type.length
_REPO_CHARS = events_table.c.repo.type.length


def event_row(event: NewEvent) -> dict[str, Any]:
    """The events row of `event`. The action, repository and note come from the sender's payload: stored
    as a text column can hold them on both databases (`storable_text`)."""
    return dict(
        id=event.id, source=event.source, name=event.name, action=storable_text(event.action, _ACTION_CHARS),
        repo=storable_text(event.repo, _REPO_CHARS), dedupe_key=event.dedupe_key, delivery_id=event.delivery_id,
        headers=json.dumps(event.headers), body=event.body, received_at=event.received_at, status=event.status,
        runs_created=len(event.runs), note=storable_text(event.note),
    )


def _claimed_rows(events: list[NewEvent], now: float) -> list[dict[str, Any]]:
    """The attempts of runs stored already running (HTTP runs, executed in place)."""
    return [dict(run_id=r.id, attempt=1, worker=r.lease_owner, claimed_at=now)
            for e in events for r in e.runs if r.state == RUNNING and r.lease_owner]


def _insert_runs(conn: sa.Connection, events: list[NewEvent]) -> None:
    now = time.time()
    rows = [run_row(r, e.id, now) for e in events for r in e.runs]
    if rows:
        conn.execute(runs_table.insert(), rows)
    claimed = _claimed_rows(events, now)
    if claimed:
        conn.execute(attempts_table.insert(), claimed)


@functools.lru_cache(maxsize=None)
def _insert(dialect: sa.Dialect, table: sa.Table, columns: tuple[str, ...],
            stream: bool) -> "DriverStatement | DriverCopy":
    """The batch insert of `columns` into `table`, the columns left out given their scalar defaults as
    SQLAlchemy would fill them in: a COPY when `stream` and on PostgreSQL, else an INSERT run per row."""
    defaults = {c.key: c.default.arg for c in table.columns
                if c.key not in columns and c.default is not None and c.default.is_scalar}
    if stream and dialect.name == "postgresql":
        return DriverCopy(table, dialect, columns, defaults)
    return DriverStatement(table.insert(), dialect, defaults, column_keys=list(columns))


@functools.lru_cache(maxsize=None)
def _stored_keys(dialect: sa.Dialect, n: int) -> DriverStatement:
    """The SELECT of the stored events among `n` dedupe keys (`n` a power of two: see `in_slots`)."""
    e = events_table
    return DriverStatement(
        sa.select(e.c.dedupe_key, e.c.id).where(e.c.dedupe_key.in_(slot_params(n))),
        dialect, unprepared=True)


def insert_many(cursor: Any, dialect: sa.Dialect, table: sa.Table, rows: list[dict[str, Any]],
                stream: bool = False) -> None:
    """INSERT `rows` (dicts with the same keys) on a driver cursor, with a statement compiled once.
    `stream`: on PostgreSQL as one COPY, for the ingress batches (less CPU a row on both sides, one round
    trip more: `DriverCopy`); a claim's few attempts go in as INSERTs."""
    if rows:
        _insert(dialect, table, tuple(rows[0]), stream).execute_many(cursor, rows)


def record_events(db: sa.Engine, events: list[NewEvent], wait: Optional[float] = None) -> list[Recorded]:
    """Store many events and their runs in one transaction of their own (the ingress fast path), and
    tell listening workers when runs were stored; on the driver's connection (`DriverStatement`).
    `wait`: on SQLite, how long the write may wait for a lock (WriteTurnBusy or "database is locked"
    past it; see `take_write_turn`); None: the connection's busy timeout.

    Duplicates (a dedupe key already stored, or twice in the batch) are found with one SELECT first. A
    concurrent writer can still insert the same key between that SELECT and the INSERT (several ingress
    processes on PostgreSQL); the INSERT then fails, and the caller retries event by event with
    `record_event`, which resolves each conflict on its own.

    On PostgreSQL that SELECT is planned at each execution, never prepared (`unprepared=True`): psycopg
    prepares a statement after its fifth execution on a connection, and the server then keeps a generic
    plan made while the events table was small, a sequential scan that compares every stored event with
    every key of the batch. It went on scanning until an ANALYZE (a minute or more later): in a burst of 3,000
    deliveries into a new database it cost the server about 50 us a delivery, growing with the table.
    Planning one SELECT a batch costs less than that.
    """
    dialect = db.dialect
    with driver_transaction(db) as raw:
        cursor = raw.cursor()
        keys = [e.dedupe_key for e in events if e.dedupe_key]
        existing: dict[str, str] = {}
        if keys:
            params = in_slots(keys)
            select = _stored_keys(dialect, len(params))
            select.execute(cursor, params)  # planned for the table as it is now: see the docstring
            existing = dict(cursor.fetchall())
        fresh: list[NewEvent] = []
        results: list[Recorded] = []
        for event in events:
            key = event.dedupe_key
            if key and key in existing:
                results.append(Recorded(event_id=existing[key], duplicate=True))
                continue
            if key:
                existing[key] = event.id
            fresh.append(event)
            results.append(Recorded(event_id=event.id, duplicate=False, run_ids=tuple(r.id for r in event.runs)))
        if fresh:
            take_write_turn(raw, wait)
            now = time.time()
            insert_many(cursor, dialect, events_table, [event_row(e) for e in fresh], stream=True)
            insert_many(cursor, dialect, runs_table, [run_row(r, e.id, now) for e in fresh for r in e.runs],
                        stream=True)
            insert_many(cursor, dialect, attempts_table, _claimed_rows(fresh, now))
            if any(e.runs for e in fresh) and dialect.name == "postgresql":
                cursor.execute(NOTIFY_NEW_RUNS)
        cursor.close()
    return results


def record_event(conn: sa.Connection, event: NewEvent) -> Recorded:
    """Store an event and its runs in the caller's transaction, unless its dedupe key is already there."""
    inserted = insert_ignore(conn, events_table, event_row(event))
    if not inserted:
        existing = conn.execute(
            sa.select(events_table.c.id).where(events_table.c.dedupe_key == event.dedupe_key)
        ).scalar()
        return Recorded(event_id=existing or event.id, duplicate=True)
    _insert_runs(conn, [event])
    return Recorded(event_id=event.id, duplicate=False, run_ids=tuple(r.id for r in event.runs))


class _Waiter:
    """Where a stored event's outcome goes: a thread's Future, or an asyncio Future on its loop."""

    __slots__ = ("future", "loop")

    def __init__(self, future: Any, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.future = future
        self.loop = loop


def _settle(settled: list[tuple[Any, Any, bool]]) -> None:
    for future, value, failed in settled:
        if not future.done():
            if failed:
                future.set_exception(value)
            else:
                future.set_result(value)


# How long the event loop may wait for the write turn before it hands a batch to the writer thread. The
# other writers' transactions (a claim, a result, a kv call, the thread's own batch) take about a
# millisecond; with no wait at all, half the batches of a burst went to the thread (which then held the
# turn for the next one), and the handovers the inline write saves came back.
INLINE_WAIT = 0.005


class BatchWriter:
    """Group commit for events: callers submit, one thread writes whatever is waiting in one transaction.

    `submit` returns a Future that resolves once the event is committed (or fails with the database's
    exception), so an acknowledgement never precedes durability. `submit_async` does the same for a
    coroutine, and the whole batch's asyncio futures are settled with one call into their loop (one wake-up
    of the loop per batch, not one per event). `on_commit` is called after each batch that created runs
    (the in-process dispatcher's wake-up).

    `inline` (SQLite): what the event loop's handlers submit in one pass of the loop is written by the
    loop itself, right after that pass, when no other writer has the turn; otherwise, and on any error,
    the batch goes to the thread as usual. Why: the thread and the loop handed the interpreter to each
    other twice a batch, and each handover made the loop wait for it; storing a batch of deliveries on
    SQLite takes a few milliseconds the senders wait for anyway. A write on the loop waits at most
    `INLINE_WAIT` for a lock (`record_events(wait=...)`), so another writer, or another process holding
    the file, cannot stall the loop for longer (docs/control-plane.md has the measurements).
    PostgreSQL keeps the thread: there a write is network round trips, time the loop can serve others in.
    """

    def __init__(self, db: sa.Engine, max_batch: int = 256, on_commit: Optional[Any] = None,
                 inline: bool = False) -> None:
        self.db = db
        self.max_batch = max_batch
        self.on_commit = on_commit
        self.inline = inline
        self._pending: list[tuple[NewEvent, _Waiter]] = []  # submitted on the loop, to write after its pass
        self._queue: queue_mod.Queue[Optional[tuple[NewEvent, _Waiter]]] = queue_mod.Queue()
        self._thread = threading.Thread(target=self._loop, name="wasmflow-writer", daemon=True)
        self._thread.start()

    def submit(self, event: NewEvent) -> "Future[Recorded]":
        future: Future[Recorded] = Future()
        self._queue.put((event, _Waiter(future)))
        return future

    def submit_async(self, event: NewEvent) -> "asyncio.Future[Recorded]":
        """From a coroutine: an awaitable that resolves once the event is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Recorded] = loop.create_future()
        item = (event, _Waiter(future, loop))
        if not self.inline:
            self._queue.put(item)
        else:
            if not self._pending:  # after the handlers that are ready now have submitted theirs
                loop.call_soon(self._write_pending)
            self._pending.append(item)
        return future

    def _write_pending(self) -> None:
        """On the event loop: store what its handlers submitted, unless a lock makes it wait past INLINE_WAIT."""
        batch, self._pending = self._pending, []
        for start in range(0, len(batch), self.max_batch):
            part = batch[start:start + self.max_batch]
            try:
                results = record_events(self.db, [event for event, _ in part], wait=INLINE_WAIT)
            except Exception as exc:  # the turn is taken, the file locked, a duplicate raced in: the
                log.debug("the writer thread takes a batch of %d: %s", len(part), exc)  # thread decides
                for item in part:
                    self._queue.put(item)
                continue
            _settle([(waiter.future, result, False) for (_, waiter), result in zip(part, results)])
            self._committed(results)

    def close(self) -> None:
        for item in self._pending:  # submitted, and the loop stopped before writing them
            self._queue.put(item)
        self._pending = []
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue_mod.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._write(batch)
            if stop:
                return

    def _write(self, batch: list[tuple[NewEvent, _Waiter]], one_by_one: bool = False) -> None:
        try:
            if one_by_one:
                with self.db.begin() as conn:
                    results = [record_event(conn, event) for event, _ in batch]
                    if any(r.run_ids for r in results):
                        notify_new_runs(conn)
            else:
                results = record_events(self.db, [event for event, _ in batch])
        except Exception as exc:  # a conflict or one bad event must not fail the batch: retry one by one
            if not one_by_one:
                for item in batch:
                    self._write([item], one_by_one=True)
                return
            log.exception("storing event %s failed", batch[0][0].id)
            self._deliver([(batch[0][1], exc, True)])
            return
        self._deliver([(waiter, result, False) for (_, waiter), result in zip(batch, results)])
        self._committed(results)

    def _committed(self, results: list[Recorded]) -> None:
        if self.on_commit and any(r.run_ids for r in results):
            try:
                self.on_commit()
            except Exception:
                log.exception("on_commit hook failed")

    @staticmethod
    def _deliver(outcomes: list[tuple[_Waiter, Any, bool]]) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, bool]]] = {}
        for waiter, value, failed in outcomes:
            if waiter.loop is None:
                _settle([(waiter.future, value, failed)])
            else:
                per_loop.setdefault(waiter.loop, []).append((waiter.future, value, failed))
        for loop, settled in per_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
                pass


# --- reading -----------------------------------------------------------------------------------------


def list_runs(db: sa.Engine, flow: Optional[str] = None, state: Optional[str] = None,
              limit: int = 50) -> list[sa.Row]:
    """Newest first. `state` may be a queue state (queued, running, done, dead) or an outcome (ok, trap...)."""
    r, e = runs_table, events_table
    query = (
        sa.select(r.c.id, r.c.flow, r.c.state, r.c.status, r.c.attempt, r.c.trigger, r.c.created_at,
                  r.c.finished_at, r.c.duration_ms, r.c.error, r.c.seq, e.c.name.label("event_name"),
                  e.c.action, e.c.repo, e.c.delivery_id)
        .join(e, e.c.id == r.c.event_id)
        .order_by(r.c.created_at.desc(), r.c.id)
        .limit(limit)
    )
    if flow:
        query = query.where(r.c.flow == flow)
    if state:
        query = query.where(sa.or_(r.c.state == state, r.c.status == state))
    with db.connect() as conn:
        return list(conn.execute(query).all())


def get_run(db: sa.Engine, run_id: str) -> Optional[sa.Row]:
    """A run by id, or by a unique prefix of at least 6 characters (what people type for the
    whole id; one matching several runs names none)."""
    with db.connect() as conn:
        row = conn.execute(sa.select(runs_table).where(runs_table.c.id == run_id)).first()
        if row is None and len(run_id) >= 6:
            rows = conn.execute(
                sa.select(runs_table).where(runs_table.c.id.like(run_id + "%")).limit(2)
            ).all()
            row = rows[0] if len(rows) == 1 else None
        return row


def get_attempts(db: sa.Engine, run_id: str) -> list[sa.Row]:
    with db.connect() as conn:
        return list(conn.execute(
            sa.select(attempts_table).where(attempts_table.c.run_id == run_id).order_by(attempts_table.c.id)
        ).all())


def get_event(db: sa.Engine, event_id: str) -> Optional[sa.Row]:
    with db.connect() as conn:
        return conn.execute(sa.select(events_table).where(events_table.c.id == event_id)).first()


def github_dedupe_key(delivery_id: str) -> str:
    """The dedupe key of a GitHub delivery: a redelivery is stored once, and the key finds the event
    by its delivery id (the unique index on dedupe_key serves both)."""
    return f"github:{delivery_id}"


def find_event_by_delivery(db: sa.Engine, delivery_id: str) -> Optional[sa.Row]:
    with db.connect() as conn:
        return conn.execute(
            sa.select(events_table).where(events_table.c.dedupe_key == github_dedupe_key(delivery_id))).first()


def list_events(db: sa.Engine, source: Optional[str] = None, limit: int = 50) -> list[sa.Row]:
    e = events_table
    query = (
        sa.select(e.c.id, e.c.source, e.c.name, e.c.action, e.c.repo, e.c.delivery_id, e.c.received_at,
                  e.c.status, e.c.runs_created, e.c.note)
        .order_by(e.c.received_at.desc()).limit(limit)
    )
    if source:
        query = query.where(e.c.source == source)
    with db.connect() as conn:
        return list(conn.execute(query).all())


def queue_depth(db: sa.Engine) -> dict[str, int]:
    """Runs queued, waiting, running and dead (for /metrics). Done runs are left out: they only grow, and
    counting them would make every scrape slower."""
    with db.connect() as conn:
        rows = conn.execute(
            sa.select(runs_table.c.state, sa.func.count())
            .where(runs_table.c.state.in_([QUEUED, RUNNING, DEAD, WAITING])).group_by(runs_table.c.state)
        ).all()
    counts = {QUEUED: 0, RUNNING: 0, DEAD: 0, WAITING: 0}
    counts.update({state: n for state, n in rows})
    return counts


def runs_for_event(db: sa.Engine, event_id: str) -> list[sa.Row]:
    with db.connect() as conn:
        return list(conn.execute(
            sa.select(runs_table).where(runs_table.c.event_id == event_id).order_by(runs_table.c.flow, runs_table.c.seq)
        ).all())


def decode_logs(text: Optional[str]) -> list[tuple[float, str, str]]:
    if not text:
        return []
    return [tuple(item) for item in json.loads(text)]  # type: ignore[misc]


def encode_logs(logs: Sequence[tuple[float, str, str]]) -> str:
    return json.dumps([list(item) for item in logs])
