"""The driver's own cursor, for the hot paths: statements compiled once by SQLAlchemy, run without its
per-execution work. Used by the ingress writer, the queue's claims, results and cancel polls, the
transcripts and kv's increment.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterator, Optional

import sqlalchemy as sa


# What makes a PostgreSQL transaction's commit not wait for the WAL flush (see `driver_transaction`).
RELAXED_COMMIT = "SET LOCAL synchronous_commit = off"


@contextlib.contextmanager
def driver_transaction(db: sa.Engine, relaxed: bool = False) -> Iterator[Any]:
    """A transaction on a pooled connection's own DBAPI connection, for hot paths that skip SQLAlchemy's
    per-execution work: committed at the end, rolled back on any exception, given back to the pool.

    `relaxed` (PostgreSQL): the commit does not wait for the WAL flush (`RELAXED_COMMIT`), for writes
    an at-least-once queue may lose to a crash of the database server (claims' and results', never
    events'). The setting goes out with the BEGIN, in one round trip (`_relaxed_transaction`)."""
    if relaxed and db.dialect.name == "postgresql":
        with _relaxed_transaction(db) as raw:
            yield raw
        return
    raw = db.raw_connection()
    try:
        with driver_errors(db):
            try:
                yield raw
                raw.commit()
            except BaseException:
                try:
                    raw.rollback()
                except Exception:  # the connection is gone: the error to report is the first one
                    raw.invalidate()
                raise
    finally:
        raw.close()


@contextlib.contextmanager
def driver_errors(db: sa.Engine) -> Iterator[None]:
    """The driver's exceptions raised as SQLAlchemy's (`sa.exc.OperationalError`, `IntegrityError`, ...,
    the driver's own as `__cause__`), as an execution through SQLAlchemy raises them.

    Why: every loop of the workers, the scheduler and the ingress retries what fails with
    `sa.exc.SQLAlchemyError`; a lost PostgreSQL connection on the driver's cursor raised psycopg's own
    OperationalError past them, and the thread storing a worker's results died of it."""
    try:
        yield
    except db.dialect.loaded_dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(None, None, exc, db.dialect.loaded_dbapi.Error,
                                         dialect=db.dialect) from exc


@contextlib.contextmanager
def _relaxed_transaction(db: sa.Engine) -> Iterator[Any]:
    """A PostgreSQL transaction begun as `BEGIN; SET LOCAL synchronous_commit = off`, one simple query.

    Why: psycopg sends its BEGIN on its own before the first statement, and the setting was a statement
    of its own after it: two of the six round trips that storing a batch of results took. The
    connection is in autocommit mode meanwhile (`driver_autocommit`), so that psycopg sends no BEGIN
    itself; the setting ends with the transaction. (Sending the whole transaction in psycopg's pipeline
    mode saved more round trips and cost more: the workers spent 10-20% more CPU a run, measured in
    interleaved pairs.)"""
    with driver_autocommit(db) as raw:
        driver = raw.dbapi_connection
        driver.execute(f"BEGIN; {RELAXED_COMMIT}")
        try:
            yield raw
            driver.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):  # a broken connection: driver_autocommit drops it
                driver.execute("ROLLBACK")
            raise


@contextlib.contextmanager
def driver_autocommit(db: sa.Engine) -> Iterator[Any]:
    """A pooled connection's own DBAPI connection whose statements commit themselves (PostgreSQL's
    autocommit: one round trip for a one-statement write, no COMMIT after it); given back to the pool
    as it was found, or dropped from it when it cannot be (broken, or left inside a transaction). For
    SQLite, whose writes need the write turn, use `driver_transaction`."""
    raw = db.raw_connection()
    driver = raw.dbapi_connection
    try:
        with driver_errors(db):
            driver.autocommit = True
            yield raw
    finally:
        try:
            driver.autocommit = False
        except Exception:  # the pool must not hand it out again
            raw.invalidate()
        finally:
            raw.close()


class DriverStatement:
    """A statement compiled once for one dialect and run on the driver's own cursor.

    Why: in `wasmflow up` under a burst the writer thread spent more of the interpreter's time in
    SQLAlchemy's per-execution work (parameter processing, result set-up, events) than SQLite spent
    storing the rows, and every microsecond of it is taken from the event loop answering the senders.
    The SQL text and its parameter order come from SQLAlchemy's compiler, so quoting and the driver's
    parameter style stay its business. Values go to the driver as they are: bytes, str, numbers and
    None, the types whose SQLAlchemy bind processing does nothing on SQLite and psycopg.
    """

    def __init__(self, statement: Any, dialect: sa.Dialect, defaults: Optional[dict[str, Any]] = None,
                 unprepared: bool = False, **compile_kw: Any) -> None:
        """`unprepared` (PostgreSQL): `execute` has the server plan the statement at each execution, for
        the values given, never with a generic plan psycopg's prepared statement would let it keep (see
        `record_events`' duplicate check)."""
        compiled = statement.compile(dialect=dialect, **compile_kw)
        self._execute_kw = {"prepare": False} if unprepared and dialect.name == "postgresql" else {}
        self.sql = str(compiled)
        if "POSTCOMPILE" in self.sql:  # an expanding IN list is rendered per execution, by SQLAlchemy
            raise ValueError("DriverStatement: give an IN list one bound value per item, not a Python list")
        order = tuple(compiled.positiontup) if compiled.positional else None
        # the positional values in order: itemgetter picks them in C (a generator over the keys cost the
        # ingress loop 5 us a delivery)
        self._pick: Optional[Callable[[dict[str, Any]], tuple[Any, ...]]] = (
            None if order is None else _pick_many(order))
        # the values the statement carries itself (`column == "text"`), then the caller's defaults
        fixed = {name: bind.value for name, bind in compiled.binds.items() if not bind.required}
        self._defaults = {**fixed, **(defaults or {})}

    def params(self, values: dict[str, Any]) -> Any:
        if self._defaults:
            values = {**self._defaults, **values}
        return self._pick(values) if self._pick is not None else values

    def execute(self, cursor: Any, values: dict[str, Any]) -> None:
        cursor.execute(self.sql, self.params(values), **self._execute_kw)

    def execute_many(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        """Run the statement once per row (dicts with the same keys), as one executemany."""
        cursor.executemany(self.sql, [self.params(row) for row in rows])


class DriverCopy:
    """PostgreSQL's `COPY table (columns) FROM STDIN` on the driver's cursor: the rows of a batch insert
    as one stream, with the columns a row leaves out given `defaults` (as `DriverStatement`'s INSERT
    gives them).

    Why: an `executemany` INSERT is a statement per row for both sides. Storing the ingress batches
    (an event and a run a delivery, 32 a batch) took psycopg about 100 us and the server about 150 us
    of CPU a delivery that way, and about half and two thirds of that as a COPY (docs/control-plane.md).
    A row that breaks a constraint fails the whole COPY, as it failed the whole batch before."""

    def __init__(self, table: sa.Table, dialect: sa.Dialect, columns: tuple[str, ...],
                 defaults: Optional[dict[str, Any]] = None) -> None:
        self._defaults = {key: value for key, value in (defaults or {}).items() if key not in columns}
        keys = (*columns, *self._defaults)
        quote = dialect.identifier_preparer
        names = ", ".join(quote.quote(table.c[key].name) for key in keys)
        self.sql = f"COPY {quote.format_table(table)} ({names}) FROM STDIN"
        self._pick = _pick_many(keys)

    def execute_many(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        pick, defaults = self._pick, self._defaults
        with cursor.copy(self.sql) as copy:
            for row in rows:
                copy.write_row(pick({**defaults, **row} if defaults else row))


def _pick_many(keys: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """`lambda values: tuple(values[k] for k in keys)`, in C where `operator.itemgetter` can do it (it
    returns a bare value for one key and cannot take none)."""
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    if keys:
        key = keys[0]
        return lambda values: (values[key],)
    return lambda values: ()


def in_slots(values: list[Any], prefix: str = "k") -> dict[str, Any]:
    """`values` as the parameters `{prefix}0..` of an IN list, padded with the last value to a power of
    two, so that a statement compiled per list length is compiled for a few lengths only: one per batch
    size put SQLAlchemy's compiler in the writer thread at every new size (a few hundred), and a value
    twice in an IN list selects nothing more."""
    slots = 1 << (len(values) - 1).bit_length()
    return {f"{prefix}{i}": values[min(i, len(values) - 1)] for i in range(slots)}


def slot_params(n: int, prefix: str = "k") -> list[sa.BindParameter[Any]]:
    """The bound parameters `{prefix}0..{prefix}{n-1}` of an IN list that `in_slots` fills."""
    return [sa.bindparam(f"{prefix}{i}") for i in range(n)]
