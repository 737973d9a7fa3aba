"""The run lifecycle under shutdowns and crashes: what a SIGTERM does to runs claimed but not started, the
execution number a guest sees, and the place in the queue of a run taken back from a dead worker.

The SIGTERM tests run a real `wasmflow up` (SQLite) or `wasmflow worker` (PostgreSQL) as a subprocess over
runs stored beforehand, with a WAT guest that writes a kv key (its whole run_info JSON) the moment it
starts, then sleeps 1 s. The kv row's `updated_at` is when the guest started; that the key holds the
execution number is what tells two executions of one run apart.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import sqlalchemy as sa

from wasmflow.engine.base import RunResult, Status
from wasmflow.flows.model import Retry
from wasmflow import storage as dbmod
from wasmflow.platform.queue import Queue
from wasmflow.platform.store import NewEvent, NewRun, record_event
from wasmflow.platform.worker import Dispatcher

from hostile_support import engine_name  # noqa: F401  (fixture: both engines)
from platform_support import WasmflowProcess, free_port, scalar, wait_until, write_wat, Clock, db  # noqa: F401  (db: a fixture)

SLEEP_NS = 1_000_000_000

# run_info -> kv_set(key = the run_info JSON, "started") -> sleep 1 s -> set_output(the run_info JSON)
MARK_AND_SLEEP_WAT = f"""(module
 (import "wasmflow" "run_info" (func $run_info (param i32) (result i32)))
 (import "wasmflow" "result_read" (func $read (param i32 i32 i32) (result i32)))
 (import "wasmflow" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 200) "started")
 (func (export "_start")
  (drop (call $run_info (i32.const 0)))
  (drop (call $read (i32.load (i32.const 0)) (i32.const 1024) (i32.load (i32.const 4))))
  (drop (call $kv_set (i32.const 1024) (i32.load (i32.const 4)) (i32.const 200) (i32.const 7)))
  ;; one relative clock subscription at 256: tag 0 (clock), clock id 1 (monotonic), timeout in ns
  (i32.store (i32.const 272) (i32.const 1))
  (i64.store (i32.const 280) (i64.const {SLEEP_NS}))
  (drop (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
  (drop (call $out (i32.const 1024) (i32.load (i32.const 4))))))"""

# Only reports run_info as its output.
RUN_INFO_WAT = """(module
 (import "wasmflow" "run_info" (func $run_info (param i32) (result i32)))
 (import "wasmflow" "result_read" (func $read (param i32 i32 i32) (result i32)))
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start")
  (drop (call $run_info (i32.const 0)))
  (drop (call $read (i32.load (i32.const 0)) (i32.const 1024) (i32.load (i32.const 4))))
  (drop (call $out (i32.const 1024) (i32.load (i32.const 4))))))"""

FLOWS = """
flows:
  - name: slow
    module: {module}
    allow: {{kv: true}}
    limits: {{timeout: 30s}}
    retry: {{attempts: 3}}
    on: [{{github: {{events: [push]}}}}]
"""




def enqueue(db: sa.Engine, n: int = 1, flow: str = "f", attempts: int = 3) -> list[str]:
    """`n` runs, one event each, in `n` transactions: each is stored (and due) after the one before."""
    ids: list[str] = []
    for _ in range(n):
        with db.begin() as conn:
            event = NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                             runs=[NewRun(flow=flow, trigger="github", max_attempts=attempts)])
            ids += record_event(conn, event).run_ids
    return ids


def ok() -> RunResult:
    return RunResult(status=Status.OK, run_id="x", run_ms=1.0)


# --- the queue: place and execution number -----------------------------------------------------------


def test_a_run_taken_back_from_a_dead_worker_keeps_its_place(db):
    clock = Clock()
    a, b, c = enqueue(db, 3)
    dead = Queue(db, "dead", lease_seconds=10, clock=clock)
    assert [r.id for r in dead.claim(1)] == [a]
    clock.now += 60  # B and C waited all along; A's lease expired
    other = Queue(db, "other", lease_seconds=10, clock=clock)
    assert other.recover_expired() == 1
    assert [r.id for r in other.claim(1)] == [a]  # before B and C, which were stored after it
    assert [r.id for r in other.claim(5)] == [b, c]


def test_orphans_queued_again_at_start_keep_their_place(db):
    clock = Clock()
    a, b = enqueue(db, 2)
    assert [r.id for r in Queue(db, "gone", clock=clock).claim(1)] == [a]
    clock.now += 60
    fresh = Queue(db, "fresh", clock=clock)
    assert fresh.recover_expired(orphans=True) == 1
    assert [r.id for r in fresh.claim(2)] == [a, b]  # claimed in queue order, too


def test_a_released_run_keeps_its_place_and_its_attempt(db):
    clock = Clock()
    a, b = enqueue(db, 2)
    q = Queue(db, "w", clock=clock)
    (run,) = q.claim(1)
    clock.now += 60
    assert q.release([run.id]) == 1
    (again,) = Queue(db, "w2", clock=clock).claim(1)
    assert (again.id, again.attempt) == (a, 1)
    assert scalar(db, "SELECT status FROM attempts WHERE run_id = :r ORDER BY id LIMIT 1", r=a) == "released"


def test_the_execution_number_grows_on_every_claim_and_never_repeats(db):
    clock = Clock()
    (run_id,) = enqueue(db, attempts=5)
    q = Queue(db, "w", lease_seconds=10, clock=clock)
    seen = []

    (run,) = q.claim(1)
    seen.append((run.attempt, run.execution))
    q.release([run.id])  # a shutdown gave it back: same attempt next time
    (run,) = q.claim(1)
    seen.append((run.attempt, run.execution))
    clock.now += 11  # its worker died
    assert q.recover_expired() == 1
    (run,) = q.claim(1)
    seen.append((run.attempt, run.execution))
    assert q.finish(run, RunResult(status=Status.TIMEOUT, run_id=run_id), Retry(attempts=5)).state == "queued"
    clock.now += 3600
    (run,) = q.claim(1)
    seen.append((run.attempt, run.execution))
    assert seen == [(1, 1), (1, 2), (2, 3), (3, 4)]
    assert scalar(db, "SELECT executions FROM runs") == 4


def test_an_http_run_executed_in_place_is_its_first_execution(db):
    with db.begin() as conn:
        record_event(conn, NewEvent(source="http", name="http", headers={}, body=b"", status="accepted",
                                    runs=[NewRun(flow="f", trigger="http", state="running", lease_owner="me",
                                                 lease_expires_at=time.time() + 30)]))
    assert scalar(db, "SELECT attempt || ':' || executions FROM runs") == "1:1"


def test_run_info_tells_the_guest_its_execution(tmp_path, make_runtime):
    write_wat(tmp_path / "info.wasm", RUN_INFO_WAT)
    runtime = make_runtime(tmp_path, FLOWS.format(module="info.wasm"))
    try:
        (run_id,) = enqueue(runtime.db, flow="slow")
        gone = Queue(runtime.db, "gone")
        gone.release([r.id for r in gone.claim(1)])  # claimed, then given back unstarted by a shutdown
        dispatcher = Dispatcher(runtime, Queue(runtime.db, "w"), concurrency=1, poll_interval=0.05)
        dispatcher.start()
        try:
            wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs") == "done")
        finally:
            dispatcher.stop(grace=5)
        info = json.loads(scalar(runtime.db, "SELECT output FROM runs"))
        assert (info["run_id"], info["attempt"], info["execution"]) == (run_id, 1, 2)
    finally:
        runtime.close()


def test_run_info_reports_the_execution_number_on_both_engines(tmp_path, engine_name):
    from wasmflow.flows.loader import load_flows
    from wasmflow.host_functions.spec import Event
    from wasmflow.runtime import Runtime

    write_wat(tmp_path / "info.wasm", RUN_INFO_WAT)
    (tmp_path / "flows.yaml").write_text(FLOWS.format(module="info.wasm"))
    loaded = load_flows(tmp_path / "flows.yaml")
    runtime = Runtime(loaded.file, loaded.base_dir, database_url=f"sqlite:///{tmp_path / 's.db'}",
                      engine_override=engine_name)
    try:
        result = runtime.run("slow", Event("manual", b"{}"), attempt=2, execution=5)
        assert result.ok, result.error
        info = json.loads(result.output)
        assert (info["attempt"], info["execution"]) == (2, 5)
        assert json.loads(runtime.run("slow", Event("manual", b"{}")).output)["execution"] == 1  # wasmflow run
    finally:
        runtime.close()


def test_a_database_from_before_execution_numbers_is_migrated(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = dbmod.open_database(url)
    enqueue(engine, 2)
    with engine.begin() as conn:  # make it what version 1 stored: no `executions`, one run tried twice
        conn.execute(sa.text("ALTER TABLE runs DROP COLUMN executions"))
        conn.execute(sa.text("UPDATE runs SET attempt = 2 WHERE rowid = 1"))
        conn.execute(sa.text("DELETE FROM schema_version"))
        conn.execute(sa.text("INSERT INTO schema_version VALUES (1, 0)"))
    engine.dispose()
    engine = dbmod.open_database(url)
    try:
        with engine.connect() as conn:
            assert sorted(conn.execute(sa.text("SELECT attempt, executions FROM runs")).all()) == [(0, 0), (2, 2)]
        assert scalar(engine, "SELECT max(version) FROM schema_version") == dbmod.SCHEMA_VERSION
    finally:
        engine.dispose()


# --- SIGTERM on a real process -------------------------------------------------------------------------


class Served:
    """A `wasmflow up` (SQLite) or `wasmflow worker` (PostgreSQL) over `directory`'s flows.yaml."""

    def __init__(self, directory: Path, database_url: Optional[str]) -> None:
        self.directory = directory
        self.database_url = database_url
        url = database_url or f"sqlite:///{directory / '.wasmflow' / 'wasmflow.db'}"
        (directory / ".wasmflow").mkdir(exist_ok=True)
        self.db = dbmod.open_database(url)

    def start(self, grace: float) -> WasmflowProcess:
        command = ["worker"] if self.database_url else ["up", "--port", str(free_port())]
        return WasmflowProcess(self.directory, [*command, "--workers", "2", "--lease", "10", "--grace", str(grace),
                                                "--log-level", "info"],
                               database_url=self.database_url, log_name="serve.log")

    def rows(self, sql: str, **params: Any) -> list[tuple]:
        with self.db.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params).all()]

    def starts(self) -> list[tuple[dict, float]]:
        """(run_info, when the guest started) of every execution so far."""
        return [(json.loads(key), at) for key, at in self.rows("SELECT key, updated_at FROM kv WHERE flow = 'slow'")]

    def log(self) -> str:
        return (self.directory / "serve.log").read_text(errors="replace")


@pytest.fixture(params=["sqlite", "postgres"])
def served(request, tmp_path):
    database_url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    write_wat(tmp_path / "slow.wasm", MARK_AND_SLEEP_WAT)
    (tmp_path / "flows.yaml").write_text(FLOWS.format(module="slow.wasm"))
    s = Served(tmp_path, database_url)
    yield s
    s.db.dispose()


def stop(proc: WasmflowProcess, served: Served) -> int:
    """SIGTERM; the exit status, or a failure with the log if it did not stop within 40 s."""
    status = proc.stop(timeout=40)
    assert status != -signal.SIGKILL, "did not stop on SIGTERM:\n" + served.log()
    return status


def assert_each_run_completed_exactly_once(served: Served, ids: list[str]) -> None:
    """Every run done/ok with exactly one completed attempt, and no attempt left open."""
    assert served.rows("SELECT DISTINCT state, status FROM runs") == [("done", "ok")]
    completed = dict(served.rows("SELECT run_id, count(*) FROM attempts WHERE status = 'ok' GROUP BY run_id"))
    assert completed == {i: 1 for i in ids}
    assert served.rows("SELECT count(*) FROM attempts WHERE finished_at IS NULL") == [(0,)]


RUNS = 10  # two run slots: two executing and two more claimed, waiting for a slot, the rest queued


@pytest.mark.timeout(180)
def test_sigterm_releases_claimed_runs_unstarted_and_lets_running_ones_finish(served):
    ids = enqueue(served.db, RUNS, flow="slow")
    proc = served.start(grace=30)
    try:
        # two guests started, two more runs claimed behind them
        wait_until(lambda: len(served.starts()) == 2 and served.rows(
            "SELECT count(*) FROM runs WHERE state = 'running'") == [(4,)], timeout=60, interval=0.01)
    except AssertionError:
        proc.kill()
        raise AssertionError(served.log())
    signalled = time.time()
    assert stop(proc, served) == 0, served.log()

    started = served.starts()
    late = [info for info, at in started if at > signalled]
    assert not late, f"started after SIGTERM: {late}"
    first = {info["run_id"] for info, _ in started}
    assert len(first) == 2
    # the two running finished in the grace period; the two waiting were released: queued, attempt and
    # place kept, their execution counted; nothing holds a lease
    states = served.rows("SELECT id, state, status, attempt, executions, lease_owner FROM runs")
    assert sorted((s, st, a, e, o) for i, s, st, a, e, o in states if i in first) == [("done", "ok", 1, 1, None)] * 2
    released = [i for i, s, st, a, e, o in states if i not in first and e == 1]
    assert len(released) == 2
    assert all((s, a, o) == ("queued", 0, None) for i, s, st, a, e, o in states if i not in first)
    assert served.rows("SELECT count(*) FROM attempts WHERE status = 'released'") == [(2,)]
    assert "released 2 claimed runs that had not started" in served.log()

    proc = served.start(grace=30)
    try:
        wait_until(lambda: served.rows("SELECT count(*) FROM runs WHERE state = 'done'") == [(RUNS,)],
                   timeout=60, interval=0.1)
    finally:
        assert stop(proc, served) == 0, served.log()
    assert_each_run_completed_exactly_once(served, ids)
    executions = sorted((info["run_id"], info["attempt"], info["execution"]) for info, _ in served.starts())
    assert len(executions) == RUNS  # each guest ran once in all
    assert sorted(e for i, a, e in executions if i in released) == [2, 2]  # the second claim, attempt 1
    assert all(a == 1 for _, a, _ in executions)


@pytest.mark.timeout(180)
def test_sigterm_cuts_runs_past_the_grace_period_and_they_run_again_as_a_new_execution(served):
    # Guests that sleep 4 s, not 1: the runs must still be running when the grace period ends, and a
    # `wasmflow worker` (niced) on a loaded machine can take over a second to act on SIGTERM.
    write_wat(served.directory / "slow.wasm", MARK_AND_SLEEP_WAT.replace(f"(i64.const {SLEEP_NS})",
                                                                          f"(i64.const {4 * SLEEP_NS})"))
    ids = enqueue(served.db, 4, flow="slow")
    proc = served.start(grace=0.1)
    try:
        wait_until(lambda: len(served.starts()) == 2, timeout=60, interval=0.01)
    except AssertionError:
        proc.kill()
        raise AssertionError(served.log())
    signalled = time.time()
    assert stop(proc, served) == 0, served.log()
    assert not [info for info, at in served.starts() if at > signalled]
    cut = {info["run_id"] for info, _ in served.starts()}
    assert served.rows("SELECT DISTINCT state, attempt, lease_owner FROM runs") == [("queued", 0, None)]

    proc = served.start(grace=30)
    try:
        wait_until(lambda: served.rows("SELECT count(*) FROM runs WHERE state = 'done'") == [(4,)],
                   timeout=60, interval=0.1)
    finally:
        assert stop(proc, served) == 0, served.log()
    assert_each_run_completed_exactly_once(served, ids)
    seen = sorted((info["run_id"], info["attempt"], info["execution"]) for info, _ in served.starts())
    # a cut run ran twice with the same attempt, told apart by the execution number
    assert [(a, e) for i, a, e in seen if i in cut] == [(1, 1), (1, 2)] * 2


@pytest.mark.timeout(180)
def test_sigterm_right_after_the_first_claim_is_a_graceful_stop(served):
    ids = enqueue(served.db, 6, flow="slow")
    proc = served.start(grace=30)
    try:
        wait_until(lambda: served.rows("SELECT count(*) FROM runs WHERE state = 'running'") != [(0,)],
                   timeout=60, interval=0.002)
    except AssertionError:
        proc.kill()
        raise AssertionError(served.log())
    assert stop(proc, served) == 0, served.log()  # not killed by the signal's default action
    assert served.rows("SELECT count(*) FROM runs WHERE state = 'running' OR lease_owner IS NOT NULL") == [(0,)], served.log()

    proc = served.start(grace=30)
    try:
        wait_until(lambda: served.rows("SELECT count(*) FROM runs WHERE state = 'done'") == [(6,)],
                   timeout=60, interval=0.1)
    finally:
        assert stop(proc, served) == 0, served.log()
    assert_each_run_completed_exactly_once(served, ids)
    assert served.rows("SELECT coalesce(sum(lease_expiries), 0) FROM runs") == [(0,)]


def test_a_stop_signal_reaches_callbacks_registered_before_and_after_it():
    from wasmflow.platform.signals import StopSignal

    previous = signal.getsignal(signal.SIGTERM)
    calls: list[str] = []
    try:
        stopping = StopSignal().install()
        stopping.on_stop(lambda: calls.append("before"))
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, not the default action that ends the process
        wait_until(lambda: calls == ["before"], timeout=5)
        assert stopping.is_set()
        stopping.on_stop(lambda: calls.append("after"))  # e.g. the dispatcher, built after the signal came
        assert calls == ["before", "after"]
    finally:
        signal.signal(signal.SIGTERM, previous)
