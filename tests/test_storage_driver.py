"""Statements on the driver's own cursor (wasmflow/storage/driver.py), on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from wasmflow.platform.store import NewEvent, NewRun, record_events
from wasmflow.storage import open_database
from wasmflow.storage.driver import DriverStatement, driver_transaction, in_slots, slot_params
from wasmflow.storage.schema import events_table, runs_table


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> sa.Engine:
    url = f"sqlite:///{tmp_path / 'w.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = open_database(url)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 100])
def test_in_slots_pads_to_a_power_of_two_with_the_last_value(n: int) -> None:
    values = [f"v{i}" for i in range(n)]
    slots = in_slots(values)
    assert len(slots) & (len(slots) - 1) == 0 and n <= len(slots) < 2 * n
    assert list(slots.values())[:n] == values and set(list(slots.values())[n:]) <= {values[-1]}
    assert list(slots) == [f"k{i}" for i in range(len(slots))]


def test_a_statement_keeps_the_values_it_carries(db: sa.Engine) -> None:
    e = events_table
    stored = record_events(db, [NewEvent(source="github", name="push", headers={}, body=b"{}", status=s, dedupe_key=k)
                                for s, k in (("accepted", "a"), ("ignored", "b"), ("accepted", "c"))])
    # `status == "accepted"` is a value of the statement itself; k0.. come from the caller, padded
    query = DriverStatement(sa.select(e.c.id).where(e.c.status == "accepted",
                                                    e.c.id.in_(slot_params(4))), db.dialect)
    with driver_transaction(db) as raw:
        cursor = raw.cursor()
        cursor.execute(query.sql, query.params(in_slots([r.event_id for r in stored])))
        found = {row[0] for row in cursor.fetchall()}
        cursor.close()
    assert found == {stored[0].event_id, stored[2].event_id}


def test_an_expanding_in_list_is_refused(db: sa.Engine) -> None:
    with pytest.raises(ValueError, match="one bound value per item"):
        DriverStatement(sa.select(runs_table.c.id).where(runs_table.c.flow.in_(["a", "b"])), db.dialect)


def test_duplicates_are_found_whatever_the_batch_size(db: sa.Engine) -> None:
    first = record_events(db, [NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                                        dedupe_key=f"github:{i}", runs=[NewRun(flow="f", trigger="github")])
                               for i in range(3)])
    # 5 keys (padded to 8), two stored before, one twice in the batch
    again = record_events(db, [NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                                        dedupe_key=f"github:{i}", runs=[NewRun(flow="f", trigger="github")])
                               for i in (1, 2, 7, 8, 7)])
    assert [r.duplicate for r in again] == [True, True, False, False, True]
    assert again[0].event_id == first[1].event_id and again[4].event_id == again[2].event_id
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(runs_table)).scalar() == 5


def test_a_batch_stores_every_value_exactly_as_given(db: sa.Engine) -> None:
    """What a sender controls (the action, the repository, the headers, the body) comes back byte for
    byte from the batch write: on PostgreSQL a COPY, whose text format escapes tabs, newlines and
    backslashes; None stays NULL and a column left out gets its default."""
    awkward = 'tab\there\nnew line\\back\\slash "quoted" \\N \u00e9\u4e2d\U0001f600'
    body = bytes(range(256)) * 3
    event = NewEvent(source="github", name="push", headers={"x-weird": awkward, "x-null": "\\N"}, body=body,
                     status="accepted", action=awkward, repo=None, dedupe_key="github:" + awkward,
                     runs=[NewRun(flow=awkward, trigger="github", idempotency_key=None)])
    plain = NewEvent(source="github", name="push", headers={}, body=b"", status="ignored", dedupe_key="github:plain")
    stored = record_events(db, [event, plain])
    e, r = events_table, runs_table
    with db.connect() as conn:
        row = conn.execute(sa.select(e.c.action, e.c.repo, e.c.headers, e.c.body, e.c.dedupe_key, e.c.runs_created,
                                     e.c.note).where(e.c.id == stored[0].event_id)).one()
        run = conn.execute(sa.select(r.c.flow, r.c.idempotency_key, r.c.lease_expiries, r.c.executions)
                           .where(r.c.event_id == stored[0].event_id)).one()
        empty = conn.execute(sa.select(e.c.body, e.c.headers).where(e.c.id == stored[1].event_id)).one()
    assert row.action == awkward and row.repo is None and row.note is None and row.dedupe_key == "github:" + awkward
    assert json.loads(row.headers) == {"x-weird": awkward, "x-null": "\\N"}
    assert bytes(row.body) == body and row.runs_created == 1
    assert tuple(run) == (awkward, None, 0, 0)
    assert bytes(empty.body) == b"" and empty.headers == "{}"


def test_the_duplicate_lookup_is_not_a_plan_made_for_an_empty_table(pg_url: str) -> None:
    """On PostgreSQL the batch's SELECT of stored dedupe keys is planned for the table as it is: a plan
    prepared on a connection while the table was small (a sequential scan) must not serve it once the
    table has grown. One connection throughout, so that psycopg's prepare threshold is passed on it."""
    open_database(pg_url).dispose()  # the schema
    db = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.pool.StaticPool)
    observer = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    scans = sa.text("SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'events'::regclass")

    def batch(start: int) -> list[NewEvent]:
        return [NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                         dedupe_key=f"github:{start + i}") for i in range(32)]

    def seq_scans() -> int:
        with db.connect() as conn:  # the writer's statistics go out when its backend is next idle
            conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
            conn.commit()
        time.sleep(0.3)
        with observer.connect() as conn:
            return conn.execute(scans).scalar()

    try:
        # psycopg prepares the statement at its fifth execution; the server plans the first five executions
        # of a prepared statement for their values, and may then keep a generic plan
        for start in range(0, 32 * 16, 32):
            record_events(db, batch(start))
        with db.begin() as conn:  # no ANALYZE: it would make the server drop its cached plans
            conn.execute(events_table.insert(), [dict(id=f"bulk{i}", source="github", name="push", headers="{}",
                                                      body=b"", received_at=0.0, status="accepted",
                                                      dedupe_key=f"bulk:{i}") for i in range(20_000)])
        before = seq_scans()
        for start in range(100_000, 100_000 + 32 * 4, 32):
            record_events(db, batch(start))
        after = seq_scans()
        assert after == before, f"4 batches scanned all 20,000 stored events {after - before} times"
    finally:
        db.dispose()
        observer.dispose()


def test_a_driver_transaction_commits_all_or_nothing_and_gives_the_connection_back_as_found(db: sa.Engine) -> None:
    """Relaxed, which on PostgreSQL begins in one simple query on an autocommit connection: statements
    before a failing one are rolled back with it, the error is SQLAlchemy's (the driver's as its cause, as
    an execution through SQLAlchemy raises it: storage/driver.py `driver_errors`), the setting lasts only
    as long as its transaction, and the pooled connection goes back as it was and goes on working."""
    from wasmflow.platform.store import event_row, insert_many

    def event(id_: str, key: str) -> dict:
        return event_row(NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                                  dedupe_key=key, id=id_))

    with pytest.raises(Exception) as failed:
        with driver_transaction(db, relaxed=True) as raw:
            cursor = raw.cursor()
            insert_many(cursor, db.dialect, events_table, [event("e1", "k1")])
            insert_many(cursor, db.dialect, events_table, [event("e2", "k1")])  # the same dedupe key
            insert_many(cursor, db.dialect, events_table, [event("e3", "k3")])
    assert isinstance(failed.value, sa.exc.IntegrityError), failed.value
    assert isinstance(failed.value.__cause__, db.dialect.loaded_dbapi.IntegrityError)
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar() == 0
    with driver_transaction(db, relaxed=True) as raw:
        cursor = raw.cursor()
        insert_many(cursor, db.dialect, events_table, [event("e4", "k4")])
        if db.dialect.name == "postgresql":
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone()[0] == "off"  # the transaction's own setting
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT id FROM events")).scalars().all() == ["e4"]
        if db.dialect.name == "postgresql":
            assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == "on"
            assert conn.connection.dbapi_connection.autocommit is False
