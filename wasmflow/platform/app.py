"""The platform assembled: ingress + scheduler + dispatcher over one Runtime, and how a process serves it.

`wasmflow up` builds a `Platform` with everything; `wasmflow worker` one without ingress. On SQLite the
process takes an exclusive lock beside the database file: SQLite is served by one process, so that process
is the scheduler, and any run another process left `running` is an orphan to queue again at start (no
need to wait for its lease). On PostgreSQL any number of processes share the queue, leases expire on their
own, and the scheduler is elected with an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from aiohttp import web

from wasmflow.console.auth import ConsoleAuth
from wasmflow.console.server import mount_console
from wasmflow.console.services import ConsoleServices
from wasmflow.console.setup import add_setup_routes
from wasmflow.platform.ack_first import ActivityFile, AckFirst
from wasmflow.platform.github_manifest import Registrar
from wasmflow.platform.ingress import DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_BODY, Ingress, error
from wasmflow.platform.metrics import Metrics
from wasmflow.platform.queue import Queue
from wasmflow.platform.scheduler import Election, PostgresElection, Scheduler
from wasmflow.platform.store import BatchWriter
from wasmflow.platform.worker import Dispatcher, worker_name
from wasmflow.runtime import Runtime

log = logging.getLogger("wasmflow.platform")

# In the state directory: when this machine's ingress last saw a delivery (platform/ack_first.py).
INGRESS_ACTIVITY = "ingress-activity"

RouteHook = Callable[[web.Application, Runtime], None]


class PlatformError(Exception):
    """The platform cannot start as asked (a second `up` on one SQLite file, `worker` on SQLite)."""


@dataclass
class Options:
    workers: int = 4  # runs executed at once by this process (and HTTP-triggered runs at once)
    lease_seconds: float = 30.0
    poll_interval: float = 0.5
    grace_seconds: float = 30.0  # SIGTERM: how long runs in flight may finish before they are released
    max_body: int = DEFAULT_MAX_BODY
    # A request's head must arrive within header_timeout of the connection opening (or of the previous
    # response on it), and its body within body_timeout of the head: slow and short clients are cut off.
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    scheduler: bool = True
    dispatch: bool = True
    webhook_secret: Optional[str] = None  # default: flows.yaml's github.webhook_secret, else $GITHUB_WEBHOOK_SECRET
    console: bool = True  # serve the web console (and its /api/) at / behind its login
    console_token: Optional[str] = None  # default: flows.yaml's console.token, else a one-time login token
    public_url: Optional[str] = None  # where GitHub reaches this server (/setup); default $WASMFLOW_PUBLIC_URL


class _Elected(Election):
    """SQLite: the process lock already makes this process the only one."""

    def try_acquire(self) -> bool:
        return True


def _sqlite_path(runtime: Runtime) -> Optional[Path]:
    url = runtime.db.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def webhook_secret(runtime: Runtime) -> Optional[str]:
    """flows.yaml's `github.webhook_secret`, else $GITHUB_WEBHOOK_SECRET (for flows without a GitHub App)."""
    github = getattr(runtime.flows, "github", None)
    if github is not None and github.webhook_secret:
        return str(github.webhook_secret)
    return os.environ.get("GITHUB_WEBHOOK_SECRET") or None


class Platform:
    def __init__(self, runtime: Runtime, options: Optional[Options] = None) -> None:
        self.runtime = runtime
        self.options = options or Options()
        self.db = runtime.db
        self.postgres = self.db.dialect.name == "postgresql"
        self.owner = worker_name()
        self.metrics = Metrics()
        with contextlib.suppress(KeyError, AttributeError):  # local LLM serving figures (issue 14)
            self.metrics.watch_models(runtime.host.capability("nn").registry.stats)
        self.queue = Queue(self.db, self.owner, lease_seconds=self.options.lease_seconds)
        self.dispatcher: Optional[Dispatcher] = None
        # Runs started here give way to the webhooks answered here, or by the ingress of this machine
        # when this process serves none (a `wasmflow worker` beside `up --workers 0`).
        self.ack_first = AckFirst(neighbour=ActivityFile(runtime.state_dir / INGRESS_ACTIVITY))
        if self.options.dispatch:
            self.dispatcher = Dispatcher(runtime, self.queue, self.metrics, concurrency=self.options.workers,
                                         poll_interval=self.options.poll_interval, yield_to=self.ack_first)
        wake = self.dispatcher.wake if self.dispatcher else None
        self.writer = BatchWriter(self.db, on_commit=wake, inline=self.db.dialect.name == "sqlite")
        self.scheduler = Scheduler(self.db, runtime.flows, self.metrics, on_enqueue=wake)
        self.run_pool = ThreadPoolExecutor(max_workers=max(2, self.options.workers), thread_name_prefix="wasmflow-http")
        self.db_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="wasmflow-db")
        self._stop = threading.Event()
        self._scheduler_thread: Optional[threading.Thread] = None
        self._lock_fd: Optional[int] = None
        self._checkpointer: Optional[threading.Thread] = None
        self._started = False
        console = getattr(runtime.flows, "console", None)
        self.console_auth = ConsoleAuth.create(self.options.console_token or getattr(console, "token", None))

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        path = _sqlite_path(self.runtime)
        if path is not None:
            self._take_process_lock(path)
            orphans = self.queue.recover_expired(orphans=True)
            if orphans:
                self.metrics.lease_expiries.inc(orphans)
                log.warning("queued again %d runs left running by a previous process", orphans)
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="wasmflow-checkpoint",
                                                  daemon=True)
            self._checkpointer.start()
        # Workers and HTTP triggers run flows: load the modules before the first event, off the serving path.
        threading.Thread(target=self._prepare, name="wasmflow-prepare", daemon=True).start()
        if self.dispatcher:
            self.dispatcher.start()
        if self.options.scheduler and self.scheduler.specs:
            election: Election = PostgresElection(self.db) if self.postgres else _Elected()
            self._scheduler_thread = threading.Thread(
                target=self.scheduler.run, args=(self._stop, election), name="wasmflow-scheduler", daemon=True)
            self._scheduler_thread.start()
        self._started = True

    def _prepare(self) -> None:
        for problem in self.runtime.prepare():
            log.warning("flow %s", problem)

    def _checkpoint_loop(self, interval: float = 0.2) -> None:
        """SQLite: copy the write-ahead log into the database often, from this thread.

        Left to itself SQLite checkpoints inside whichever commit finds the log over a size
        (`storage/engine.AUTOCHECKPOINT_PAGES`), and that commit (an acknowledgement waiting on it, often
        the event loop's own) stalls for the copy and its syncs: the 200 ms outliers in bench/ingress.py.
        A PASSIVE checkpoint here never blocks writers and keeps the log short enough that no commit has to.
        """
        while not self._stop.wait(interval):
            try:
                with self.db.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except Exception as exc:  # a busy database: next time
                log.debug("checkpoint skipped: %s", exc)

    def _take_process_lock(self, db_path: Path) -> None:
        lock_path = db_path.with_name(db_path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PlatformError(
                f"another wasmflow process serves {db_path} (lock {lock_path}); SQLite is served by one "
                "process: stop it, or use PostgreSQL (--database-url) for several") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def stop(self) -> int:
        """Stop the scheduler, finish or release runs in flight, flush the writer. Returns runs released."""
        self._stop.set()
        if self._scheduler_thread:
            self._scheduler_thread.join(timeout=5)
        released = self.dispatcher.stop(self.options.grace_seconds) if self.dispatcher else 0
        self.writer.close()
        self.ack_first.close()
        self.run_pool.shutdown(wait=False, cancel_futures=True)
        self.db_pool.shutdown(wait=False, cancel_futures=True)
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        return released

    # --- HTTP ----------------------------------------------------------------------------------------

    def create_app(self, extra_routes: Iterable[RouteHook] = ()) -> web.Application:
        """The aiohttp app: ingress routes, then every route hook (the OpenAI-compatible API, ...).

        A hook is `hook(app, runtime)`; `default_route_hooks()` lists the ones other areas provide.
        """
        app = web.Application(client_max_size=self.options.max_body + 1, middlewares=[_json_errors])
        self.ack_first.serve_ingress()
        ingress = Ingress(self.runtime, self.writer, self.queue, self.metrics, self.run_pool, self.db_pool,
                          self.options.webhook_secret or webhook_secret(self.runtime), self.options.max_body,
                          self.options.body_timeout, ack_first=self.ack_first)
        ingress.add_routes(app)
        for hook in extra_routes:
            hook(app, self.runtime)
        if self.options.console:
            mount_console(app, self.console_services(), self.console_auth)
            # /setup: the GitHub App in one click, behind the console's login (docs/github-app.md).
            add_setup_routes(app, Registrar(self.runtime.flows, self.runtime.state_dir,
                                            self.options.public_url or os.environ.get("WASMFLOW_PUBLIC_URL")))
        return app

    def console_services(self) -> ConsoleServices:
        """What the web console may read and do here: this store, these flows, replay and cancel."""
        from wasmflow.platform.queue import ReplayError, replay

        flows = self.runtime.flows
        transcript = None
        try:
            from wasmflow.platform.transcripts import load_transcript  # per-run host activity, where recorded

            def transcript(run_id: str) -> Optional[list[dict]]:  # type: ignore[misc]
                found = load_transcript(self.db, run_id)
                return found.activity() if found is not None else None
        except ImportError:
            pass
        models = None
        try:
            registry = self.runtime.host.capability("nn").registry
            models = registry.stats
        except (KeyError, AttributeError):
            pass
        counter = self.metrics.events_received

        def ingress_counts() -> dict[str, float]:
            totals: dict[str, float] = {}
            for metric in counter.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        outcome = sample.labels.get("outcome", "")
                        totals[outcome] = totals.get(outcome, 0.0) + sample.value
            return totals

        return ConsoleServices(
            db=self.db, flows=flows, base_dir=self.runtime.base_dir, engine=self.runtime.engine_override or flows.engine,
            replay=lambda ref: replay(self.db, ref, flows), replay_errors=(ReplayError,),
            cancel=self.queue.cancel if hasattr(self.queue, "cancel") else None,
            transcript=transcript, models=models, ingress_counts=ingress_counts)


def ops_app(platform: Platform) -> web.Application:
    """Only /healthz and /metrics: what a `wasmflow worker` serves (with --metrics-port) to be scraped."""
    app = web.Application(middlewares=[_json_errors])
    ingress = Ingress(platform.runtime, platform.writer, platform.queue, platform.metrics, platform.run_pool,
                      platform.db_pool, None)
    app.router.add_get("/healthz", ingress.healthz)
    app.router.add_get("/metrics", ingress.metrics_handler)
    return app


def default_route_hooks() -> list[RouteHook]:
    """Routes that other parts of wasmflow serve from the same server, when they are installed.

    This is the place to add more: each hook takes the app and the Runtime.
    """
    hooks: list[RouteHook] = []
    try:
        from wasmflow.wasi_nn.openai_api import add_openai_routes
    except ImportError:
        return hooks

    def openai_routes(app: web.Application, runtime: Runtime) -> None:
        try:
            registry = runtime.host.capability("nn").registry
        except KeyError:
            return  # no WASI-NN capability: no models to serve
        add_openai_routes(app, registry)

    hooks.append(openai_routes)
    return hooks


@web.middleware
async def _json_errors(request: web.Request, handler: Callable) -> web.StreamResponse:  # type: ignore[type-arg]
    """Unexpected exceptions become a JSON 500 (the traceback goes to the log, not to the client)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except RecursionError:  # a route parsing deep JSON from a client without a depth check (openai_api)
        return error(400, "the body nests arrays or objects too deeply")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error(500, "internal error")


async def serve(platform: Platform, host: str, port: int, ready: Optional[Callable[[int], None]] = None,
                extra_routes: Iterable[RouteHook] = (), stop: Optional[asyncio.Event] = None,
                app: Optional[web.Application] = None) -> None:
    """Serve until SIGTERM or SIGINT (or `stop` is set, when given: for a server on a thread), then shut
    down in order: stop accepting, finish requests, finish or release runs."""
    app = app if app is not None else platform.create_app(extra_routes)
    # aiohttp's keep-alive timer closes a connection that has not sent a complete request head in time,
    # whether it is idle between requests or dripping its head a byte at a time.
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=platform.options.header_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    log.info("wasmflow serving on http://%s:%d (worker %s, %d run slots)", host, bound, platform.owner,
             platform.options.workers)
    if ready:
        ready(bound)
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing requests and runs in flight")
    await runner.cleanup()
    released = await loop.run_in_executor(None, platform.stop)
    log.info("stopped (%d runs released)", released)


def wait_for_signal() -> None:
    """Block the main thread until SIGTERM or SIGINT (for `wasmflow worker`, which serves no HTTP)."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass
