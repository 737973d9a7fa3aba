"""One executor for every trigger: an HTTP-triggered run is classified, stored and counted like a queued one.

Also: a Ctrl-C inside a run gives the run back instead of filing it `upstream`, and a timed-out GitHub
request is told from a refused one by the exception's type, not its text.

Real parts: the real server on loopback, real guests, real SQLite and PostgreSQL, real requests to
loopback sockets. The one stand-in is a Runtime whose run is interrupted (KeyboardInterrupt) once, which
no guest can cause on purpose.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from wasmflow.engine.base import RunResult, Status
from wasmflow.host_functions.spec import Event
from wasmflow import storage as dbmod
from wasmflow.platform.app import Options
from wasmflow.platform.executor import execute
from wasmflow.platform.queue import ClaimedRun, Queue
from wasmflow.platform.store import NewEvent, NewRun, record_event
from wasmflow.platform.worker import Dispatcher
from wasmflow.runtime import Runtime

from guest_support import write_wat
from platform_support import OK_WAT, SECRET, ServerThread, build_runtime, scalar, wait_until


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_url")


def test_an_http_run_failing_after_an_upstream_failure_is_filed_upstream_like_a_worker_run(
        tmp_path: Path, guest_wasm, database_url: str, make_runtime) -> None:
    runtime = make_runtime(tmp_path, f"""
flows:
  - name: fetch
    module: {guest_wasm['hostile-http-denied']}
    on: [{{http: {{methods: [POST]}}}}]
    allow: {{http: ["http://127.0.0.1:9"]}}
    config: {{url: "http://127.0.0.1:9/"}}
    retry: {{attempts: 3, initial: 100ms, max: 200ms}}
""", database_url=database_url)
    with ServerThread(runtime, Options(workers=1, poll_interval=0.05, webhook_secret=SECRET)) as srv:
        response = requests.post(f"{srv.base}/flows/fetch", data=b"{}", timeout=20)
        metrics = requests.get(f"{srv.base}/metrics", timeout=10).text
    assert response.status_code == 500
    assert response.json()["status"] == "upstream"
    # Filed as the worker files it, but tried once: its caller waited for this answer.
    assert scalar(runtime.db, "SELECT state || ':' || status || ':' || attempt FROM runs") == "dead:upstream:1"
    assert "after upstream failure" in scalar(runtime.db, "SELECT error FROM runs")
    assert scalar(runtime.db, "SELECT status FROM attempts") == "upstream"
    assert 'wasmflow_runs_total{flow="fetch",status="upstream"} 1.0' in metrics


def claimed(flow: str, trigger: str = "github") -> ClaimedRun:
    return ClaimedRun(id="r1", flow=flow, attempt=1, max_attempts=3, trigger=trigger, event_id="e1",
                      event=Event(name="push", body=b"{}", headers={}, idempotency_key="r1", trigger=trigger))


def test_execute_files_a_vanished_flow_invalid_and_a_host_failure_upstream(tmp_path: Path, make_runtime) -> None:
    write_wat(tmp_path / "ok.wasm", OK_WAT)
    runtime = make_runtime(tmp_path, """
flows:
  - name: ok
    module: ok.wasm
    retry: {attempts: 4}
""")
    gone = execute(runtime, claimed("gone"))
    assert gone.status is Status.INVALID and "no longer in flows.yaml" in (gone.result.error or "")
    done = execute(runtime, claimed("ok"))
    assert done.status is Status.OK and done.retry.attempts == 4
    assert execute(runtime, claimed("ok", trigger="http")).retry.attempts == 1
    runtime.engine_for = None  # type: ignore[assignment]  # the host breaks around the run
    broken = execute(runtime, claimed("ok"))
    assert broken.status is Status.UPSTREAM and (broken.result.error or "").startswith("host error: ")


class InterruptedOnce(Runtime):
    """A real Runtime whose first run is interrupted the way Ctrl-C interrupts a process."""

    interrupted = 0

    def run(self, *args: Any, **kw: Any) -> RunResult:
        if not self.interrupted:
            self.interrupted += 1
            raise KeyboardInterrupt
        return super().run(*args, **kw)


def test_an_interrupted_run_is_given_back_not_filed_upstream(tmp_path: Path) -> None:
    write_wat(tmp_path / "ok.wasm", OK_WAT)
    plain = build_runtime(tmp_path, "flows:\n  - name: ok\n    module: ok.wasm\n")
    plain.close()
    runtime = InterruptedOnce(plain.flows, tmp_path, database_url=f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with runtime.db.begin() as conn:
            record_event(conn, NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                                        runs=[NewRun(flow="ok", trigger="github", max_attempts=3)]))
        dispatcher = Dispatcher(runtime, Queue(runtime.db, "w"), concurrency=1, poll_interval=0.05)
        dispatcher.start()
        try:
            wait_until(lambda: scalar(runtime.db, "SELECT state FROM runs") == "done")
        finally:
            dispatcher.stop(grace=5)
        assert runtime.interrupted == 1
        # Released (its attempt given back), then run to the end; never counted as an upstream failure.
        assert scalar(runtime.db, "SELECT status || ':' || attempt || ':' || executions FROM runs") == "ok:1:2"
        assert scalar(runtime.db, "SELECT group_concat(status, ',') FROM attempts") == "released,ok"
        assert dispatcher.in_flight == 0
    finally:
        runtime.close()


def test_an_http_run_given_back_is_filed_lost_not_queued(tmp_path: Path, database_url: str) -> None:
    db = dbmod.open_database(database_url)
    try:
        q = Queue(db, "ingress")
        with db.begin() as conn:
            recorded = record_event(conn, NewEvent(
                source="http", name="http", headers={}, body=b"", status="accepted",
                runs=[NewRun(flow="f", trigger="http", state="running", lease_owner="ingress",
                             lease_expires_at=time.time() + 30)]))
        assert q.release(list(recorded.run_ids)) == 1
        assert scalar(db, "SELECT state || ':' || status || ':' || attempt FROM runs") == "dead:lost:1"
        assert scalar(db, "SELECT status FROM attempts") == "lost"
        assert q.claim(5) == []  # nobody runs it again for a caller that is gone
    finally:
        db.dispose()


# --- decisions on exception types, not on their text ---------------------------------------------------

def test_a_github_request_that_runs_out_of_time_is_told_from_a_refused_one_by_type() -> None:
    import socket

    from wasmflow.host_functions.github import is_timeout

    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(requests.RequestException) as slow:
            requests.get(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.2)
        closed = silent.getsockname()[1]
    with pytest.raises(requests.RequestException) as refused:
        requests.get(f"http://127.0.0.1:{closed}/", timeout=5)  # nothing listens there any more
    assert is_timeout(slow.value)
    assert not is_timeout(refused.value)
    assert is_timeout(requests.ConnectionError(__import__("urllib3").exceptions.ReadTimeoutError(None, "/", "read")))
    assert not is_timeout(ValueError("the read timed out"))  # the words alone decide nothing


def test_a_dispatcher_loop_survives_a_failure_that_is_not_the_database(tmp_path: Path, make_runtime, caplog,
                                                                       monkeypatch) -> None:
    """A claim, a batch of results and a lease round that fail with something other than a database
    error (a bug, a value no one expected) are logged with their traceback and retried: the loop's
    thread goes on, and every run completes once. Before, such a failure ended the thread, and the
    worker kept runs it would never finish."""
    from wasmflow.platform.metrics import Metrics

    flows = f"flows:\n  - name: ok\n    module: {write_wat(tmp_path / 'ok.wasm', OK_WAT)}\n"
    runtime = make_runtime(tmp_path / "app", flows)
    queue = Queue(runtime.db, "w-faults")
    faults = {"claim": 1, "finish_many": 1, "recover_expired": 1}

    def failing_once(name: str) -> None:
        real = getattr(queue, name)

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            if faults[name]:
                faults[name] -= 1
                raise ValueError(f"injected failure of {name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(queue, name, call)

    for name in faults:
        failing_once(name)
    with runtime.db.begin() as conn:
        for _ in range(20):
            record_event(conn, NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                                        runs=[NewRun(flow="ok", trigger="github")]))
    caplog.set_level(logging.WARNING, logger="wasmflow.worker")
    dispatcher = Dispatcher(runtime, queue, Metrics(), concurrency=2, poll_interval=0.05)
    dispatcher.maintenance_interval = 0.05
    dispatcher.start()
    try:
        wait_until(lambda: scalar(runtime.db, "SELECT count(*) FROM runs WHERE state = 'done'") == 20
                   and not any(faults.values()), timeout=60, interval=0.05)
    finally:
        dispatcher.stop(grace=5)
    assert scalar(runtime.db, "SELECT max(executions) FROM runs") == 1
    logged = [r for r in caplog.records if r.exc_info and "injected failure" in str(r.exc_info[1])]
    assert {str(r.exc_info[1]).split()[-1] for r in logged} == set(faults)
