"""Graceful shutdown of `wasmflow up` on SIGTERM: runs in flight finish within the grace period, or are
released (queued again, the attempt not counted) when they would outlast it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import sqlalchemy as sa

from wasmflow.storage import open_database

from platform_support import LOOP_WAT, OK_WAT, WasmflowProcess, deliver, free_port, wait_until, write_wat

# Counts itself started (kv "started"), then about 0.5 s of work, then success.
SLOW_OK_WAT = """(module
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (import "wasmflow" "kv_increment" (func $incr (param i32 i32 i64 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 0) "done")
 (data (i32.const 16) "started")
 (func (export "_start") (local $i i32)
  (drop (call $incr (i32.const 16) (i32.const 7) (i64.const 1) (i32.const 32)))
  (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
           (br_if $l (i32.lt_u (local.get $i) (i32.const 400000000))))
  (drop (call $out (i32.const 0) (i32.const 4)))))"""

FLOWS = """
flows:
  - name: work
    module: {module}
    allow: {{kv: true}}
    limits: {{timeout: 30s}}
    on: [{{github: {{events: [push]}}}}]
"""


def serve(directory: Path, module: Path, grace: float) -> tuple[WasmflowProcess, str]:
    (directory / "flows.yaml").write_text(FLOWS.format(module=module))
    port = free_port()
    proc = WasmflowProcess(directory, ["up", "--port", str(port), "--workers", "2", "--grace", str(grace)],
                           log_name="up.log")
    return proc, proc.wait_healthy(port)


def rows(directory: Path) -> list[tuple]:
    db = open_database(f"sqlite:///{directory / '.wasmflow' / 'wasmflow.db'}")
    with db.connect() as conn:
        result = [tuple(r) for r in conn.execute(sa.text("SELECT state, status, attempt, lease_owner FROM runs")).all()]
    db.dispose()
    return result


def running(directory: Path, n: int) -> bool:
    return sum(1 for state, *_ in rows(directory) if state == "running") == n


def guests_started(directory: Path) -> int:
    """How many guests counted themselves started: a claimed run whose guest has not started yet is
    released by SIGTERM, so "running" in the store is not enough to expect a run to finish."""
    db = open_database(f"sqlite:///{directory / '.wasmflow' / 'wasmflow.db'}")
    with db.connect() as conn:
        value = conn.execute(sa.text("SELECT value FROM kv WHERE key = 'started'")).scalar()
    db.dispose()
    return int(bytes(value)) if value is not None else 0


def test_sigterm_lets_runs_in_flight_finish_within_the_grace_period(tmp_path):
    proc, base = serve(tmp_path, write_wat(tmp_path / "slow.wasm", SLOW_OK_WAT), grace=30)
    for _ in range(2):
        assert deliver(base, "push", {}).status_code == 202
    wait_until(lambda: guests_started(tmp_path) == 2, timeout=20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert rows(tmp_path) == [("done", "ok", 1, None), ("done", "ok", 1, None)]
    assert "stopped (0 runs released)" in (tmp_path / "up.log").read_text()


def test_sigterm_releases_runs_that_would_outlast_the_grace_period(tmp_path):
    proc, base = serve(tmp_path, write_wat(tmp_path / "loop.wasm", LOOP_WAT), grace=0.5)
    for _ in range(2):
        assert deliver(base, "push", {}).status_code == 202
    wait_until(lambda: running(tmp_path, 2), timeout=20)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert time.monotonic() - started < 10  # did not wait for the 30 s guest deadline
    # queued again for the next start, this attempt not counted, no lease held
    assert rows(tmp_path) == [("queued", None, 0, None), ("queued", None, 0, None)]


def test_released_runs_are_taken_by_the_next_start(tmp_path):
    proc, base = serve(tmp_path, write_wat(tmp_path / "loop.wasm", LOOP_WAT), grace=0.2)
    assert deliver(base, "push", {}).status_code == 202
    wait_until(lambda: running(tmp_path, 1), timeout=20)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    write_wat(tmp_path / "loop.wasm", OK_WAT)  # the fixed module is deployed
    proc, _ = serve(tmp_path, tmp_path / "loop.wasm", grace=5)
    try:
        wait_until(lambda: rows(tmp_path) == [("done", "ok", 1, None)], timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
