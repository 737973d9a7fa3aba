"""The console's tests share this: a real server with flows that succeed, trap and spin, and a
logged-in `requests` session (token in, session cookie and CSRF token out)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest
import requests

from platform_support import LOOP_WAT, OK_WAT, SECRET, TRAP_WAT, ServerThread, write_wat
from wasmflow.platform.app import Options

TOKEN = "console-test-token-0123456789abcdef"

FLOWS = """
flows:
  - name: ok
    module: {ok}
    on:
      - github: {{events: [issues, pull_request]}}
      - http: {{methods: [POST]}}
  - name: broken
    module: {trap}
    retry: {{attempts: 1}}
    on:
      - github: {{events: [push]}}
  - name: spin
    module: {loop}
    retry: {{attempts: 1}}
    limits: {{timeout: 60}}
    on:
      - github: {{events: [workflow_run]}}
"""


def flows_yaml(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return FLOWS.format(ok=write_wat(directory / "ok.wasm", OK_WAT), trap=write_wat(directory / "trap.wasm", TRAP_WAT),
                        loop=write_wat(directory / "loop.wasm", LOOP_WAT))


@pytest.fixture
def console_server(tmp_path: Path, make_runtime) -> Iterator[ServerThread]:
    """A real platform (one run slot, so a spinning run keeps the next one queued) with the console."""
    runtime = make_runtime(tmp_path / "app", flows_yaml(tmp_path / "wasm"))
    options = Options(workers=1, poll_interval=0.05, webhook_secret=SECRET, console_token=TOKEN, grace_seconds=1)
    with ServerThread(runtime, options) as srv:
        yield srv


def login(base: str, token: str = TOKEN) -> tuple[requests.Session, str]:
    """Log in with the token; returns the session (cookie set) and the page's CSRF token."""
    session = requests.Session()
    resp = session.post(f"{base}/login", data={"token": token, "next": "/runs"}, timeout=10)
    assert resp.status_code == 200 and resp.url.endswith("/runs"), resp.status_code
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', resp.text)
    assert found, "the page carries no CSRF token"
    return session, found.group(1)


def seed_runs(db, n: int, start: float = 1_700_000_000.0, same_time_every: int = 1) -> list[str]:  # type: ignore[no-untyped-def]
    """Insert `n` events with one run each straight into the store (states, flows, repos and triggers
    varied); `same_time_every` > 1 gives that many runs the same created_at (keyset ties). Returns run ids,
    oldest first."""
    import json

    from wasmflow.storage.schema import events_table, runs_table

    states = [("done", "ok")] * 8 + [("dead", "trap"), ("queued", None)]
    events, runs = [], []
    for i in range(n):
        ts = start + (i // same_time_every)
        state, status = states[i % len(states)]
        event_id, run_id = f"e{i:015d}", f"r{i:015d}"
        events.append(dict(id=event_id, source="github", name="issues", action="opened", repo=f"acme/r{i % 7}",
                           dedupe_key=f"d{i}", delivery_id=f"d{i}", headers=json.dumps({"x-github-event": "issues"}),
                           body=b"{}", received_at=ts, status="accepted", runs_created=1, note=None))
        runs.append(dict(id=run_id, event_id=event_id, flow=f"f{i % 3}", seq=0, trigger=("github", "schedule")[i % 2],
                         idempotency_key=None, state=state, status=status, attempt=1, executions=1, max_attempts=1,
                         created_at=ts, available_at=ts, lease_expiries=0))
    with db.begin() as conn:
        for chunk in range(0, n, 5000):
            conn.execute(events_table.insert(), events[chunk:chunk + 5000])
            conn.execute(runs_table.insert(), runs[chunk:chunk + 5000])
    return [r["id"] for r in runs]
