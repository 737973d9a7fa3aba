"""Concurrency keys, debounce, conflicts and rate limits through the real dispatcher, on real SQLite and
PostgreSQL, with real guests; run intervals are read back from the store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from wasmflow.engine.base import Status
from wasmflow.host_functions.spec import CancelSignal, Event
from wasmflow.platform.metrics import Metrics
from wasmflow.platform.queue import Queue
from wasmflow.platform.store import NewEvent, NewRun, record_event
from wasmflow.platform.worker import Dispatcher

from platform_support import LOOP_WAT, OK_WAT, scalar, wait_until, write_wat

# About 0.1 s of work, then success.
SHORT_WAT = """(module
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 0) "done")
 (func (export "_start") (local $i i32)
  (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
           (br_if $l (i32.lt_u (local.get $i) (i32.const 60000000))))
  (drop (call $out (i32.const 0) (i32.const 4)))))"""

FLOW = """
flows:
  - name: review
    module: {module}
    limits: {{timeout: 30s}}
    on: [{{github: {{events: [pull_request]}}}}]
{extra}
"""


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_url")


def pr_event(repo: str, number: int, n: int = 0) -> NewEvent:
    body = {"action": "synchronize", "number": number, "pull_request": {"number": number, "head": {"sha": f"s{n}"}},
            "repository": {"full_name": repo}, "installation": {"id": 7}}
    return NewEvent(source="github", name="pull_request", action="synchronize", repo=repo, headers={},
                    body=json.dumps(body).encode(), status="accepted",
                    runs=[NewRun(flow="review", trigger="github", max_attempts=3)])


def store(db: sa.Engine, *events: NewEvent) -> list[str]:
    ids: list[str] = []
    with db.begin() as conn:
        for event in events:
            ids += record_event(conn, event).run_ids
    return ids


def runs(db: sa.Engine) -> list[sa.Row]:
    with db.connect() as conn:
        return conn.execute(sa.text(
            "SELECT id, state, status, error, concurrency_key, started_at, finished_at, cancelled_by, created_at "
            "FROM runs ORDER BY created_at, id")).all()


def dispatcher(runtime, concurrency: int = 4, name: str = "w") -> Dispatcher:
    d = Dispatcher(runtime, Queue(runtime.db, name, lease_seconds=10), Metrics(), concurrency=concurrency,
                   poll_interval=0.05)
    d.start()
    return d


def test_limit_one_per_key_never_overlaps_and_other_keys_run_alongside(tmp_path, make_runtime, database_url):
    module = write_wat(tmp_path / "short.wasm", SHORT_WAT)
    extra = '    concurrency: {key: "{repo}#{pull_request.number}", limit: 1}'
    runtime = make_runtime(tmp_path, FLOW.format(module=module, extra=extra), database_url=database_url)
    store(runtime.db, *[pr_event("acme/api", 1, i) for i in range(6)], *[pr_event("acme/api", 2, i) for i in range(3)])
    d = dispatcher(runtime, concurrency=4)
    try:
        wait_until(lambda: all(r.state == "done" for r in runs(runtime.db)), timeout=60)
    finally:
        d.stop(grace=5)
    rows = runs(runtime.db)
    assert {r.status for r in rows} == {"ok"}
    assert {r.concurrency_key for r in rows} == {"acme/api#1", "acme/api#2"}
    for key in ("acme/api#1", "acme/api#2"):
        spans = sorted((r.started_at, r.finished_at) for r in rows if r.concurrency_key == key)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    # the two keys did run at the same time at least once: the limit is per key, not per flow
    one = [(r.started_at, r.finished_at) for r in rows if r.concurrency_key == "acme/api#1"]
    two = [(r.started_at, r.finished_at) for r in rows if r.concurrency_key == "acme/api#2"]
    assert any(a < d_ and c < b for a, b in one for c, d_ in two)


def test_cancel_running_cancels_the_older_run_within_the_interrupt_period(tmp_path, make_runtime, database_url,
                                                                          engine_name):
    module = write_wat(tmp_path / "loop.wasm", LOOP_WAT)
    extra = '    concurrency: {key: "{repo}#{pull_request.number}", limit: 1, on_conflict: cancel-running}'
    runtime = make_runtime(tmp_path, FLOW.format(module=module, extra=extra), database_url=database_url,
                           engine=engine_name)
    d = dispatcher(runtime)
    try:
        (old,) = store(runtime.db, pr_event("acme/api", 1, 0))
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=old) == "running")
        time.sleep(0.2)  # the guest is looping
        (new,) = store(runtime.db, pr_event("acme/api", 1, 1))
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=old) == "done", timeout=10)
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=new) == "running")
        Queue(runtime.db, "ops").cancel(new, by="test")  # the loop would never end by itself
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=new) == "done", timeout=10)
        wait_until(lambda: 'how="stopped"} 2.0' in d.metrics.render().decode())
        metrics = d.metrics.render().decode()
    finally:
        d.stop(grace=5)
    assert 'wasmflow_cancellations_total{flow="review",how="superseded"} 1.0' in metrics
    assert 'wasmflow_cancellations_total{flow="review",how="stopped"} 2.0' in metrics
    by_id = {r.id: r for r in runs(runtime.db)}
    assert by_id[old].status == "cancelled" and by_id[old].cancelled_by == f"run {new} (cancel-running)"
    assert by_id[old].error == f"cancelled by run {new} (cancel-running)"
    # marked when the new run was admitted, stopped soon after: far inside the 30 s deadline
    assert by_id[old].finished_at - by_id[new].created_at < 3.0
    assert by_id[new].status == "cancelled" and by_id[new].error == "cancelled by test"
    assert scalar(runtime.db, "SELECT count(*) FROM attempts WHERE run_id = :i", i=old) == 1  # never retried


def test_debounce_turns_ten_rapid_events_into_one_run_on_the_newest(tmp_path, make_runtime, database_url):
    module = write_wat(tmp_path / "ok.wasm", OK_WAT)
    extra = ('    concurrency: {key: "{repo}#{pull_request.number}"}\n'
             '    debounce: {period: 1s, max_wait: 30s}')
    runtime = make_runtime(tmp_path, FLOW.format(module=module, extra=extra), database_url=database_url)
    d = dispatcher(runtime)
    try:
        ids = []
        for i in range(10):
            ids += store(runtime.db, pr_event("acme/api", 1, i))
            time.sleep(0.05)
        wait_until(lambda: all(r.state == "done" for r in runs(runtime.db)), timeout=30)
    finally:
        d.stop(grace=5)
    rows = {r.id: r for r in runs(runtime.db)}
    ran = [r for r in rows.values() if r.status == "ok"]
    assert [r.id for r in ran] == [ids[-1]]  # one run, on the newest event
    assert all(rows[i].status == "cancelled" and rows[i].cancelled_by == "debounce" for i in ids[:-1])
    assert scalar(runtime.db, "SELECT count(*) FROM attempts") == 1
    event = scalar(runtime.db, "SELECT e.body FROM events e JOIN runs r ON r.event_id = e.id WHERE r.id = :i", i=ids[-1])
    assert json.loads(bytes(event))["pull_request"]["head"]["sha"] == "s9"
    # it waited out the period after the last event
    assert ran[0].started_at - ran[0].created_at >= 0.9


def test_debounce_still_starts_by_max_wait(tmp_path, make_runtime, database_url):
    module = write_wat(tmp_path / "ok.wasm", OK_WAT)
    extra = '    debounce: {period: 1s, max_wait: 1.5s, key: "{repo}"}'
    runtime = make_runtime(tmp_path, FLOW.format(module=module, extra=extra), database_url=database_url)
    d = dispatcher(runtime)
    try:
        first = time.time()
        while time.time() - first < 3.5:  # an event every 0.2 s, never a quiet second
            store(runtime.db, pr_event("acme/api", 1))
            time.sleep(0.2)
        wait_until(lambda: all(r.state == "done" for r in runs(runtime.db)), timeout=30)
    finally:
        d.stop(grace=5)
    ran = [r for r in runs(runtime.db) if r.status == "ok"]
    assert 2 <= len(ran) <= 4  # about one per max_wait, not one at the end nor one per event
    assert ran[0].started_at - first < 1.5 + 1.0


def test_skip_new_refuses_runs_while_the_key_is_busy(tmp_path, make_runtime, database_url):
    module = write_wat(tmp_path / "loop.wasm", LOOP_WAT)
    extra = '    concurrency: {key: "{repo}", limit: 1, on_conflict: skip-new}'
    runtime = make_runtime(tmp_path, FLOW.format(module=module, extra=extra), database_url=database_url)
    d = dispatcher(runtime)
    try:
        (first,) = store(runtime.db, pr_event("acme/api", 1))
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=first) == "running")
        skipped = store(runtime.db, pr_event("acme/api", 2), pr_event("acme/api", 3))
        (other,) = store(runtime.db, pr_event("acme/web", 1))
        wait_until(lambda: all(scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=i) == "done" for i in skipped))
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=other) == "running")
        for run_id in (first, other):
            Queue(runtime.db, "ops").cancel(run_id, by="test")
        wait_until(lambda: all(r.state == "done" for r in runs(runtime.db)), timeout=10)
    finally:
        d.stop(grace=5)
    rows = {r.id: r for r in runs(runtime.db)}
    for run_id in skipped:
        assert rows[run_id].status == "cancelled" and rows[run_id].cancelled_by == "skip-new"
        assert "on_conflict: skip-new" in rows[run_id].error and rows[run_id].started_at is None
    assert rows[other].started_at is not None  # another key is not affected


def test_replace_queued_keeps_only_the_newest_waiting_run(tmp_path, make_runtime, database_url):
    module = write_wat(tmp_path / "loop.wasm", LOOP_WAT)
    extra = '    concurrency: {key: "{repo}", limit: 1, on_conflict: replace-queued}'
    runtime = make_runtime(tmp_path, FLOW.format(module=module, extra=extra), database_url=database_url)
    d = dispatcher(runtime)
    try:
        (first,) = store(runtime.db, pr_event("acme/api", 1))
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=first) == "running")
        waiting = []
        for i in range(3):
            waiting += store(runtime.db, pr_event("acme/api", 1, i))
            wait_until(lambda: scalar(runtime.db, "SELECT concurrency_key FROM runs WHERE id = :i", i=waiting[-1]))
        assert scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=first) == "running"  # not cancelled
        Queue(runtime.db, "ops").cancel(first, by="test")
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=waiting[-1]) == "running")
        Queue(runtime.db, "ops").cancel(waiting[-1], by="test")
        wait_until(lambda: all(r.state == "done" for r in runs(runtime.db)), timeout=10)
    finally:
        d.stop(grace=5)
    rows = {r.id: r for r in runs(runtime.db)}
    for run_id in waiting[:-1]:
        assert rows[run_id].status == "cancelled" and rows[run_id].started_at is None
        assert rows[run_id].error == f"replaced by run {waiting[waiting.index(run_id) + 1]} (replace-queued)"


def test_rate_limit_records_denied_runs_that_never_execute(tmp_path, make_runtime, database_url):
    module = write_wat(tmp_path / "ok.wasm", OK_WAT)
    extra = '    rate: {limit: 3, per: 1h, key: "{repo}"}'
    runtime = make_runtime(tmp_path, FLOW.format(module=module, extra=extra), database_url=database_url)
    d = dispatcher(runtime)
    try:
        store(runtime.db, *[pr_event("acme/api", i) for i in range(5)], pr_event("acme/web", 1))
        wait_until(lambda: all(r.state in ("done", "dead") for r in runs(runtime.db)), timeout=30)
        metrics = d.metrics.render().decode()
    finally:
        d.stop(grace=5)
    rows = runs(runtime.db)
    api = [r for r in rows if r.concurrency_key == "acme/api"]
    assert [r.status for r in api] == ["ok", "ok", "ok", "denied", "denied"]
    assert all(r.started_at is None and "rate limit reached: 3 runs per 1h" in r.error
               for r in api if r.status == "denied")
    assert [r.status for r in rows if r.concurrency_key == "acme/web"] == ["ok"]
    assert scalar(runtime.db, "SELECT count(*) FROM attempts") == 4
    assert 'wasmflow_runs_denied_total{flow="review",reason="rate"} 2.0' in metrics
    # the per-key table: acme/api had 3 runs and 2 denied, acme/web 1 run
    from click.testing import CliRunner
    from wasmflow.cli import main

    out = CliRunner().invoke(main, ["concurrency", "--database-url", database_url])
    assert out.exit_code == 0, out.output
    cells = [line.replace("│", " ").split() for line in out.output.splitlines() if "acme/" in line]
    lines = {row[1]: row for row in cells}
    assert lines["acme/api"][2:6] == ["0", "0", "0", "2"] and lines["acme/web"][2:6] == ["0", "0", "0", "0"]
    bad = CliRunner().invoke(main, ["concurrency", "--since", "forever", "--database-url", database_url])
    assert bad.exit_code == 2 and "expected a duration" in bad.output and "Traceback" not in bad.output


def test_cancel_queued_and_running_through_the_dispatcher(tmp_path, make_runtime, database_url, engine_name,
                                                          guest_wasm):
    """guest-examples/cpu-heavy with 10^8 JSON rounds runs for minutes on either engine: cancelled, it stops."""
    flows = f"""
flows:
  - name: heavy
    module: {guest_wasm["cpu-heavy"]}
    config: {{hash_kib: 16, json_rounds: 100000000}}
    limits: {{timeout: 60s}}
"""
    runtime = make_runtime(tmp_path, flows, database_url=database_url, engine=engine_name)
    ids = store(runtime.db, *[NewEvent(source="manual", name="manual", headers={}, body=b"{}", status="accepted",
                                       runs=[NewRun(flow="heavy", trigger="manual", max_attempts=3)])
                              for _ in range(2)])
    queued = Queue(runtime.db, "ops").cancel(ids[1], by="ops")
    assert queued.outcome == "cancelled"
    # Compile (WasmEdge: AOT, seconds) before measuring: a cancel during the compile waits for it.
    warm = CancelSignal()
    warm.cancel("warm-up")
    assert runtime.run("heavy", Event(name="manual"), cancel=warm).status is Status.CANCELLED
    d = dispatcher(runtime, concurrency=1)
    try:
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=ids[0]) == "running")
        time.sleep(0.5)
        asked = time.time()
        assert Queue(runtime.db, "ops").cancel(ids[0], by="ops").outcome == "cancelling"
        wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs WHERE id = :i", i=ids[0]) == "done", timeout=20)
    finally:
        d.stop(grace=5)
    rows = {r.id: r for r in runs(runtime.db)}
    assert rows[ids[0]].status == "cancelled" and rows[ids[0]].error == "cancelled by ops"
    assert rows[ids[0]].finished_at - asked < 3.0
    assert rows[ids[1]].status == "cancelled" and rows[ids[1]].started_at is None
    assert scalar(runtime.db, "SELECT count(*) FROM attempts") == 1
