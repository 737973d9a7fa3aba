"""Shared pieces of the control-plane tests: small WAT guests, flows.yaml set-ups, a real server on a
thread, a real `wasmflow` subprocess, and signed deliveries. Fixtures (`pg_url`, `make_runtime`) live in
conftest.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import pytest
import requests
import sqlalchemy as sa

from guest_support import write_wat  # noqa: F401  (re-exported: the control-plane tests import it from here)
from wasmflow.flows.loader import load_flows
from wasmflow import storage as dbmod
from wasmflow.flows.model import FlowsFile
from wasmflow.platform.app import Options, Platform, serve
from wasmflow.runtime import Runtime

SECRET = "test-webhook-secret"

# Guests written in WAT: each does one precise thing the control plane must react to.
TRAP_WAT = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'
LOOP_WAT = '(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'


def busy_wat(iterations: int) -> str:
    """A guest that counts to `iterations` and succeeds: CPU work whose length the caller picks."""
    return f"""(module (memory (export "memory") 1)
 (func (export "_start") (local $i i32)
  (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
           (br_if $l (i32.lt_u (local.get $i) (i32.const {iterations}))))))"""
OK_WAT = """(module
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 0) "{\\"ok\\":true}")
 (func (export "_start") (drop (call $out (i32.const 0) (i32.const 11)))))"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_runtime(directory: Path, flows: "str | FlowsFile", database_url: Optional[str] = None,
                  engine: Optional[str] = None) -> Runtime:
    """A Runtime over `flows`: flows.yaml text (written into `directory`, SQLite there unless
    `database_url`) or a FlowsFile (with `directory` as its base). Tests take the `make_runtime` fixture,
    which closes what this builds."""
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(flows, FlowsFile):
        return Runtime(flows, directory, database_url=database_url, engine_override=engine)
    (directory / "flows.yaml").write_text(flows)
    loaded = load_flows(directory / "flows.yaml")
    return Runtime(loaded.file, loaded.base_dir, database_url=database_url or f"sqlite:///{directory / 'state.db'}",
                   engine_override=engine)


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

        try:
            self._loop.run_until_complete(main())
        finally:  # its default executor's threads (platform.stop ran on one) end with it
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

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


class WasmflowProcess(subprocess.Popen):
    """A real `wasmflow <args> --flows directory/flows.yaml` process, its output appended to `directory/log_name`.

    `database_url` becomes WASMFLOW_DATABASE_URL (any inherited one is dropped); GITHUB_WEBHOOK_SECRET is
    the tests' SECRET. Every one started is killed after its test if it still runs (see conftest.py), so a
    failing test leaves no server behind.
    """

    running: ClassVar[set["WasmflowProcess"]] = set()

    def __init__(self, directory: Path, args: Sequence[str], *, database_url: Optional[str] = None,
                 log_name: str = "wasmflow.log") -> None:
        env = {**os.environ, "GITHUB_WEBHOOK_SECRET": SECRET}
        env.pop("WASMFLOW_DATABASE_URL", None)
        if database_url:
            env["WASMFLOW_DATABASE_URL"] = database_url
        self.log_path = directory / log_name
        with open(self.log_path, "ab") as log:
            super().__init__([sys.executable, "-m", "wasmflow.cli", *args, "--flows", str(directory / "flows.yaml")],
                             stdout=log, stderr=log, env=env, cwd=directory)
        WasmflowProcess.running.add(self)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, port: int, timeout: float = 60) -> str:
        """Wait until /healthz on `port` answers 200; returns the base URL. Fails with the log if it exits."""
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert self.poll() is None, self.log()
            try:
                return requests.get(f"{base}/healthz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(healthy, timeout=timeout, interval=0.1)
        return base

    def wait_log(self, text: str, timeout: float = 60) -> None:
        """Wait until the log holds `text` (e.g. the line a worker prints once started)."""
        wait_until(lambda: text in self.log(), timeout=timeout, interval=0.1)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL if it is still there after `timeout` s; returns the exit status (-9 when killed)."""
        if self.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.wait()
        WasmflowProcess.running.discard(self)
        return self.returncode

    @classmethod
    def kill_leftovers(cls) -> None:
        for proc in list(cls.running):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            cls.running.discard(proc)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """The store on SQLite and on PostgreSQL (a schema of its own): each test using it runs on both."""
    if request.param == "sqlite":
        engine = dbmod.open_database(f"sqlite:///{tmp_path / 'q.db'}")
    else:
        engine = dbmod.open_database(request.getfixturevalue("pg_url"))
    yield engine
    engine.dispose()


class Clock:
    """A settable clock for the queue (`queue.now`): lease expiry and backoff without sleeping."""

    def __init__(self) -> None:
        self.now = time.time() + 1  # after the runs the test enqueues (their available_at is the wall clock)

    def __call__(self) -> float:
        return self.now
