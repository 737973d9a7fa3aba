"""Cancel latency: from the cancel request to the stopped guest, on both engines, against the deadline.

Two measurements, each the median (and max) of `--repeat` runs of a guest that loops forever:

- engine: a `CancelSignal` set from another thread while the guest loops -> `run` returns `cancelled`.
  The baseline, measured in the same run with the same guest, is how long after its deadline the same
  loop stops (`timeout`): a cancel uses the deadline's interrupt, so the two should be alike, and both
  within a few of the engine's interrupt periods (wasmtime: the epoch tick; WasmEdge: the wait slice of
  a cancellable run), printed as the reference.
- dispatcher: `Queue.cancel` from another queue handle (what `wasmflow cancel` and the console do) ->
  the run stored `cancelled`, through a real Dispatcher on SQLite (the worker polls the cancel marks) and,
  with --postgres or $WASMFLOW_TEST_POSTGRES_URL, on PostgreSQL (NOTIFY wakes the worker).

    .venv/bin/python bench/concurrency.py [--repeat 10] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import sqlalchemy as sa
import wasmtime
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmflow.engine import wasmedge_capi  # noqa: E402
from wasmflow.engine.wasmedge_engine import CANCEL_SLICE_MS  # noqa: E402
from wasmflow.engine.wasmtime_engine import EPOCH_MS  # noqa: E402
from wasmflow.flows.loader import load_flows  # noqa: E402
from wasmflow.host_functions.spec import CancelSignal, Event  # noqa: E402
from wasmflow.platform.cancel import PG_POLL_SECONDS, POLL_SECONDS  # noqa: E402
from wasmflow.platform.metrics import Metrics  # noqa: E402
from wasmflow.platform.queue import Queue  # noqa: E402
from wasmflow.platform.store import NewEvent, NewRun, record_event  # noqa: E402
from wasmflow.platform.worker import Dispatcher  # noqa: E402
from wasmflow.runtime import Runtime  # noqa: E402

LOOP_WAT = '(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'
FLOWS = "flows:\n  - name: spin\n    module: spin.wasm\n    limits: {{timeout: {timeout}}}\n"


def runtime(directory: Path, engine: str, timeout: str, database_url: Optional[str] = None) -> Runtime:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spin.wasm").write_bytes(wasmtime.wat2wasm(LOOP_WAT))
    (directory / "flows.yaml").write_text(FLOWS.format(timeout=timeout))
    loaded = load_flows(directory / "flows.yaml")
    return Runtime(loaded.file, loaded.base_dir, database_url=database_url or f"sqlite:///{directory / 'state.db'}",
                   engine_override=engine)


def engine_cancel(rt: Runtime, after: float) -> float:
    """Seconds from setting the signal to `run` returning."""
    signal = CancelSignal()
    threading.Timer(after, signal.cancel, ("cancelled by bench",)).start()
    result = rt.run("spin", Event(name="manual"), cancel=signal)
    stopped = time.monotonic()
    assert result.status.value == "cancelled", result.error
    assert signal.at is not None
    return stopped - signal.at


def deadline_overshoot(rt: Runtime, timeout: float) -> float:
    """Seconds past the deadline until `run` returns `timeout` (a cancellable run, as the platform's are)."""
    started = time.monotonic()
    result = rt.run("spin", Event(name="manual"), cancel=CancelSignal())
    assert result.status.value == "timeout", result.error
    return time.monotonic() - started - timeout


def dispatcher_cancel(rt: Runtime, repeat: int) -> list[float]:
    """Seconds from `Queue.cancel` (another handle) to the run stored `cancelled`, through a Dispatcher."""
    d = Dispatcher(rt, Queue(rt.db, "bench", lease_seconds=30), Metrics(), concurrency=1, poll_interval=0.05)
    d.start()
    other = Queue(rt.db, "canceller")
    out = []
    try:
        for _ in range(repeat):
            with rt.db.begin() as conn:
                (run_id,) = record_event(conn, NewEvent(source="manual", name="manual", headers={}, body=b"{}",
                                                        status="accepted", runs=[NewRun(flow="spin", trigger="manual")])).run_ids
            d.wake()
            _wait(lambda: _state(rt.db, run_id) == "running")
            time.sleep(0.1)  # the guest is looping
            asked = time.time()
            assert other.cancel(run_id, by="bench").outcome == "cancelling"
            _wait(lambda: _state(rt.db, run_id) == "done")
            with rt.db.connect() as conn:
                finished = conn.execute(sa.text("SELECT finished_at FROM runs WHERE id = :i"), {"i": run_id}).scalar()
            out.append(finished - asked)
    finally:
        d.stop(grace=5)
    return out


def _state(db: sa.Engine, run_id: str) -> str:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT state FROM runs WHERE id = :i"), {"i": run_id}).scalar()


def _wait(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("bench: a run did not reach the expected state within 30 s")
        time.sleep(0.002)


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} (max {max(values) * 1000:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--postgres", default=os.environ.get("WASMFLOW_TEST_POSTGRES_URL"))
    args = parser.parse_args()
    console = Console()
    engines = ["wasmtime"]
    try:
        wasmedge_capi.load()
        engines.append("wasmedge")
    except wasmedge_capi.WasmEdgeUnavailable as exc:
        console.print(f"[dim]WasmEdge not measured: {exc}[/dim]")
    period = {"wasmtime": EPOCH_MS, "wasmedge": CANCEL_SLICE_MS}
    table = Table(title="cancel latency: request -> stopped guest (ms, median of "
                        f"{args.repeat}; a looping guest)")
    for column in ("engine", "interrupt period", "deadline overshoot (baseline)", "cancel -> stopped", "ratio"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            rt = runtime(Path(tmp) / engine, engine, "300ms")
            try:
                rt.run("spin", Event(name="manual"), cancel=CancelSignal())  # compile and warm up
                baseline = [deadline_overshoot(rt, 0.3) for _ in range(args.repeat)]
            finally:
                rt.close()
            rt = runtime(Path(tmp) / f"{engine}-long", engine, "60s")
            try:
                warm = CancelSignal()
                warm.cancel("warm-up")
                rt.run("spin", Event(name="manual"), cancel=warm)
                cancel = [engine_cancel(rt, 0.1) for _ in range(args.repeat)]
            finally:
                rt.close()
            table.add_row(engine, f"{period[engine]}", ms(baseline), ms(cancel),
                          f"{statistics.median(cancel) / max(statistics.median(baseline), 1e-6):.2f}x")
        console.print(table)

        stores = [("SQLite", None, f"poll {POLL_SECONDS * 1000:.0f} ms")]
        if args.postgres:
            stores.append(("PostgreSQL", args.postgres, f"NOTIFY (poll {PG_POLL_SECONDS:g} s behind it)"))
        end = Table(title=f"dispatcher: Queue.cancel from another handle -> run stored cancelled (ms, median of {args.repeat})")
        for column in ("store", "how the worker hears", "engine", "cancel -> stored"):
            end.add_column(column, justify="right" if column == "cancel -> stored" else "left")
        for name, url, how in stores:
            for engine in engines:
                database_url = url
                schema = None
                if url:
                    schema = f"bench_{uuid.uuid4().hex[:8]}"
                    admin = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
                    with admin.begin() as conn:
                        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
                    sep = "&" if "?" in url else "?"
                    database_url = f"{url}{sep}options=-csearch_path%3D{schema}"
                rt = runtime(Path(tmp) / f"{name}-{engine}", engine, "60s", database_url)
                try:
                    end.add_row(name, how, engine, ms(dispatcher_cancel(rt, args.repeat)))
                finally:
                    rt.close()
                    if schema:
                        with admin.begin() as conn:
                            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
                        admin.dispose()
        console.print(end)


if __name__ == "__main__":
    main()
