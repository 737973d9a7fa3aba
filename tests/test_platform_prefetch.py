"""How many runs a worker holds follows the runs' length (`Dispatcher.capacity`): short runs are claimed
several per thread at once (fewer, larger claims), long ones one waiting per thread (none held back in
one worker while another idles). Real guests, a real SQLite queue; a claim's size is read from the
attempts table, where one claim stamps all its runs with one `claimed_at`."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from wasmflow.platform.metrics import Metrics
from wasmflow.platform.queue import Queue
from wasmflow.platform.store import NewEvent, NewRun, record_event
from wasmflow.platform.worker import PREFETCH_SECONDS, Dispatcher

from guest_support import write_wat
from platform_support import OK_WAT, busy_wat, scalar, wait_until

THREADS = 2


def run_all(runtime, flow: str, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Queue `n` runs of `flow`, let a dispatcher with THREADS threads do them; the sizes of its claims."""
    with runtime.db.begin() as conn:
        for _ in range(n):
            record_event(conn, NewEvent(source="github", name="push", headers={}, body=b"{}", status="accepted",
                                        runs=[NewRun(flow=flow, trigger="github")]))
    dispatcher = Dispatcher(runtime, Queue(runtime.db, f"w-{flow}"), Metrics(), concurrency=THREADS,
                            poll_interval=0.05)
    dispatcher.start()
    try:
        wait_until(lambda: scalar(runtime.db, f"SELECT count(*) FROM runs WHERE flow = '{flow}' AND state = 'done'")
                   == n, timeout=120, interval=0.05)
    finally:
        dispatcher.stop(grace=5)
    with runtime.db.connect() as conn:
        return [row[0] for row in conn.execute(sa.text(
            "SELECT count(*) FROM attempts a JOIN runs r ON r.id = a.run_id WHERE r.flow = :f GROUP BY a.claimed_at"),
            {"f": flow})]


def test_short_runs_are_claimed_several_per_thread_and_long_ones_one(tmp_path: Path, make_runtime) -> None:
    write_wat(tmp_path / "quick.wasm", OK_WAT)
    # About 230 ms a run here: past PREFETCH_SECONDS on a machine twice as fast (asserted below).
    write_wat(tmp_path / "long.wasm", busy_wat(1_000_000_000))
    runtime = make_runtime(tmp_path, """
flows:
  - name: quick
    module: quick.wasm
  - name: long
    module: long.wasm
    limits: {timeout: 60s}
""")
    quick = run_all(runtime, "quick", 80)
    assert sum(quick) == 80
    assert max(quick) > 2 * THREADS, f"short runs were claimed {quick}: no claim took more than 2 per thread"
    long = run_all(runtime, "long", 8)
    assert sum(long) == 8
    assert max(long) <= 2 * THREADS, f"long runs were claimed {long}: more than one waiting per thread"
    shortest = scalar(runtime.db, "SELECT min(duration_ms) FROM runs WHERE flow = 'long'")
    assert shortest > PREFETCH_SECONDS * 1000  # they were long runs indeed
