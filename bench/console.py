"""Console runs list: page load time at 100,000 runs against the same page at 1,000, SQLite and PostgreSQL.

A real `wasmflow up` server (the Platform's aiohttp app, console mounted, no workers) serves `GET /runs`
(the HTML page, rendered from the keyset query) over loopback; each case is the median of `--repeat`
requests after a warm-up. The baseline is the same page over a store of 1,000 runs, measured in the same
run: with the schema version 4 indexes a page's cost should not grow with the store.

    .venv/bin/python bench/console.py [--runs 100000] [--repeat 30] [--postgres URL]

PostgreSQL is measured when --postgres or $WASMFLOW_TEST_POSTGRES_URL names a server (a schema of its own
is created there and dropped after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import requests
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # platform_support.ServerThread: the tests' served platform

from wasmflow.console.queries import encode_cursor  # noqa: E402
from wasmflow.flows.model import FlowsFile  # noqa: E402
from platform_support import ServerThread  # noqa: E402
from wasmflow.platform.app import Options  # noqa: E402
from wasmflow.runtime import Runtime  # noqa: E402
from wasmflow.storage.schema import events_table, runs_table  # noqa: E402

TOKEN = "bench-console-token-" + uuid.uuid4().hex
START = 1_700_000_000.0


def seed(db: sa.Engine, n: int) -> None:
    """`n` events with a run each: 80% done, 10% dead, 10% queued; 3 flows, 7 repositories, 2 triggers."""
    states = [("done", "ok")] * 8 + [("dead", "trap"), ("queued", None)]
    for chunk in range(0, n, 10_000):
        events, runs = [], []
        for i in range(chunk, min(n, chunk + 10_000)):
            state, status = states[i % 10]
            events.append(dict(id=f"e{i:015d}", source="github", name="issues", action="opened", repo=f"acme/r{i % 7}",
                               dedupe_key=f"d{i}", delivery_id=f"d{i}", headers=json.dumps({"x-github-event": "issues"}),
                               body=b"{}", received_at=START + i, status="accepted", runs_created=1, note=None))
            runs.append(dict(id=f"r{i:015d}", event_id=f"e{i:015d}", flow=f"f{i % 3}", seq=0,
                             trigger=("github", "schedule")[i % 2], state=state, status=status, attempt=1,
                             executions=1, max_attempts=1, created_at=START + i, available_at=START + i,
                             lease_expiries=0, error="trap: unreachable" if state == "dead" else None))
        with db.begin() as conn:
            conn.execute(events_table.insert(), events)
            conn.execute(runs_table.insert(), runs)
    with db.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()


def timed(session: requests.Session, url: str, repeat: int) -> float:
    """Median milliseconds of `repeat` GETs (after two warm-ups); every answer must be a full page."""
    for _ in range(2):
        assert session.get(url, timeout=60).status_code == 200
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        resp = session.get(url, timeout=60)
        samples.append((time.perf_counter() - t0) * 1000)
        assert resp.status_code == 200 and "runs-body" in resp.text, resp.status_code
    return statistics.median(samples)


def cases(n: int) -> list[tuple[str, str]]:
    middle = START + n // 2
    return [
        ("newest 50", "/runs"),
        ("state=dead", "/runs?state=dead"),
        ("flow=f1", "/runs?flow=f1"),
        ("repo=acme/r3", "/runs?repo=acme%2Fr3"),
        ("status=trap, trigger", "/runs?status=trap&trigger=github"),
        ("page in the middle", "/runs?cursor=" + encode_cursor(middle, f"r{n // 2:015d}")),
    ]


def measure(url: str, n: int, repeat: int, directory: Path) -> dict[str, float]:
    from wasmflow.storage import open_database

    db = open_database(url)
    seed(db, n)
    db.dispose()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    # The platform's app with the console mounted, on a thread; no dispatcher, no scheduler.
    runtime = Runtime(FlowsFile(), directory, database_url=url)
    options = Options(workers=1, dispatch=False, scheduler=False, console_token=TOKEN)
    try:
        with ServerThread(runtime, options) as server:
            return {name: timed(session, server.base + path, repeat) for name, path in cases(n)}
    finally:
        runtime.close()


def postgres_schema(base_url: str) -> tuple[str, Callable[[], None]]:
    """A fresh schema on the server for one measurement, and how to drop it."""
    name = "bench_console_" + uuid.uuid4().hex[:8]
    admin = sa.create_engine(base_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base_url else "?"
    url = f"{base_url}{sep}options=-csearch_path%3D{name}"

    def drop() -> None:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {name} CASCADE")
        admin.dispose()

    return url, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--postgres", default=os.environ.get("WASMFLOW_TEST_POSTGRES_URL"))
    args = parser.parse_args()
    console = Console()
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ["sqlite"] + (["postgresql"] if args.postgres else []):
            for n in (args.baseline, args.runs):
                directory = Path(tmp) / f"{backend}-{n}"
                directory.mkdir()
                console.print(f"[dim]{backend}: seeding {n:,} runs...[/dim]")
                if backend == "sqlite":
                    results[(backend, n)] = measure(f"sqlite:///{directory / 'state.db'}", n, args.repeat, directory)
                else:
                    url, drop = postgres_schema(args.postgres)
                    try:
                        results[(backend, n)] = measure(url, n, args.repeat, directory)
                    finally:
                        drop()
    table = Table(title=f"GET /runs (HTML page, 50 rows), median of {args.repeat}, ms")
    for column in ("store", "page", f"{args.baseline:,} runs", f"{args.runs:,} runs", "ratio"):
        table.add_column(column, justify="left" if column in ("store", "page") else "right")
    for backend in ["sqlite", "postgresql"]:
        if (backend, args.runs) not in results:
            continue
        small, big = results[(backend, args.baseline)], results[(backend, args.runs)]
        for name in small:
            table.add_row(backend, name, f"{small[name]:.2f}", f"{big[name]:.2f}", f"{big[name] / small[name]:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
