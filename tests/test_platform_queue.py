"""The durable queue on real SQLite and real PostgreSQL: leases, retries, dead runs, recovery, replay."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from wasmflow.engine.base import RunResult, Status
from wasmflow.flows.model import Flow, FlowsFile, Retry
from wasmflow.platform.queue import MAX_LEASE_LOSSES, Queue, ReplayError, backoff_delay, replay
from wasmflow.platform.store import NewEvent, NewRun, new_event_id, new_id, record_event
from wasmflow.storage import migrations as dbmod
from wasmflow.storage import open_database

from platform_support import scalar, Clock, db  # noqa: F401  (db: a fixture)




def enqueue(db: sa.Engine, n: int = 1, flow: str = "f", delivery: str | None = None, attempts: int = 3) -> list[str]:
    ids = []
    with db.begin() as conn:
        for _ in range(n):
            event = NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                             delivery_id=delivery, dedupe_key=f"github:{delivery}" if delivery else None,
                             runs=[NewRun(flow=flow, trigger="github", max_attempts=attempts, idempotency_key=delivery)])
            ids += record_event(conn, event).run_ids
    return ids


def result(status: Status, error: str | None = None) -> RunResult:
    return RunResult(status=status, run_id="x", error=error, run_ms=1.0)


def test_claim_leases_each_run_once_and_finish_completes_it(db):
    clock = Clock()
    (run_id,) = enqueue(db)
    q = Queue(db, "w1", lease_seconds=10, clock=clock)
    (run,) = q.claim(5)
    assert run.id == run_id and run.attempt == 1 and run.event.name == "push"
    assert q.claim(5) == [] and Queue(db, "w2", clock=clock).claim(5) == []
    assert scalar(db, "SELECT lease_owner FROM runs") == "w1"
    assert q.finish(run, result(Status.OK), Retry()).state == "done"
    assert scalar(db, "SELECT state || ':' || status FROM runs") == "done:ok"
    assert scalar(db, "SELECT count(*) FROM attempts WHERE run_id = :r AND status = 'ok'", r=run_id) == 1


def test_an_error_quoting_what_a_guest_sent_is_stored_on_both_databases(db):
    """A run's error may quote a guest's text (a refused URL): a NUL or an unpaired surrogate in it is
    stored as U+FFFD, not refused with the whole batch of results (PostgreSQL refuses NUL in text)."""
    (run_id,) = enqueue(db)
    q = Queue(db, "w1", lease_seconds=10)
    (run,) = q.claim(5)
    error = "refused: http://a\x00b/\ud800 is not in allow.http"
    assert q.finish(run, result(Status.DENIED, error), Retry()).state == "dead"
    assert scalar(db, "SELECT error FROM runs") == "refused: http://a\ufffdb/\ufffd is not in allow.http"
    assert scalar(db, "SELECT error FROM attempts WHERE run_id = :r", r=run_id) == scalar(db, "SELECT error FROM runs")


def test_concurrent_claimers_never_take_the_same_run(db):
    enqueue(db, 120)
    taken: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        q = Queue(db, name)
        while True:
            runs = q.claim(3)
            if not runs:
                return
            with lock:
                taken.extend(r.id for r in runs)
            for r in runs:
                q.finish(r, result(Status.OK), Retry())

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == len(set(taken)) == 120
    assert scalar(db, "SELECT count(*) FROM attempts") == 120
    assert scalar(db, "SELECT count(*) FROM runs WHERE state = 'done'") == 120


def test_retryable_failure_is_retried_after_backoff_then_dead_when_exhausted(db):
    clock = Clock()
    enqueue(db, attempts=3)
    q = Queue(db, "w", clock=clock)
    retry = Retry(attempts=3, initial=10, max=100, on=["timeout"])
    delays = []
    for attempt in (1, 2, 3):
        (run,) = q.claim(1)
        assert run.attempt == attempt
        outcome = q.finish(run, result(Status.TIMEOUT, "deadline"), retry)
        if attempt < 3:
            assert outcome.state == "queued"
            delays.append(outcome.delay)
            assert q.claim(1) == []  # not before the backoff
            clock.now += outcome.delay + 0.01
        else:
            assert outcome.state == "dead"
    assert 5 <= delays[0] <= 10 and 10 <= delays[1] <= 20
    assert scalar(db, "SELECT state || ':' || status || ':' || attempt FROM runs") == "dead:timeout:3"
    assert scalar(db, "SELECT count(*) FROM attempts") == 3


def test_trap_is_not_retried_by_default_but_is_when_listed(db):
    clock = Clock()
    enqueue(db, 2)
    q = Queue(db, "w", clock=clock)
    first, second = q.claim(2)
    assert q.finish(first, result(Status.TRAP), Retry()).state == "dead"
    assert q.finish(second, result(Status.TRAP), Retry(on=["trap"])).state == "queued"


def test_backoff_is_exponential_with_jitter_and_capped():
    retry = Retry(initial=1, max=30)
    assert backoff_delay(retry, 1, rng=lambda: 0.0) == 0.5
    assert backoff_delay(retry, 1, rng=lambda: 1.0) == 1.0
    assert backoff_delay(retry, 4, rng=lambda: 1.0) == 8.0
    assert backoff_delay(retry, 20, rng=lambda: 1.0) == 30.0
    assert backoff_delay(Retry(backoff="fixed", initial=4), 9, rng=lambda: 1.0) == 4.0


def test_expired_lease_is_taken_back_and_the_old_worker_cannot_finish(db):
    clock = Clock()
    enqueue(db)
    dead_worker = Queue(db, "dead", lease_seconds=10, clock=clock)
    (run,) = dead_worker.claim(1)
    other = Queue(db, "other", lease_seconds=10, clock=clock)
    assert other.recover_expired() == 0
    clock.now += 11
    assert other.recover_expired() == 1
    (again,) = other.claim(1)
    assert again.id == run.id and again.attempt == 2
    assert dead_worker.finish(run, result(Status.OK), Retry()).state == "lost"
    assert other.finish(again, result(Status.OK), Retry()).state == "done"
    with db.connect() as conn:
        statuses = [r[0] for r in conn.execute(sa.text("SELECT status FROM attempts ORDER BY id")).all()]
    assert statuses == ["ok (lease lost)", "ok"]  # the audit trail shows the late finish too


def test_heartbeat_keeps_a_long_run_leased(db):
    clock = Clock()
    enqueue(db)
    q = Queue(db, "w", lease_seconds=10, clock=clock)
    (run,) = q.claim(1)
    for _ in range(5):
        clock.now += 6
        assert q.heartbeat([run.id]) == {run.id}
        assert Queue(db, "other", clock=clock).recover_expired() == 0


def test_a_run_that_keeps_killing_its_worker_goes_dead(db):
    clock = Clock()
    enqueue(db)
    for i in range(MAX_LEASE_LOSSES):
        q = Queue(db, f"w{i}", lease_seconds=1, clock=clock)
        assert len(q.claim(1)) == 1
        clock.now += 2
        assert q.recover_expired() == 1
    assert scalar(db, "SELECT state || ':' || status FROM runs") == "dead:lost"


def test_release_on_shutdown_does_not_count_the_attempt(db):
    enqueue(db)
    q = Queue(db, "w")
    (run,) = q.claim(1)
    assert q.release([run.id]) == 1
    (again,) = Queue(db, "w2").claim(1)
    assert again.attempt == 1


def test_replay_by_run_and_by_delivery(db):
    clock = Clock()
    (run_id,) = enqueue(db, delivery="dlv-1")
    q = Queue(db, "w", clock=clock)
    with pytest.raises(ReplayError, match="still queued"):
        replay(db, run_id)
    (run,) = q.claim(1)
    q.finish(run, result(Status.TRAP), Retry())
    (new_id,) = replay(db, run_id[:8])  # a prefix works like the CLI prints it
    assert new_id != run_id
    assert scalar(db, "SELECT seq FROM runs WHERE id = :r", r=new_id) == 1
    assert scalar(db, "SELECT replay_of FROM runs WHERE id = :r", r=new_id) == run_id
    (replayed,) = q.claim(1)
    assert replayed.id == new_id and replayed.attempt == 1 and replayed.event.idempotency_key == "dlv-1"
    q.finish(replayed, result(Status.OK), Retry())
    (third,) = replay(db, "dlv-1")
    assert scalar(db, "SELECT seq FROM runs WHERE id = :r", r=third) == 2
    with pytest.raises(ReplayError, match="no run or delivery"):
        replay(db, "nothing-like-this")


def test_replay_of_an_ignored_delivery_matches_current_flows(db):
    with db.begin() as conn:
        record_event(conn, NewEvent(source="github", name="issues", action="opened", repo="a/b", headers={},
                                    body=b"{}", status="ignored", delivery_id="late", dedupe_key="github:late"))
    flows = FlowsFile(flows=[Flow(name="triage", module="x.wasm",
                                  on=[{"github": {"events": ["issues.opened"]}}])])
    (run_id,) = replay(db, "late", flows)
    assert scalar(db, "SELECT flow FROM runs WHERE id = :r", r=run_id) == "triage"
    assert scalar(db, "SELECT status FROM events WHERE delivery_id = 'late'") == "accepted"


def test_schema_is_versioned_and_a_newer_schema_is_refused(db):
    assert dbmod.migrate(db) == dbmod.SCHEMA_VERSION
    assert scalar(db, "SELECT count(*) FROM schema_version") == 1
    with db.begin() as conn:
        conn.execute(dbmod.schema_version_table.insert().values(version=dbmod.SCHEMA_VERSION + 1, applied_at=0))
    with pytest.raises(RuntimeError, match="newer than this wasmflow"):
        dbmod.migrate(db)


def test_version_5_drops_the_indexes_others_serve_and_lookups_still_use_one(db):
    """A delivery id is found through the unique dedupe key, a run's event through the unique
    (event_id, flow, seq): the two single-column indexes that duplicated them go, on a fresh database
    and on an older one, and the lookups they served still read an index, not the whole table."""
    def indexes() -> set[str]:
        inspector = sa.inspect(db)
        return {ix["name"] for table in ("runs", "events") for ix in inspector.get_indexes(table)}

    assert not set(dbmod.REDUNDANT_INDEXES) & indexes()
    with db.begin() as conn:  # make it a version-4 database, which had them
        conn.execute(sa.text("CREATE INDEX ix_events_delivery_id ON events (delivery_id)"))
        conn.execute(sa.text("CREATE INDEX ix_runs_event_id ON runs (event_id)"))
        conn.execute(dbmod.schema_version_table.delete())
        conn.execute(dbmod.schema_version_table.insert().values(version=4, applied_at=0.0))
    assert set(dbmod.REDUNDANT_INDEXES) <= indexes()
    assert dbmod.migrate(db) == dbmod.SCHEMA_VERSION
    assert not set(dbmod.REDUNDANT_INDEXES) & indexes()

    (run_id,) = enqueue(db, delivery="d-5")
    from wasmflow.platform.store import find_event_by_delivery
    event = find_event_by_delivery(db, "d-5")
    assert event is not None and event.delivery_id == "d-5" and find_event_by_delivery(db, "d-6") is None
    assert scalar(db, "SELECT id FROM runs WHERE event_id = :e", e=event.id) == run_id
    if db.dialect.name == "sqlite":  # PostgreSQL's planner scans tables this small whatever the indexes
        with db.connect() as conn:
            for query in ("SELECT * FROM events WHERE dedupe_key = 'github:d-5'",
                          f"SELECT * FROM runs WHERE event_id = '{event.id}'"):
                plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query))
                assert "USING INDEX" in plan, (query, plan)


def test_pending_migrations_run_once_in_order(tmp_path, monkeypatch):
    engine = open_database(f"sqlite:///{tmp_path / 'm.db'}")
    applied = []

    following = dbmod.SCHEMA_VERSION + 1

    def add_column(conn: sa.Connection) -> None:
        applied.append(following)
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN note TEXT"))

    monkeypatch.setitem(dbmod.MIGRATIONS, following, add_column)
    monkeypatch.setattr(dbmod, "SCHEMA_VERSION", following)
    assert dbmod.migrate(engine) == following
    assert dbmod.migrate(engine) == following
    assert applied == [following]
    assert "note" in [c["name"] for c in sa.inspect(engine).get_columns("runs")]


def test_a_claim_takes_no_more_than_asked(db):
    """On PostgreSQL `id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` can lease far more than n rows
    (the subquery is rescanned); a worker must never hold more runs than it has slots for."""
    enqueue(db, 30)
    assert len(Queue(db, "a").claim(3)) == 3
    assert len(Queue(db, "b").claim(4)) == 4
    assert scalar(db, "SELECT count(*) FROM runs WHERE state = 'running'") == 7


def test_batched_recording_stores_each_dedupe_key_once(db):
    from wasmflow.platform.store import record_events

    def ev(key: str) -> NewEvent:
        return NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                        dedupe_key=key, delivery_id=key, runs=[NewRun(flow="f", trigger="github")])

    with db.begin() as conn:
        record_event(conn, ev("old"))
    results = record_events(db, [ev("a"), ev("old"), ev("a"), ev("b")])
    assert [r.duplicate for r in results] == [False, True, True, False]
    assert results[2].event_id == results[0].event_id
    assert scalar(db, "SELECT count(*) FROM events") == 3
    assert scalar(db, "SELECT count(*) FROM runs") == 3


def test_event_ids_sort_by_creation_time_and_run_ids_differ_from_the_first_digits():
    """Event ids put the time first (new rows land at the end of their indexes), random after (ids of
    one millisecond, from any process, stay apart); run ids are random throughout, because people name
    a run by a short prefix."""
    earlier = [new_event_id() for _ in range(20_000)]
    time.sleep(0.003)
    later = new_event_id()
    assert len(set(earlier)) == len(earlier)
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in earlier)
    assert later > max(earlier)
    assert abs(int(later[:11], 16) - time.time() * 1000) < 1000
    runs = [new_id() for _ in range(20_000)]
    assert all(len(i) == 16 for i in runs)
    assert len({i[:6] for i in runs}) > 19_000  # 6 digits tell almost all of 20,000 runs of a moment apart
