"""Crash safety: a process killed with SIGKILL mid-stream loses no acknowledged delivery and leaves no run
completed twice or not at all.

1,000 signed deliveries go to a real `wasmflow up` from 16 senders that, like GitHub's redelivery, send
again whatever was not acknowledged. Part-way through, a process is SIGKILLed and started again:
- SQLite: `wasmflow up` itself (ingress, queue and workers in one process); its restart queues the runs
  it left running at once.
- PostgreSQL: the `wasmflow worker` executing the runs (ingress stays up in `up --workers 0`); the runs
  it held come back when their leases expire.
Afterwards every delivery must be stored once, with exactly one completed run per flow that matches it.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Optional

import requests
import sqlalchemy as sa

from wasmflow.storage import open_database

from platform_support import WasmflowProcess, deliver, free_port, wait_until

DELIVERIES = 1000
SENDERS = 16
KILL_AFTER = 350

FLOWS = """
flows:
  - name: hello
    module: {hello}
    allow: {{kv: true}}
    on: [{{github: {{events: ["*"]}}}}]
  - name: pr-only
    module: {hello}
    allow: {{kv: true}}
    on: [{{github: {{events: [pull_request.opened], repos: ["acme/*"]}}}}]
"""


def start_up(directory: Path, port: int, workers: int = 4, database_url: Optional[str] = None) -> WasmflowProcess:
    proc = WasmflowProcess(directory, ["up", "--port", str(port), "--workers", str(workers), "--lease", "10",
                                       "--log-level", "warning"], database_url=database_url, log_name="up.log")
    proc.wait_healthy(port)
    return proc


def start_worker(directory: Path, database_url: str) -> WasmflowProcess:
    return WasmflowProcess(directory, ["worker", "--workers", "4", "--lease", "2", "--log-level", "warning"],
                           database_url=database_url, log_name="worker.log")


def payload(i: int) -> tuple[str, dict]:
    if i % 3 == 0:
        return "pull_request", {"action": "opened", "number": i, "repository": {"full_name": "acme/app"}}
    return "push", {"ref": "refs/heads/main", "n": i, "repository": {"full_name": "someone/else"}}


class Senders:
    """16 threads delivering 1,000 events, each sent again until it is acknowledged."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.acked: set[str] = set()
        self.refused = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(list(range(k, DELIVERIES, SENDERS)),))
                         for k in range(SENDERS)]

    def start(self) -> "Senders":
        for t in self._threads:
            t.start()
        return self

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=120)

    def _send(self, indices: list[int]) -> None:
        session = requests.Session()
        for i in indices:
            name, body = payload(i)
            while True:
                try:
                    resp = deliver(self.base, name, body, delivery=f"delivery-{i}", session=session, timeout=5)
                    if resp.status_code == 202:
                        break
                    assert resp.status_code == 503, resp.text
                except requests.RequestException:
                    with self._lock:
                        self.refused += 1
                    session = requests.Session()
                time.sleep(0.05)
            with self._lock:
                self.acked.add(f"delivery-{i}")


def assert_each_delivery_ran_once_per_flow(db: sa.Engine) -> dict[str, int]:
    def settled() -> bool:
        with db.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM runs WHERE state IN ('queued', 'running')")).scalar() == 0

    wait_until(settled, timeout=120, interval=0.2)
    with db.connect() as conn:
        events = conn.execute(sa.text("SELECT delivery_id, count(*) FROM events GROUP BY delivery_id")).all()
        runs = conn.execute(sa.text(
            "SELECT e.delivery_id, r.flow, r.state, count(*) FROM runs r JOIN events e ON e.id = r.event_id "
            "GROUP BY e.delivery_id, r.flow, r.state")).all()
        stats = dict(
            taken_again=conn.execute(sa.text("SELECT count(*) FROM runs WHERE attempt > 1")).scalar(),
            lease_expiries=conn.execute(sa.text("SELECT coalesce(sum(lease_expiries), 0) FROM runs")).scalar(),
            lost_attempts=conn.execute(sa.text("SELECT count(*) FROM attempts WHERE status = 'lost'")).scalar(),
        )
    assert len(events) == DELIVERIES and all(n == 1 for _, n in events)
    expected = {(f"delivery-{i}", "hello") for i in range(DELIVERIES)}
    expected |= {(f"delivery-{i}", "pr-only") for i in range(0, DELIVERIES, 3)}
    assert {(d, f) for d, f, _, _ in runs} == expected
    bad = [r for r in runs if r[2] != "done" or r[3] != 1]
    assert not bad, bad[:5]
    # every attempt cut short by the kill is accounted for as a lease taken back
    assert stats["lost_attempts"] == stats["lease_expiries"]
    return stats


def test_sqlite_up_killed_mid_stream_loses_nothing_and_completes_each_run_once(tmp_path, guest_wasm):
    (tmp_path / "flows.yaml").write_text(FLOWS.format(hello=guest_wasm["hello"]))
    port = free_port()
    proc = start_up(tmp_path, port)
    senders = Senders(f"http://127.0.0.1:{port}").start()
    try:
        wait_until(lambda: len(senders.acked) >= KILL_AFTER, timeout=60, interval=0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        acked_before_kill = len(senders.acked)
        time.sleep(0.5)  # senders meet a closed port meanwhile
        proc = start_up(tmp_path, port)
        senders.join()
        assert len(senders.acked) == DELIVERIES
        assert KILL_AFTER <= acked_before_kill < DELIVERIES, "the kill did not happen mid-stream"
        assert senders.refused > 0, "no sender noticed the crash"
        db = open_database(f"sqlite:///{tmp_path / '.wasmflow' / 'wasmflow.db'}")
        stats = assert_each_delivery_ran_once_per_flow(db)
        db.dispose()
        print(f"acked before kill {acked_before_kill}, connection failures {senders.refused}, {stats}")
    finally:
        proc.stop()


def test_postgres_worker_killed_mid_stream_its_runs_come_back_when_leases_expire(tmp_path, guest_wasm, pg_url):
    (tmp_path / "flows.yaml").write_text(FLOWS.format(hello=guest_wasm["hello"]))
    port = free_port()
    ingress = start_up(tmp_path, port, workers=0, database_url=pg_url)
    worker = start_worker(tmp_path, pg_url)
    db = open_database(pg_url)

    def done() -> int:
        with db.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM runs WHERE state = 'done'")).scalar()

    senders = Senders(f"http://127.0.0.1:{port}").start()
    try:
        wait_until(lambda: done() >= KILL_AFTER, timeout=60, interval=0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        done_before_kill = done()
        worker = start_worker(tmp_path, pg_url)
        senders.join()
        assert len(senders.acked) == DELIVERIES
        assert done_before_kill < DELIVERIES + DELIVERIES // 3, "the kill did not happen mid-stream"
        stats = assert_each_delivery_ran_once_per_flow(db)
        print(f"runs done before kill {done_before_kill}, {stats}")
    finally:
        worker.stop()
        ingress.stop()
        db.dispose()
