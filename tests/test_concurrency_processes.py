"""Concurrency keys across processes: two `wasmflow worker` processes on one PostgreSQL store, and a
`wasmflow up` on SQLite fed by real webhook deliveries; cancels sent by `wasmflow cancel`, another process.

Run intervals come from the store (`started_at` is stamped after the claim counted the key's running
runs, `finished_at` before the result commits), so intervals that do not overlap prove guests that did not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from wasmflow.platform.store import NewEvent, NewRun, record_event
from wasmflow.storage import open_database

from platform_support import LOOP_WAT, WasmflowProcess, busy_wat, deliver, free_port, wait_until, write_wat

# About 50 ms of work, then success.
SHORT_WAT = busy_wat(30_000_000)

FLOWS = """
flows:
  - name: review
    module: {short}
    on: [{{github: {{events: [pull_request]}}}}]
    concurrency: {{key: "{{repo}}#{{pull_request.number}}", limit: 1}}
  - name: supersede
    module: {loop}
    limits: {{timeout: 60s}}
    on: [{{github: {{events: [pull_request_review]}}}}]
    concurrency: {{key: "{{repo}}#{{pull_request.number}}", limit: 1, on_conflict: cancel-running}}
"""


def payload(repo: str, number: int, n: int) -> dict:
    return {"action": "synchronize", "number": number, "pull_request": {"number": number, "head": {"sha": f"s{n}"}},
            "repository": {"full_name": repo}, "installation": {"id": 1}}


def rows(db: sa.Engine, flow: str) -> list[sa.Row]:
    with db.connect() as conn:
        return conn.execute(sa.text(
            "SELECT id, state, status, concurrency_key, started_at, finished_at, cancelled_by, error, created_at "
            "FROM runs WHERE flow = :f ORDER BY created_at, id"), {"f": flow}).all()


def assert_no_overlap(found: list[sa.Row]) -> None:
    for key in {r.concurrency_key for r in found}:
        spans = sorted((r.started_at, r.finished_at) for r in found if r.concurrency_key == key)
        overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if a[1] > b[0]]
        assert not overlaps, (key, overlaps)


def cancel_cli(directory: Path, run_id: str, url: str | None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "wasmflow.cli", "cancel", run_id, "--by", "ops", "--flows", str(directory / "flows.yaml")]
    if url:
        args += ["--database-url", url]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=directory)


def supersede_and_cancel(db: sa.Engine, directory: Path, url: str | None, send) -> None:  # type: ignore[no-untyped-def]
    """A newer event cancels the running older run (cancel-running); `wasmflow cancel` stops the newer."""
    send(0)
    wait_until(lambda: [r.state for r in rows(db, "supersede")] == ["running"], timeout=30)
    time.sleep(0.3)
    send(1)
    wait_until(lambda: [r.state for r in rows(db, "supersede")] == ["done", "running"], timeout=30)
    old, new = rows(db, "supersede")
    assert old.status == "cancelled" and old.cancelled_by == f"run {new.id} (cancel-running)"
    assert old.finished_at - new.created_at < 5.0  # within the admission + interrupt delay, far from 60 s
    done = cancel_cli(directory, new.id, url)
    assert done.returncode == 0 and "cancelling run" in done.stdout, done.stdout + done.stderr
    asked = time.time()
    wait_until(lambda: rows(db, "supersede")[1].state == "done", timeout=20)
    new = rows(db, "supersede")[1]
    assert new.status == "cancelled" and new.error == "cancelled by ops"
    assert new.finished_at - asked < 3.0


def test_two_postgres_workers_keep_the_limit_and_cancel_across_processes(tmp_path, pg_url):
    (tmp_path / "flows.yaml").write_text(FLOWS.format(short=write_wat(tmp_path / "short.wasm", SHORT_WAT),
                                                      loop=write_wat(tmp_path / "loop.wasm", LOOP_WAT)))
    db = open_database(pg_url)
    workers = [WasmflowProcess(tmp_path, ["worker", "--database-url", pg_url, "--workers", "3", "--lease", "10"],
                               log_name=f"w{i}.log") for i in range(2)]
    try:
        for worker in workers:
            worker.wait_log(" started (")

        def store(event: str, repo: str, number: int, n: int) -> None:
            flow = "review" if event == "pull_request" else "supersede"
            with db.begin() as conn:
                record_event(conn, NewEvent(source="github", name=event, headers={}, status="accepted",
                                            body=json.dumps(payload(repo, number, n)).encode(),
                                            runs=[NewRun(flow=flow, trigger="github", max_attempts=3)]))
                conn.execute(sa.text("NOTIFY wasmflow_runs"))

        for n in range(12):
            store("pull_request", "acme/api", 1, n)
            store("pull_request", "acme/api", 2, n)
        wait_until(lambda: all(r.state == "done" for r in rows(db, "review")) and len(rows(db, "review")) == 24,
                   timeout=120, interval=0.2)
        found = rows(db, "review")
        assert {r.status for r in found} == {"ok"}
        assert_no_overlap(found)
        with db.connect() as conn:
            pids = set(conn.execute(sa.text(
                "SELECT DISTINCT split_part(a.worker, ':', 2) FROM attempts a JOIN runs r ON r.id = a.run_id "
                "WHERE r.flow = 'review'")).scalars())
        assert pids == {str(w.pid) for w in workers}  # both processes took part

        supersede_and_cancel(db, tmp_path, pg_url, lambda n: store("pull_request_review", "acme/api", 7, n))
    finally:
        for worker in workers:
            worker.stop()
        db.dispose()


def test_sqlite_server_keeps_the_limit_for_webhook_deliveries_and_hears_cli_cancels(tmp_path):
    (tmp_path / "flows.yaml").write_text(FLOWS.format(short=write_wat(tmp_path / "short.wasm", SHORT_WAT),
                                                      loop=write_wat(tmp_path / "loop.wasm", LOOP_WAT)))
    port = free_port()
    proc = WasmflowProcess(tmp_path, ["up", "--port", str(port), "--workers", "4"], log_name="up.log")
    base = proc.wait_healthy(port)
    db = open_database(f"sqlite:///{tmp_path / '.wasmflow' / 'wasmflow.db'}")
    try:
        for n in range(10):
            assert deliver(base, "pull_request", payload("acme/api", 1, n)).status_code == 202
        wait_until(lambda: len(rows(db, "review")) == 10 and all(r.state == "done" for r in rows(db, "review")),
                   timeout=60, interval=0.1)
        found = rows(db, "review")
        assert {r.status for r in found} == {"ok"} and {r.concurrency_key for r in found} == {"acme/api#1"}
        assert_no_overlap(found)

        def send(n: int) -> None:
            assert deliver(base, "pull_request_review", payload("acme/api", 7, n)).status_code == 202

        supersede_and_cancel(db, tmp_path, None, send)
    finally:
        proc.stop()
        db.dispose()
