"""Two `wasmflow worker` processes sharing one PostgreSQL store: no run executed twice while leases hold,
one cron tick gives one run, and one scheduler is active at a time (another takes over when it dies)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import requests
import sqlalchemy as sa

from wasmflow.storage import open_database
from wasmflow.platform.store import NewEvent, NewRun, record_event

from platform_support import WasmflowProcess, busy_wat, free_port, wait_until, write_wat

RUNS = 300

# About 10 ms of work per run, so a batch lasts long enough for both workers' claim loops to see it.
BUSY_WAT = busy_wat(20_000_000)

FLOWS = """
flows:
  - name: busy
    module: {busy}
    on: [{{github: {{events: [push]}}}}]
  - name: hello
    module: {hello}
    allow: {{kv: true}}
    on: [{{github: {{events: ["*"]}}}}]
  - name: every-second
    module: {hello}
    allow: {{kv: true}}
    on: [{{schedule: {{cron: "* * * * * *", overlap: allow}}}}]
"""


def start_worker(directory: Path, url: str, name: str, metrics_port: int | None = None) -> WasmflowProcess:
    extra = ["--metrics-port", str(metrics_port)] if metrics_port else []
    return WasmflowProcess(directory, ["worker", "--database-url", url, "--workers", "3", "--lease", "10",
                                       "--log-level", "info", *extra], log_name=f"{name}.log")


def test_two_workers_share_the_queue_and_elect_one_scheduler(tmp_path, guest_wasm, pg_url):
    busy = write_wat(tmp_path / "busy.wasm", BUSY_WAT)
    (tmp_path / "flows.yaml").write_text(FLOWS.format(hello=guest_wasm["hello"], busy=busy))
    db = open_database(pg_url)
    metrics_port = free_port()
    workers = {"a": start_worker(tmp_path, pg_url, "a", metrics_port), "b": start_worker(tmp_path, pg_url, "b")}
    try:
        for name in workers:  # both ready before any work arrives, so both can take part
            wait_until(lambda name=name: " started (" in (tmp_path / f"{name}.log").read_text(), timeout=60, interval=0.1)
        for worker in workers.values():  # a worker gives the CPU to `up`'s acknowledgements first (--nice 10)
            assert os.getpriority(os.PRIO_PROCESS, worker.pid) >= min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        with db.begin() as conn:
            for i in range(RUNS):
                record_event(conn, NewEvent(
                    source="github", name="push", headers={}, body=b"{}", status="accepted",
                    delivery_id=f"d{i}", dedupe_key=f"github:d{i}",
                    runs=[NewRun(flow="busy", trigger="github", max_attempts=3, idempotency_key=f"d{i}")]))

        def count(sql: str) -> int:
            with db.connect() as conn:
                return conn.execute(sa.text(sql)).scalar()

        wait_until(lambda: count("SELECT count(*) FROM runs WHERE flow = 'busy' AND state = 'done'") == RUNS,
                   timeout=120, interval=0.2)
        # every run claimed exactly once, by one of the two processes, and both took part
        with db.connect() as conn:
            per_run = conn.execute(sa.text(
                "SELECT r.id, count(a.id), min(a.worker), max(a.status) FROM runs r JOIN attempts a ON a.run_id = r.id "
                "WHERE r.flow = 'busy' GROUP BY r.id")).all()
        assert len(per_run) == RUNS
        assert all(n == 1 and status == "ok" for _, n, _, status in per_run)
        pids = {worker.split(":")[1] for _, _, worker, _ in per_run}
        assert pids == {str(p.pid) for p in workers.values()}
        by_a = sum(1 for _, _, worker, _ in per_run if worker.split(":")[1] == str(workers["a"].pid))
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert f'wasmflow_runs_total{{flow="busy",status="ok"}} {float(by_a)}' in metrics

        # the schedule: a run per tick, never two, and exactly one scheduler active
        wait_until(lambda: count("SELECT count(*) FROM runs WHERE flow = 'every-second' AND state = 'done'") >= 3,
                   timeout=30, interval=0.2)
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in workers}
        leaders = [name for name, text in logs.items() if "scheduler active" in text]
        assert len(leaders) == 1, logs

        # the leader dies without a goodbye: the other takes over the schedule within seconds
        leader = workers[leaders[0]]
        leader.send_signal(signal.SIGKILL)
        leader.wait(timeout=10)
        follower = next(name for name in workers if name != leaders[0])
        wait_until(lambda: "scheduler active" in (tmp_path / f"{follower}.log").read_text(), timeout=20, interval=0.2)
        ticks_before = count("SELECT count(*) FROM events WHERE source = 'schedule'")
        wait_until(lambda: count("SELECT count(*) FROM events WHERE source = 'schedule'") >= ticks_before + 2,
                   timeout=20, interval=0.2)
        workers[follower].stop()
        with db.connect() as conn:
            per_tick = conn.execute(sa.text(
                "SELECT e.dedupe_key, count(r.id) FROM events e JOIN runs r ON r.event_id = e.id "
                "WHERE e.source = 'schedule' GROUP BY e.dedupe_key")).all()
            attempts_per_run = conn.execute(sa.text(
                "SELECT max(n) FROM (SELECT count(*) AS n FROM attempts a JOIN runs r ON r.id = a.run_id "
                "WHERE r.flow = 'every-second' AND r.lease_expiries = 0 GROUP BY a.run_id) t")).scalar()
        assert len(per_tick) >= 5 and all(n == 1 for _, n in per_tick)
        assert attempts_per_run == 1
    finally:
        for proc in workers.values():
            proc.stop()
        db.dispose()


def test_a_worker_hears_of_new_runs_through_notify_not_its_poll(tmp_path, pg_url, make_runtime):
    """Runs stored by another process wake the dispatcher at once (LISTEN/NOTIFY), long before its poll."""
    from wasmflow.platform.metrics import Metrics
    from wasmflow.platform.queue import Queue
    from wasmflow.platform.store import BatchWriter
    from wasmflow.platform.worker import Dispatcher

    from platform_support import OK_WAT

    flows = f"flows:\n  - name: ok\n    module: {write_wat(tmp_path / 'ok.wasm', OK_WAT)}\n"
    runtime = make_runtime(tmp_path / "app", flows, database_url=pg_url)
    dispatcher = Dispatcher(runtime, Queue(runtime.db, "listener-test"), Metrics(), concurrency=1, poll_interval=60)
    dispatcher.start()
    other_process = open_database(pg_url)  # its own engine: nothing shared with the dispatcher but the database
    writer = BatchWriter(other_process)
    try:
        time.sleep(1.0)  # the dispatcher made its first (empty) claim and now sleeps for its 60 s poll
        started = time.monotonic()
        writer.submit(NewEvent(source="http", name="http", headers={}, body=b"", status="accepted",
                               runs=[NewRun(flow="ok", trigger="http")])).result(timeout=10)

        def done() -> bool:
            with other_process.connect() as conn:
                return conn.execute(sa.text("SELECT count(*) FROM runs WHERE state = 'done'")).scalar() == 1

        wait_until(done, timeout=10, interval=0.05)
        assert time.monotonic() - started < 5
    finally:
        writer.close()
        dispatcher.stop(grace=5)
        other_process.dispose()
        runtime.close()


def test_a_pooled_connection_cut_while_it_rested_is_replaced_at_checkout(pg_url: str, monkeypatch) -> None:
    """The pool checks a connection only after it rested (storage/engine.py: no round trip before every
    transaction); one the server cut meanwhile is replaced, and the caller never sees the cut."""
    from wasmflow.storage import engine as storage_engine

    db = open_database(pg_url)
    try:
        with db.connect() as conn:
            cut = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        with db.connect() as conn:  # used a moment ago: not pinged, the same connection
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() == cut
        admin = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
        with admin.begin() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": cut}).scalar()
        admin.dispose()
        monkeypatch.setattr(storage_engine, "PING_AFTER_IDLE", 0.0)  # as if it had rested for long
        with db.connect() as conn:
            fresh = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        assert fresh != cut
    finally:
        db.dispose()


def test_a_dispatcher_goes_on_when_the_server_cuts_its_connections(tmp_path, pg_url, make_runtime, caplog):
    """Connections cut mid-stream (a database restart, a failover, an idle-session killer) fail a claim or
    a batch of results on the driver's cursor; the dispatcher's loops retry them as any database error,
    and every run still completes once."""
    from wasmflow.platform.metrics import Metrics
    from wasmflow.platform.queue import Queue
    from wasmflow.platform.store import BatchWriter
    from wasmflow.platform.worker import Dispatcher

    from platform_support import OK_WAT

    name = f"cut_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    flows = f"flows:\n  - name: ok\n    module: {write_wat(tmp_path / 'ok.wasm', OK_WAT)}\n"
    runtime = make_runtime(tmp_path / "app", flows, database_url=f"{pg_url}&application_name={name}")
    dispatcher = Dispatcher(runtime, Queue(runtime.db, "cut-test"), Metrics(), concurrency=4, poll_interval=0.2)
    other_process = open_database(pg_url)  # stores the events and cuts; never cut itself
    writer = BatchWriter(other_process)
    runs = 0
    done_sql = sa.text("SELECT count(*) FROM runs WHERE state = 'done'")
    cut_sql = sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :n")
    held_sql = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n")
    caplog.set_level(logging.WARNING, logger="wasmflow.worker")
    try:
        dispatcher.start()
        cuts = 0
        for _ in range(5):  # runs arrive, and the dispatcher's connections are cut while it works on them
            for future in [writer.submit(NewEvent(source="http", name="http", headers={}, body=b"", status="accepted",
                                                  runs=[NewRun(flow="ok", trigger="http")])) for _ in range(80)]:
                future.result(timeout=30)
            runs += 80

            def connected() -> bool:  # the dispatcher holds a connection again (it reconnects on use)
                with other_process.connect() as conn:
                    return conn.execute(held_sql, {"n": name}).scalar() > 0

            wait_until(connected, timeout=20, interval=0.01)
            with other_process.begin() as conn:
                cuts += conn.execute(cut_sql, {"n": name}).scalar() > 0

        def done() -> bool:
            with other_process.connect() as conn:
                return conn.execute(done_sql).scalar() == runs

        wait_until(done, timeout=60, interval=0.1)
        assert cuts == 5
        retried = [r.getMessage() for r in caplog.records if "failed (OperationalError)" in r.getMessage()]
        assert retried, "no claim or result met a cut connection: the test did not test"
        with other_process.connect() as conn:
            assert conn.execute(sa.text("SELECT max(executions) FROM runs")).scalar() == 1
    finally:
        writer.close()
        dispatcher.stop(grace=5)
        other_process.dispose()
        runtime.close()
