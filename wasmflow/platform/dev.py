"""`wasmflow dev`: `wasmflow up` that rebuilds and reloads as the crates and flows.yaml change.

The edit-run loop of an agent's author. Nothing is served until the first build succeeds and flows.yaml
validates. Then a watcher thread collects changes (debounced: a burst of saves is one change) and:

- a changed crate (`*.rs`, `Cargo.toml`) is rebuilt; each flow whose module changed is invalidated in the
  Runtime, so its next run loads the new module while runs in flight finish on the one they hold;
- a changed flows.yaml that validates replaces the served platform: the server stops accepting, runs in
  flight finish, the new platform starts on the same listening socket (held open throughout, so requests
  meanwhile wait in its backlog rather than being refused) and picks up the queued runs from the store
  (they are rows in the database, not in memory, so none is lost);
- a failed build or a flows.yaml that no longer validates changes nothing that is served (cargo leaves the
  last good module in place) and prints the compiler's or the validator's error.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import click
from aiohttp import web
from rich.console import Console
from rich.markup import escape

from wasmflow.build import BuildError, build, resolve_module
from wasmflow.cli_support import flows_path_option, resolve_flows_path
from wasmflow.flows.loader import FlowsError, LoadedFlows, load_flows
from wasmflow.platform.app import Options, Platform, PlatformError, RouteHook
from wasmflow.runtime import Runtime

log = logging.getLogger("wasmflow.dev")

IGNORED_DIRS = {"target", ".wasmflow", ".git", "node_modules", "__pycache__", ".venv"}


@dataclass
class Changes:
    """One debounced batch of changes, sorted into what each needs."""

    flows: bool = False
    crates: set[Path] = field(default_factory=set)

    def __bool__(self) -> bool:
        return self.flows or bool(self.crates)


def classify(paths: Iterable[str], flows_path: Path, roots: Iterable[Path]) -> Changes:
    """Which changed paths matter: flows.yaml itself, and Rust sources or manifests outside build output."""
    flows_path = flows_path.resolve()
    roots = [r.resolve() for r in roots]
    changes = Changes()
    for raw in paths:
        path = Path(raw).resolve()
        if path == flows_path:
            changes.flows = True
            continue
        root = next((r for r in roots if path.is_relative_to(r)), None)
        if root is None or IGNORED_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        if path.suffix == ".rs" or path.name in ("Cargo.toml", "build.rs"):
            changes.crates.add(path)
    return changes


def _digest(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def module_digests(loaded: LoadedFlows) -> dict[str, Optional[str]]:
    """flow name -> SHA-256 of the module it would load now (None: not built or not found)."""
    digests: dict[str, Optional[str]] = {}
    for flow in loaded.file.flows:
        try:
            digests[flow.name] = _digest(resolve_module(flow.module, loaded.base_dir))
        except (FileNotFoundError, ValueError):
            digests[flow.name] = None
    return digests


class DevLoop:
    """Serve flows.yaml, watch it and the crates, rebuild and reload; see the module docstring."""

    def __init__(self, flows_path: Path, workspace: Path, state_dir: Path, host: str, port: int,
                 options: Options, engine: Optional[str] = None, debounce_ms: int = 300,
                 extra_routes: Iterable[RouteHook] = (), console: Optional[Console] = None) -> None:
        self.flows_path = Path(flows_path).resolve()
        self.workspace = Path(workspace).resolve()
        self.state_dir = Path(state_dir)
        self.host, self.port = host, port
        self.options = options
        self.engine = engine
        self.debounce_ms = debounce_ms
        self.extra_routes = list(extra_routes)
        self.console = console or Console(stderr=True, highlight=False)
        self.loaded: Optional[LoadedFlows] = None
        self.runtime: Optional[Runtime] = None
        self.digests: dict[str, Optional[str]] = {}
        self._pending: Optional[LoadedFlows] = None  # a new flows.yaml waiting for the platform to restart
        self._exit = threading.Event()
        self._watch_stop = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._serve_stop: Optional[asyncio.Event] = None
        self._lock = threading.Lock()

    # -- messages -----------------------------------------------------------------------------------

    def say(self, message: str, style: str = "") -> None:
        stamp = time.strftime("%H:%M:%S")
        text = f"[dim]{stamp}[/dim] " + (f"[{style}]{message}[/{style}]" if style else message)
        self.console.print(text, soft_wrap=True)

    def _print_build_error(self, exc: BuildError) -> None:
        if exc.stderr:  # the compiler's own words, verbatim
            self.console.file.write(exc.stderr if exc.stderr.endswith("\n") else exc.stderr + "\n")
            self.console.file.flush()
        self.say(f"build failed: {escape(exc.message)}", "red")

    # -- building and validating --------------------------------------------------------------------

    def _load(self) -> Optional[LoadedFlows]:
        try:
            return load_flows(self.flows_path)
        except FlowsError as exc:
            self.console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            return None

    def _build(self) -> bool:
        started = time.monotonic()
        try:
            build(None, self.workspace, self.state_dir, progress=False)
        except BuildError as exc:
            self._print_build_error(exc)
            return False
        self.say(f"built in {time.monotonic() - started:.1f} s", "green")
        return True

    def prepare(self) -> bool:
        """The first build and validation: False (with the error printed) means nothing may be served."""
        self.loaded = self._load()
        if self.loaded is None:
            self.say("flows.yaml does not validate: fix it and start `wasmflow dev` again", "red")
            return False
        if not self._build():
            self.say("the first build failed: nothing is served until it builds; fix it and start "
                     "`wasmflow dev` again", "red")
            return False
        self.digests = module_digests(self.loaded)
        for name, digest in self.digests.items():
            if digest is None:
                self.say(f"flow {escape(name)}: its module is not built or not found (its runs end `invalid`)",
                         "yellow")
        return True

    def on_changes(self, changes: Changes) -> None:
        """Rebuild and reload for one batch of changes (called on the watcher thread)."""
        if changes.flows:
            loaded = self._load()
            if loaded is None:
                self.say("flows.yaml does not validate: still serving the last good version", "red")
                if not changes.crates:
                    return
            elif changes.crates and not self._build():
                self.say("still serving the last good version", "red")
                return
            if loaded is not None:
                self.say("flows.yaml changed: restarting the server (runs in flight finish first)", "cyan")
                with self._lock:
                    self._pending = loaded
                self._stop_serving()
                return
        if changes.crates:
            shown = ", ".join(sorted({p.name for p in changes.crates}))
            self.say(f"changed: {escape(shown)}: rebuilding", "cyan")
            if not self._build():
                self.say("still serving the last good version", "red")
                return
            self._reload_modules()

    def _reload_modules(self) -> None:
        assert self.loaded is not None
        digests = module_digests(self.loaded)
        changed = [name for name, digest in digests.items() if digest != self.digests.get(name)]
        self.digests = digests
        if self.runtime is not None:
            for name in changed:
                self.runtime.invalidate(name)
        if changed:
            self.say(f"reloaded {escape(', '.join(changed))}: the next run uses the new module", "green")
        else:
            self.say("no module changed", "dim")

    # -- serving ------------------------------------------------------------------------------------

    def _stop_serving(self) -> None:
        loop, stop = self._loop, self._serve_stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop already ended
                pass

    def stop(self) -> None:
        """Stop everything (SIGINT/SIGTERM): the server shuts down in order and `run` returns."""
        self._exit.set()
        self._watch_stop.set()
        self._stop_serving()

    def _watch(self) -> None:
        from watchfiles import DefaultFilter, watch

        roots = sorted({self.flows_path.parent, self.workspace})
        roots = [r for r in roots if not any(r != o and r.is_relative_to(o) for o in roots)]
        # A batch ends after `debounce_ms` without a change (or 10 times that of steady changes), so a
        # burst of saves is one rebuild; changes made during a build come as the next batch.
        ignore = DefaultFilter(ignore_dirs=[*DefaultFilter.ignore_dirs, *IGNORED_DIRS])
        for batch in watch(*roots, watch_filter=ignore, debounce=self.debounce_ms * 10, step=self.debounce_ms,
                           stop_event=self._watch_stop, raise_interrupt=False):
            changes = classify((path for _, path in batch), self.flows_path, roots)
            if changes:
                try:
                    self.on_changes(changes)
                except Exception:  # the loop must outlive any one reload
                    log.exception("reloading failed")
                    self.say("reloading failed (see the log): still serving the last good version", "red")

    def _listen(self) -> socket.socket:
        """The listening socket, opened once and kept across restarts: while one platform stops and the
        next starts, connections wait in its backlog instead of being refused."""
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((self.host, self.port), family=family, backlog=1024)
        self.port = sock.getsockname()[1]  # --port 0: the one the system picked
        return sock

    def run(self) -> int:
        """Serve until stopped, restarting the platform when flows.yaml changes. Returns an exit code."""
        if not self.prepare():
            return 1
        try:
            sock = self._listen()
        except OSError as exc:
            self.console.print(f"[red]error:[/red] cannot listen on {escape(self.host)}:{self.port}: "
                               f"{escape(exc.strerror or str(exc))} (stop what holds the port, or pick another "
                               "with --port)", soft_wrap=True)
            return 2
        watcher = threading.Thread(target=self._watch, name="wasmflow-dev-watch", daemon=True)
        watcher.start()
        try:
            while not self._exit.is_set():
                assert self.loaded is not None
                code = self._serve_once(self.loaded, sock)
                if code:
                    return code
                with self._lock:
                    pending, self._pending = self._pending, None
                if pending is None:
                    break
                self.loaded = pending
                self.digests = module_digests(pending)
        finally:
            self._watch_stop.set()
            sock.close()
        return 0

    def _serve_once(self, loaded: LoadedFlows, sock: socket.socket) -> int:
        """One platform's life: start it, serve on (a duplicate of) `sock` until told to stop, then stop
        accepting, let requests and runs in flight finish, and release what is left."""
        runtime = Runtime(loaded.file, loaded.base_dir, engine_override=self.engine)
        platform = Platform(runtime, self.options)
        try:
            platform.start()
        except PlatformError as exc:
            self.console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            runtime.close()
            return 2
        self.runtime = runtime

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._serve_stop = asyncio.Event()
            if self._exit.is_set():
                self._serve_stop.set()
            app = platform.create_app(self.extra_routes)
            runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                   keepalive_timeout=platform.options.header_timeout)
            await runner.setup()
            # The site closes what it is given when it stops: a duplicate, so the socket itself stays open.
            await web.SockSite(runner, sock.dup()).start()
            names = ", ".join(f.name for f in loaded.file.flows)
            self.say(f"serving {escape(names)} on http://{self.host}:{self.port} (watching for changes; "
                     "Ctrl-C stops)", "green")
            await self._serve_stop.wait()
            await runner.cleanup()
            await self._loop.run_in_executor(None, platform.stop)

        try:
            asyncio.run(main())
        finally:
            self._loop = None
            self.runtime = None
            runtime.close()
        return 0


@click.command("dev")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True, help="0: any free port (kept across restarts)")
@click.option("--workers", type=click.IntRange(1, 256), default=4, show_default=True, help="runs executed at once")
@click.option("--engine", type=click.Choice(["wasmtime", "wasmedge"]), default=None,
              help="override the engine of flows.yaml")
@click.option("--workspace", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the agents' cargo workspace (default: as `wasmflow build` finds it)")
@click.option("--debounce", type=click.IntRange(10, 10000), default=300, show_default=True,
              help="milliseconds without a change before rebuilding (a burst of saves is one rebuild)")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="the server's log on stderr (dev's own messages are always shown)")
@flows_path_option
def dev_command(host: str, port: int, workers: int, engine: Optional[str], workspace: Optional[Path],
                debounce: int, log_level: str, flows_path: Optional[Path]) -> None:
    """`up` plus watching: rebuild a changed crate and reload its flow; reload a changed flows.yaml.

    A failed build or an invalid flows.yaml keeps the last good version serving and prints the error.
    """
    from wasmflow.build import default_state_dir, default_workspace
    from wasmflow.platform.app import default_route_hooks
    from wasmflow.platform.signals import StopSignal
    from wasmflow.terminal import GuestSafeFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(GuestSafeFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, log_level.upper()), handlers=[handler])
    stopping = StopSignal().install()
    flows = resolve_flows_path(flows_path)
    if not flows.is_file():
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(flows))} does not exist: run `wasmflow dev` in a "
                                   "project (`wasmflow new NAME` makes one) or pass --flows", soft_wrap=True)
        sys.exit(2)
    workspace = (workspace or default_workspace()).resolve()
    options = Options(workers=workers)
    dev = DevLoop(flows, workspace, default_state_dir(workspace), host, port, options, engine, debounce,
                  default_route_hooks())
    stopping.on_stop(dev.stop)
    sys.exit(dev.run())
