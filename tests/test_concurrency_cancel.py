"""Cancelling runs on real SQLite and PostgreSQL: queued runs end at once, running ones are marked and
never retried, and the mark survives a release or a dead worker."""

from __future__ import annotations

import sqlalchemy as sa
from click.testing import CliRunner

from wasmflow.engine.base import RunResult, Status
from wasmflow.flows.model import Retry
from wasmflow.platform.cancel import cancel_marks
from wasmflow.platform.queue import Queue
from wasmflow.platform.store import NewEvent, NewRun, record_event

from platform_support import Clock, db, scalar  # noqa: F401  (db: a fixture)


def enqueue(db: sa.Engine, n: int = 1, attempts: int = 3) -> list[str]:
    ids: list[str] = []
    with db.begin() as conn:
        for _ in range(n):
            event = NewEvent(source="manual", name="push", headers={}, body=b"{}", status="accepted",
                             runs=[NewRun(flow="f", trigger="manual", max_attempts=attempts)])
            ids += record_event(conn, event).run_ids
    return ids


def test_cancel_queued_run_finishes_it_at_once_and_it_is_never_claimed(db):
    clock = Clock()
    first, second = enqueue(db, 2)
    q = Queue(db, "w1", clock=clock)
    result = q.cancel(first[:8], by="alice")
    assert (result.outcome, result.run_id, result.state) == ("cancelled", first, "done")
    row = scalar(db, "SELECT state || '|' || status || '|' || error || '|' || cancelled_by FROM runs WHERE id = :i",
                 i=first)
    assert row == "done|cancelled|cancelled by alice|alice"
    assert [r.id for r in q.claim(5)] == [second]
    # cancelling twice, or a finished run, changes nothing
    assert q.cancel(first, by="bob").outcome == "finished"
    assert scalar(db, "SELECT cancelled_by FROM runs WHERE id = :i", i=first) == "alice"
    assert q.cancel("nosuchrun", by="bob").outcome == "not_found"
    # LIKE wildcards in a reference never match some other run; a huge name is cut
    assert q.cancel("%" * 8, by="bob").outcome == "not_found"
    assert q.cancel(second[:6].replace(second[3], "_"), by="bob").outcome == "not_found"
    assert q.cancel(second, by="x" * 10_000).by == "x" * 160


def test_cancel_running_run_marks_it_and_its_failure_is_not_retried(db):
    clock = Clock()
    (run_id,) = enqueue(db, attempts=5)
    worker = Queue(db, "w1", clock=clock)
    (run,) = worker.claim(1)
    result = Queue(db, "other-process", clock=clock).cancel(run_id, by="console:bob")
    assert (result.outcome, result.state) == ("cancelling", "running")
    assert cancel_marks(db, [run_id]) == {run_id: "console:bob"}
    # the guest was cut (here: timeout, a retryable status): still cancelled, never queued again
    finish = worker.finish(run, RunResult(status=Status.TIMEOUT, run_id=run_id, error="deadline"), Retry(attempts=5))
    assert finish.state == "done"
    assert scalar(db, "SELECT status || '|' || error FROM runs WHERE id = :i", i=run_id) == \
        "cancelled|cancelled by console:bob"
    assert scalar(db, "SELECT status FROM attempts WHERE run_id = :i", i=run_id) == "cancelled"
    assert worker.claim(5) == []


def test_cancel_running_run_that_finishes_ok_keeps_its_result(db):
    (run_id,) = enqueue(db)
    worker = Queue(db, "w1", clock=Clock())
    (run,) = worker.claim(1)
    worker.cancel(run_id, by="x")
    assert worker.finish(run, RunResult(status=Status.OK, run_id=run_id), Retry()).state == "done"
    assert scalar(db, "SELECT status FROM runs WHERE id = :i", i=run_id) == "ok"


def test_marked_run_released_or_lost_ends_cancelled(db):
    clock = Clock()
    released, lost = enqueue(db, 2)
    worker = Queue(db, "w1", lease_seconds=5, clock=clock)
    assert len(worker.claim(2)) == 2
    worker.cancel(released, by="a")
    worker.cancel(lost, by="b")
    assert worker.release([released]) == 1
    clock.now += 60
    assert Queue(db, "w2", clock=clock).recover_expired() == 1
    for run_id, by in ((released, "a"), (lost, "b")):
        assert scalar(db, "SELECT state || '|' || status || '|' || error FROM runs WHERE id = :i", i=run_id) == \
            f"done|cancelled|cancelled by {by}"
    assert Queue(db, "w3", clock=clock).claim(5) == []


def test_cancel_command_reports_each_outcome(tmp_path):
    from wasmflow.cli import main
    from wasmflow.storage import open_database

    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = open_database(url)
    running, queued = enqueue(engine, 2)
    assert [r.id for r in Queue(engine, "w1").claim(1)] == [running]  # the first stored
    cli = CliRunner()
    out = cli.invoke(main, ["cancel", queued, "--by", "ops", "--database-url", url])
    assert out.exit_code == 0 and "before it started" in out.output and "ops" in out.output
    out = cli.invoke(main, ["cancel", running, "--database-url", url])
    assert out.exit_code == 0 and "cancelling" in out.output
    assert scalar(engine, "SELECT cancelled_by FROM runs WHERE id = :i", i=running).startswith("cli:")
    out = cli.invoke(main, ["cancel", queued, "--database-url", url])
    assert out.exit_code == 1 and "already finished" in out.output
    out = cli.invoke(main, ["cancel", "\x1b[31mzzzzzz", "--database-url", url])
    assert out.exit_code == 1 and "no run" in out.output and "\x1b" not in out.output
    assert "Traceback" not in out.output


def test_migration_3_adds_the_columns_to_a_version_2_store(db):
    """A store from before schema version 3 gets the columns (and index) on open; runs stored survive."""
    from wasmflow.storage import migrations

    (run_id,) = enqueue(db)
    with db.begin() as conn:
        conn.execute(sa.text("DROP INDEX IF EXISTS ix_runs_concurrency"))
        for column in ("concurrency_key", "cancel_requested_at", "cancelled_by", "llm_tokens", "budget_key",
                       "debounce_since"):
            conn.execute(sa.text(f"ALTER TABLE runs DROP COLUMN {column}"))
        conn.execute(sa.text("DELETE FROM schema_version"))  # a fresh store records only its own version
        conn.execute(sa.text("INSERT INTO schema_version (version, applied_at) VALUES (2, 0)"))
    assert migrations.migrate(db) == migrations.SCHEMA_VERSION
    columns = {c["name"] for c in sa.inspect(db).get_columns("runs")}
    assert {"concurrency_key", "cancel_requested_at", "cancelled_by", "llm_tokens", "budget_key",
            "debounce_since"} <= columns
    assert scalar(db, "SELECT llm_tokens FROM runs WHERE id = :i", i=run_id) == 0
    assert Queue(db, "w").cancel(run_id, by="after-migration").outcome == "cancelled"
    assert migrations.migrate(db) == migrations.SCHEMA_VERSION  # again: nothing to do


SPIN_WAT = """(module
 (memory (export "memory") 1)
 (func (export "_start") (loop $l (br $l))))"""


def test_cancel_stops_a_running_http_triggered_run(tmp_path, make_runtime):
    """An HTTP-triggered run is executed by the ingress, not a worker: a cancel from another handle
    (the CLI, the console) still stops its looping guest, long before its deadline, and the caller gets
    its answer with the run stored `cancelled`."""
    import threading
    import time

    import requests

    from platform_support import ServerThread, write_wat
    from wasmflow.platform.app import Options

    flows = f"""
flows:
  - name: spin
    module: {write_wat(tmp_path / "spin.wasm", SPIN_WAT)}
    limits: {{timeout: 60s}}
    on: [{{http: {{methods: [POST]}}}}]
"""
    runtime = make_runtime(tmp_path / "app", flows)
    with ServerThread(runtime, Options(workers=2, poll_interval=0.1, lease_seconds=3)) as srv:
        answer: list[requests.Response] = []
        caller = threading.Thread(target=lambda: answer.append(
            requests.post(f"{srv.base}/flows/spin", data=b"x", timeout=60)))
        started = time.monotonic()
        caller.start()
        db_ = srv.platform.db
        run_id = None
        while run_id is None and time.monotonic() - started < 20:
            run_id = scalar(db_, "SELECT id FROM runs WHERE flow = 'spin' AND state = 'running'")
            time.sleep(0.05)
        assert run_id is not None, "the HTTP run never started"
        time.sleep(0.3)  # the guest is looping now
        result = Queue(db_, "someone-else").cancel(run_id, by="operator")
        assert result.outcome == "cancelling"
        caller.join(30)
        elapsed = time.monotonic() - started
        assert answer, "the caller got no answer"
        assert elapsed < 20, f"the guest ran on for {elapsed:.1f} s after the cancel (deadline 60 s)"
        assert scalar(db_, "SELECT status FROM runs WHERE id = :i", i=run_id) == "cancelled"
        assert "operator" in (scalar(db_, "SELECT error FROM runs WHERE id = :i", i=run_id) or "")
    runtime.close()


def test_the_cancel_watcher_outlives_a_failing_poll(db, caplog):
    """A poll that raises something other than a database error (a bug) is logged with its traceback
    and retried: the watcher's thread must not die, or no cancel would reach the runs held after it."""
    import threading

    from wasmflow.platform.cancel import CancelWatcher

    (run_id,) = enqueue(db)
    Queue(db, "w1").claim(1)
    Queue(db, "other").cancel(run_id, by="alice")
    polls: list[int] = []
    heard = threading.Event()
    seen: list[tuple[str, str]] = []

    def held() -> list[str]:
        polls.append(1)
        if len(polls) == 1:
            raise RuntimeError("a bug in the holder")
        return [run_id]

    def on_cancel(rid: str, by: str) -> None:
        seen.append((rid, by))
        heard.set()

    watcher = CancelWatcher(db, held, on_cancel)
    with caplog.at_level("WARNING", logger="wasmflow.cancel"):
        watcher.start()
        try:
            assert heard.wait(10), "the watcher stopped polling after the failure"
        finally:
            watcher.stop()
    assert seen[0] == (run_id, "alice")
    failure = next(r for r in caplog.records if "reading cancel requests failed (RuntimeError)" in r.getMessage())
    assert failure.exc_info is not None  # a bug: logged with its traceback, not as a database hiccup
