"""Control-plane commands: `up`, `worker`, `runs`, `logs`, `events`, `replay`, `cancel`, `concurrency`.

The serving commands build a Runtime and a Platform; the reading commands only open the store named by
flows.yaml (or --database-url), so they work while a server runs and never load a module or a model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import click
import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from wasmflow.cli_support import STATUS_STYLE, flows_path_option, load_runtime, resolve_flows_path
from wasmflow.process import freeze_loaded_heap
from wasmflow.terminal import GuestSafeFormatter, clean, guest_text

# Tables are read in terminals and in CI logs alike: outside a terminal, do not squeeze them into 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)

STATE_STYLE = {"done": "green", "dead": "red", "queued": "cyan", "running": "yellow", "waiting": "dim"}


def _db_option(f):  # type: ignore[no-untyped-def]
    return click.option("--database-url", default=None, envvar="WASMFLOW_DATABASE_URL",
                        help="postgresql://... (default: SQLite in the state directory of flows.yaml)")(f)


def _setup_logging(level: str) -> None:
    """Server logs on stderr; run errors and names in them may carry a guest's escapes: cleaned."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(GuestSafeFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _open_store(flows_path: Optional[Path], database_url: Optional[str]) -> sa.Engine:
    """The database of flows.yaml's state directory (or --database-url), without building a Runtime."""
    from wasmflow.storage import default_url, open_database

    if database_url:
        return open_database(database_url)
    from wasmflow.flows.loader import FlowsError, load_flows

    path = resolve_flows_path(flows_path)
    try:
        loaded = load_flows(path)
    except FlowsError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    return open_database(default_url(loaded.state_dir))


def _when(ts: Optional[float]) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _platform_options(workers: int, lease: float, grace: float, max_body: int, **kw: Any):  # type: ignore[no-untyped-def]
    from wasmflow.platform.app import Options

    return Options(workers=workers, lease_seconds=lease, grace_seconds=grace, max_body=max_body, **kw)


_serve_options = [
    click.option("--workers", type=click.IntRange(0, 256), default=4, show_default=True,
                 help="runs executed at once by this process (up on PostgreSQL: 0 = ingress and scheduler "
                      "only, runs left to `wasmflow worker` processes)"),
    click.option("--lease", type=float, default=30.0, show_default=True,
                 help="seconds a claimed run stays leased without a heartbeat"),
    click.option("--grace", type=float, default=30.0, show_default=True,
                 help="on SIGTERM, seconds runs in flight may take before they are released"),
    click.option("--engine", type=click.Choice(["wasmtime", "wasmedge"]), default=None,
                 help="override the engine of flows.yaml"),
    click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                 show_default=True),
    _db_option,
    flows_path_option,
]


def _apply(options):  # type: ignore[no-untyped-def]
    def decorate(f):  # type: ignore[no-untyped-def]
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


@click.command("up")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--max-body", type=int, default=25 * 1024 * 1024, show_default=True,
              help="largest request body accepted, in bytes (413 above)")
@click.option("--public-url", default=None, envvar="WASMFLOW_PUBLIC_URL",
              help="where GitHub reaches this server, for the App set-up at /setup (default: $WASMFLOW_PUBLIC_URL)")
@_apply(_serve_options)
def up_command(host: str, port: int, max_body: int, workers: int, lease: float, grace: float,
               engine: Optional[str], log_level: str, database_url: Optional[str], flows_path: Optional[Path],
               public_url: Optional[str] = None) -> None:
    """Serve webhooks, HTTP triggers, schedules and workers in one process (SQLite by default)."""
    from wasmflow.platform.app import Platform, PlatformError, default_route_hooks
    from wasmflow.platform.signals import StopSignal, serve_until_stopped, watch_platform

    _setup_logging(log_level)
    stopping = StopSignal().install()  # before anything is loaded or claimed
    runtime = load_runtime(flows_path, engine, database_url)
    if workers == 0 and runtime.db.dialect.name != "postgresql":
        runtime.close()
        err_console.print("[red]error:[/red] --workers 0 leaves runs to `wasmflow worker` processes, which need "
                          "PostgreSQL (--database-url); on SQLite `wasmflow up` runs them itself")
        sys.exit(2)
    platform = Platform(runtime, _platform_options(workers, lease, grace, max_body, dispatch=workers > 0,
                                                   public_url=public_url))
    if not _console_may_serve(platform, host):
        _discard(platform)
        sys.exit(2)
    watch_platform(stopping, platform)
    if stopping.is_set():  # stopped while loading: nothing was claimed
        _discard(platform)
        return
    try:
        platform.start()
    except PlatformError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        _discard(platform)
        sys.exit(2)
    freeze_loaded_heap()
    try:
        asyncio.run(serve_until_stopped(stopping, platform, host, port, extra_routes=default_route_hooks(),
                                        ready=lambda bound: _print_console_link(platform, host, bound)))
    except OSError as exc:  # port in use, address not available
        platform.stop()
        err_console.print(f"[red]error:[/red] cannot listen on {host}:{port}: {exc.strerror or exc} "
                          "(stop what holds the port, or pick another with --port)", soft_wrap=True)
        sys.exit(2)
    finally:
        in_flight = platform.dispatcher.in_flight if platform.dispatcher else 0
        if in_flight:  # guests still running after the grace period: their runs were released
            logging.shutdown()
            os._exit(0)
        runtime.close()


def _discard(platform) -> None:  # type: ignore[no-untyped-def]
    """A platform that will not serve: its threads (the event writer's) stopped, its runtime closed, so a
    command run in-process (tests, `CliRunner`) leaves nothing behind."""
    platform.stop()
    platform.runtime.close()


def _console_may_serve(platform, host: str) -> bool:  # type: ignore[no-untyped-def]
    """The console is never served open to a network: off loopback it needs a configured token."""
    from wasmflow.console.server import is_loopback

    if platform.console_auth.token or is_loopback(host):
        return True
    err_console.print(
        f"[red]error:[/red] --host {escape(host)} serves the web console beyond this machine, and no console "
        "token is set: add `console: {token: ${WASMFLOW_CONSOLE_TOKEN}}` to flows.yaml and export "
        "WASMFLOW_CONSOLE_TOKEN (python -c 'import secrets; print(secrets.token_urlsafe(32))'), "
        "or serve on 127.0.0.1", soft_wrap=True)
    return False


def _print_console_link(platform, host: str, port: int) -> None:  # type: ignore[no-untyped-def]
    """Once listening: where the console is, with the one-time login token when none is configured."""
    from wasmflow.console.server import login_link

    auth = platform.console_auth
    if auth.token:
        console.print(f"console: {login_link(host, port, None)} (log in with console.token)", soft_wrap=True)
    elif auth.one_time:
        console.print(f"console: {login_link(host, port, auth.one_time)} (one-time login link)", soft_wrap=True)


@click.command("worker")
@_apply(_serve_options)
@click.option("--no-scheduler", is_flag=True, help="never take part in the scheduler election")
@click.option("--metrics-port", type=int, default=None,
              help="serve /metrics and /healthz on this port (127.0.0.1 unless --metrics-host)")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--nice", type=click.IntRange(0, 19), default=10, show_default=True,
              help="lower this process's CPU priority by this much (0: leave it), so that on a machine it "
                   "shares with `wasmflow up` the webhooks are answered first")
def worker_command(workers: int, lease: float, grace: float, engine: Optional[str], log_level: str,
                   database_url: Optional[str], flows_path: Optional[Path], no_scheduler: bool,
                   metrics_port: Optional[int], metrics_host: str, nice: int) -> None:
    """Execute queued runs (and run the scheduler if elected) from a shared PostgreSQL store."""
    from wasmflow.platform.app import Platform, PlatformError
    from wasmflow.platform.signals import StopSignal, serve_until_stopped, watch_platform

    _setup_logging(log_level)
    if workers == 0:
        raise click.UsageError("a worker needs at least one run slot (--workers 1 or more)")
    if nice:
        # A webhook sender has a deadline and a queued run does not: beside `wasmflow up` on one machine,
        # runs take the CPU the acknowledgements leave (docs/control-plane.md). Alone, nothing changes.
        os.nice(nice)
    stopping = StopSignal().install()  # before anything is loaded or claimed
    runtime = load_runtime(flows_path, engine, database_url)
    if runtime.db.dialect.name != "postgresql":
        runtime.close()
        err_console.print("[red]error:[/red] `wasmflow worker` shares a PostgreSQL store "
                          "(--database-url or WASMFLOW_DATABASE_URL); on SQLite `wasmflow up` runs the workers")
        sys.exit(2)
    platform = Platform(runtime, _platform_options(workers, lease, grace, 0, scheduler=not no_scheduler))
    watch_platform(stopping, platform)
    if stopping.is_set():  # stopped while loading: nothing was claimed
        _discard(platform)
        return
    try:
        platform.start()
    except PlatformError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        _discard(platform)
        sys.exit(2)
    logging.getLogger("wasmflow.worker").info("worker %s started (%d run slots)", platform.owner, workers)
    freeze_loaded_heap()
    if metrics_port is not None:
        from wasmflow.platform.app import ops_app

        asyncio.run(serve_until_stopped(stopping, platform, metrics_host, metrics_port,
                                        app=ops_app(platform)))  # stops the platform
    else:
        stopping.wait()
        logging.getLogger("wasmflow.worker").info("shutting down: finishing runs in flight")
        platform.stop()
    if platform.dispatcher and platform.dispatcher.in_flight:
        logging.shutdown()
        os._exit(0)
    runtime.close()


@click.command("runs")
@click.option("--flow", default=None, help="only this flow")
@click.option("--status", default=None, help="queued, running, done, dead, waiting, or an outcome (ok, trap...)")
@click.option("--limit", type=click.IntRange(1, 10000), default=30, show_default=True)
@_db_option
@flows_path_option
def runs_command(flow: Optional[str], status: Optional[str], limit: int, database_url: Optional[str],
                 flows_path: Optional[Path]) -> None:
    """List runs, newest first."""
    from wasmflow.platform.store import list_runs

    rows = list_runs(_open_store(flows_path, database_url), flow=flow, state=status, limit=limit)
    table = Table(show_edge=False, pad_edge=False)
    for column in ("run", "flow", "state", "status", "try", "event", "created", "ms", "error"):
        table.add_column(column, overflow="fold", justify="right" if column in ("try", "ms") else "left")
    for row in rows:
        event = row.event_name + (f".{row.action}" if row.action else "")
        if row.repo:
            event += f" {row.repo}"
        table.add_row(
            row.id, row.flow, f"[{STATE_STYLE.get(row.state, 'default')}]{row.state}[/]",
            f"[{STATUS_STYLE.get(row.status or '', 'default')}]{row.status or ''}[/]", str(row.attempt),
            guest_text(event), _when(row.created_at), f"{row.duration_ms:.1f}" if row.duration_ms is not None else "",
            guest_text((row.error or "").splitlines()[0][:80] if row.error else ""),
        )
    if rows:
        console.print(table)
    else:
        console.print("no runs")


@click.command("logs")
@click.argument("run_id")
@_db_option
@flows_path_option
def logs_command(run_id: str, database_url: Optional[str], flows_path: Optional[Path]) -> None:
    """Show a run: its attempts, logs, stdout/stderr, output and error (RUN may be an id prefix)."""
    from wasmflow.platform.store import decode_logs, get_attempts, get_event, get_run

    db = _open_store(flows_path, database_url)
    run = get_run(db, run_id)
    if run is None:
        from wasmflow.platform.replay_report import print_recorded_run

        if print_recorded_run(db, run_id):  # a `wasmflow run` run: only its transcript is stored
            return
        err_console.print(f"[red]error:[/red] no run {escape(clean(run_id))}")
        sys.exit(1)
    event = get_event(db, run.event_id)
    head = f"run {run.id}  flow {run.flow}  [{STATE_STYLE.get(run.state, 'default')}]{run.state}[/]"
    if run.status:
        head += f" ({run.status})"
    console.print(head)
    if event is not None:
        what = event.name + (f".{event.action}" if event.action else "") + (f" {event.repo}" if event.repo else "")
        what = f"event {event.id} {what}" + (f" delivery {event.delivery_id}" if event.delivery_id else "")
        console.print(guest_text(what, style="dim"), soft_wrap=True)
    if run.replay_of:
        console.print(f"[dim]replay of {run.replay_of}[/dim]")
    attempts = get_attempts(db, run.id)
    if attempts:
        table = Table(show_edge=False, pad_edge=False)
        for column in ("try", "worker", "claimed", "status", "ms", "error"):
            table.add_column(column, overflow="fold")
        for a in attempts:
            table.add_row(str(a.attempt), a.worker, _when(a.claimed_at), a.status or "running",
                          f"{a.duration_ms:.1f}" if a.duration_ms is not None else "",
                          guest_text((a.error or "")[:100]))
        console.print(table)
    from wasmflow.platform.replay_report import activity_table
    from wasmflow.platform.transcripts import load_transcript

    transcript = load_transcript(db, run.id)
    if transcript is not None and transcript.doc.get("entries"):
        console.print(activity_table(transcript))
    for ts, level, message in decode_logs(run.logs):
        stamp = datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]
        console.print(Text.assemble((stamp, "dim"), f" {level:5} ", guest_text(message, indent=len(stamp) + 7)),
                      soft_wrap=True)
    for name in ("stdout", "stderr"):
        data = getattr(run, name)
        if data:
            console.print(f"[dim]--- {name} ---[/dim]")
            console.print(guest_text(bytes(data).rstrip(b"\n")), soft_wrap=True)
    if run.output is not None:
        console.print("[dim]--- output ---[/dim]")
        text = bytes(run.output).decode("utf-8", "replace")
        try:
            text = json.dumps(json.loads(text), indent=2)
        except ValueError:
            pass
        console.print(guest_text(text), soft_wrap=True)
    if run.error:
        console.print(guest_text(run.error, style="red"), soft_wrap=True)


@click.command("events")
@click.option("--source", type=click.Choice(["github", "schedule", "http"]), default=None)
@click.option("--limit", type=click.IntRange(1, 10000), default=30, show_default=True)
@_db_option
@flows_path_option
def events_command(source: Optional[str], limit: int, database_url: Optional[str], flows_path: Optional[Path]) -> None:
    """List received events, newest first, with how many runs each started (or why none)."""
    from wasmflow.platform.store import list_events

    rows = list_events(_open_store(flows_path, database_url), source=source, limit=limit)
    table = Table(show_edge=False, pad_edge=False)
    for column in ("event", "source", "name", "repo", "delivery", "received", "status", "runs", "note"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.id, row.source, guest_text(row.name + (f".{row.action}" if row.action else "")),
                      guest_text(row.repo or ""), guest_text(row.delivery_id or ""), _when(row.received_at),
                      row.status, str(row.runs_created), guest_text(row.note or ""))
    if rows:
        console.print(table)
    else:
        console.print("no events")


@click.command("replay")
@click.argument("ref", required=False)
@click.option("--dead", is_flag=True, help="queue a replay of every dead run matching --flow/--since/--status/"
                                           "--repo/--trigger (one not replayed since)")
@click.option("--status", "dead_status", default=None, help="with --dead: only runs of this outcome (trap, timeout...)")
@click.option("--repo", "dead_repo", default=None, help="with --dead: only runs of this repository (owner/name)")
@click.option("--trigger", "dead_trigger", type=click.Choice(["github", "schedule", "http", "manual"]), default=None,
              help="with --dead: only runs of this trigger")
@click.option("--dry-run", is_flag=True, help="with --dead: count the matching runs, queue nothing")
@click.option("--offline", is_flag=True,
              help="run the module here against the run's transcript: no network, no writes, no model; "
                   "says `identical` or the first divergent call")
@click.option("--module", "module", default=None,
              help="with --offline: a new build (NEW.wasm or a crate) to run against the recorded inputs")
@click.option("--flow", "flow_name", default=None, help="with --offline: replay the recorded runs of this flow")
@click.option("--since", default=None, help="with --offline --flow: only runs recorded within this period (7d, 12h)")
@click.option("--engine", type=click.Choice(["wasmtime", "wasmedge"]), default=None,
              help="with --offline: the engine to replay on (default: the one the run used)")
@_db_option
@flows_path_option
def replay_command(ref: Optional[str], dead: bool, dead_status: Optional[str], dead_repo: Optional[str],
                   dead_trigger: Optional[str], dry_run: bool, offline: bool, module: Optional[str],
                   flow_name: Optional[str], since: Optional[str], engine: Optional[str], database_url: Optional[str],
                   flows_path: Optional[Path]) -> None:
    """Run again a run (REF = run id) or every flow of a GitHub delivery (REF = X-GitHub-Delivery).

    The new runs are queued; a running `wasmflow up` or worker executes them. With --offline, REF's
    transcript is replayed here instead (docs/replay.md); `--offline --flow F --since 7d --module NEW`
    replays many runs and prints a table: same / output changed / diverged / failed. With --dead, every
    dead run matching the filters is queued again (what the console's bulk replay does).
    """
    if dead or dead_status or dead_repo or dead_trigger or dry_run:
        _replay_dead(ref, dead, offline, flow_name, since, dead_status, dead_repo, dead_trigger, dry_run,
                     database_url, flows_path)
        return
    if offline or module or flow_name or since:
        if not offline:
            err_console.print("[red]error:[/red] --module, --flow and --since go with --offline")
            sys.exit(2)
        from wasmflow.platform.replay_report import offline_command

        offline_command(ref, module, flow_name, since, engine, database_url, flows_path)
        return
    if not ref:
        err_console.print("[red]error:[/red] name a run id or a delivery id; `wasmflow runs` lists runs")
        sys.exit(2)
    from wasmflow.platform.queue import ReplayError, replay

    flows = None
    try:
        from wasmflow.flows.loader import load_flows

        flows = load_flows(resolve_flows_path(flows_path)).file
    except Exception:  # replaying a run does not need flows.yaml; re-matching a delivery does
        pass
    try:
        new_ids = replay(_open_store(flows_path, database_url), ref, flows)
    except ReplayError as exc:
        err_console.print(f"[red]error:[/red] {escape(clean(str(exc)))}")
        sys.exit(1)
    for run_id in new_ids:
        console.print(f"queued run {run_id}")



def _replay_dead(ref: Optional[str], dead: bool, offline: bool, flow_name: Optional[str], since: Optional[str],
                 status: Optional[str], repo: Optional[str], trigger: Optional[str], dry_run: bool,
                 database_url: Optional[str], flows_path: Optional[Path]) -> None:
    """`replay --dead [--flow F] [--since 7d] ...`: the bulk online replay (wasmflow/platform/replay_dead.py)."""
    from wasmflow.console.queries import RunFilter
    from wasmflow.platform.replay_dead import SinceError, parse_since, replay_dead

    if not dead:
        err_console.print("[red]error:[/red] --status, --repo, --trigger and --dry-run go with --dead")
        sys.exit(2)
    if ref or offline:
        err_console.print("[red]error:[/red] --dead replays by filter: drop the run id (and --offline)")
        sys.exit(2)
    try:
        since_ts = parse_since(since)
    except SinceError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    flows = None
    try:
        from wasmflow.flows.loader import load_flows

        flows = load_flows(resolve_flows_path(flows_path)).file
    except Exception:  # replaying runs does not need flows.yaml
        pass
    f = RunFilter(flow=flow_name, status=status, repo=repo, trigger=trigger, since=since_ts)
    result = replay_dead(_open_store(flows_path, database_url), flows, f, dry_run=dry_run)
    if dry_run:
        console.print(f"{result.matched} dead run(s) match; nothing queued (--dry-run)")
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("dead run", "replay", "note"):
        table.add_column(column, overflow="fold")
    for new_id in result.queued:
        table.add_row("", new_id, "queued")
    for run_id, why in result.failed:
        table.add_row(run_id, "", guest_text(why))
    if result.queued or result.failed:
        console.print(table)
    console.print(f"{result.matched} dead run(s) matched: {len(result.queued)} replay(s) queued, "
                  f"{len(result.failed)} refused")
    if result.failed:
        sys.exit(1)


@click.command("cancel")
@click.argument("run_id")
@click.option("--by", default=None, help="who cancels, recorded on the run (default: cli:$USER)")
@_db_option
@flows_path_option
def cancel_command(run_id: str, by: Optional[str], database_url: Optional[str], flows_path: Optional[Path]) -> None:
    """Cancel a run (RUN may be an id prefix): a queued run never starts, a running one is stopped.

    The worker holding a running run stops its guest within the engine's interrupt period of hearing of
    the request; the run is recorded `cancelled`, with who cancelled it, and is never retried.
    """
    from wasmflow.platform.queue import Queue

    who = by or f"cli:{os.environ.get('USER') or 'unknown'}"
    result = Queue(_open_store(flows_path, database_url), owner=who).cancel(run_id, by=who)
    shown = escape(clean(result.run_id))
    if result.outcome == "not_found":
        err_console.print(f"[red]error:[/red] no run {shown}; `wasmflow runs` lists them")
        sys.exit(1)
    if result.outcome == "finished":
        err_console.print(f"run {shown} has already finished ({result.state}); nothing to cancel")
        sys.exit(1)
    if result.outcome == "cancelled":
        console.print(f"cancelled run {shown} before it started (by {escape(clean(result.by))})")
    else:
        console.print(f"cancelling run {shown}: its worker stops the guest now (by {escape(clean(result.by))})")


@click.command("concurrency")
@click.option("--flow", default=None, help="only this flow")
@click.option("--since", default="1d", show_default=True, help="window for cancelled, denied and tokens (e.g. 1h, 7d)")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@_db_option
@flows_path_option
def concurrency_command(flow: Optional[str], since: str, limit: int, database_url: Optional[str],
                        flows_path: Optional[Path]) -> None:
    """Per concurrency key: runs running and waiting now; cancelled, denied and LLM tokens in the window."""
    from wasmflow.fields import parse_duration
    from wasmflow.platform.concurrency import key_summary

    try:
        window = parse_duration(since)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] --since: {escape(str(exc))}")
        sys.exit(2)
    rows = key_summary(_open_store(flows_path, database_url), flow=flow, since=window, limit=limit)
    if not rows:
        console.print("no runs with a concurrency key (flows without concurrency, debounce, rate or budget have none)")
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("flow", "key", "running", "waiting", "cancelled", "denied", "tokens"):
        table.add_column(column, overflow="fold", justify="left" if column in ("flow", "key") else "right")
    for row in rows:
        table.add_row(row.flow, guest_text(row.key or "(one key)"), str(row.running),
                      f"[cyan]{row.waiting}[/]" if row.waiting else "0",
                      f"[yellow]{row.cancelled}[/]" if row.cancelled else "0",
                      f"[red]{row.denied}[/]" if row.denied else "0", str(row.tokens))
    console.print(table)
