"""Shared pieces of the control-plane tests: small WAT guests, flows.yaml set-ups, a real server on a
thread, signed deliveries, and a PostgreSQL schema per test."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import requests
import sqlalchemy as sa
import wasmtime

from wasmflow.flows.loader import load_flows
from wasmflow.platform.app import Options, Platform, serve
from wasmflow.runtime import Runtime

SECRET = "test-webhook-secret"
PG_SKIP = "PostgreSQL not available (set WASMFLOW_TEST_POSTGRES_URL)"

# Guests written in WAT: each does one precise thing the control plane must react to.
TRAP_WAT = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'
LOOP_WAT = '(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'
OK_WAT = """(module
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 0) "{\\"ok\\":true}")
 (func (export "_start") (drop (call $out (i32.const 0) (i32.const 11)))))"""


def write_wat(path: Path, text: str) -> Path:
    path.write_bytes(wasmtime.wat2wasm(text))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_runtime(directory: Path, flows_yaml: str, database_url: Optional[str] = None) -> Runtime:
    """A Runtime over a flows.yaml written into `directory` (SQLite there unless `database_url`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "flows.yaml").write_text(flows_yaml)
    loaded = load_flows(directory / "flows.yaml")
    return Runtime(loaded.file, loaded.base_dir, database_url=database_url or f"sqlite:///{directory / 'state.db'}")


def signed(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(base: str, event: str, payload: Any, delivery: Optional[str] = None, secret: str = SECRET,
            session: Optional[requests.Session] = None, timeout: float = 10) -> requests.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
               "X-Hub-Signature-256": signed(body, secret), "Content-Type": "application/json"}
    return (session or requests).post(f"{base}/webhooks/github", data=body, headers=headers, timeout=timeout)


class ServerThread:
    """A real `Platform` served by aiohttp on 127.0.0.1 from a background thread."""

    def __init__(self, runtime: Runtime, options: Optional[Options] = None) -> None:
        self.platform = Platform(runtime, options or Options(workers=2, poll_interval=0.1))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._stop: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await serve(self.platform, "127.0.0.1", self.port, ready=lambda _: self._ready.set(), stop=self._stop)

        self._loop.run_until_complete(main())

    def __enter__(self) -> "ServerThread":
        self.platform.start()
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=40)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def scalar(db: sa.Engine, sql: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


@pytest.fixture
def pg_url() -> Any:
    """A PostgreSQL URL whose search_path is a schema of its own, dropped after the test."""
    base = os.environ.get("WASMFLOW_TEST_POSTGRES_URL")
    if not base:
        pytest.skip(PG_SKIP)
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text("SET LOCAL lock_timeout = '20s'"))  # a leaked connection fails the test, not hangs it
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()
