"""`wasmflow`: the operator's command line.

Each area owns its commands (build, flows, wasi_nn, platform) and this module only assembles them, so
adding a command touches the area it belongs to and one line here.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.text import Text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

STATUS_STYLE = {"ok": "green", "error": "red", "trap": "red", "timeout": "yellow", "oom": "magenta",
                "denied": "red", "invalid": "red"}


def flows_path_option(f):  # type: ignore[no-untyped-def]
    return click.option(
        "--flows", "flows_path", type=click.Path(path_type=Path), default=None,
        help="flows.yaml to use (default: $WASMFLOW_FLOWS or ./flows.yaml)",
    )(f)


def resolve_flows_path(flows_path: Optional[Path]) -> Path:
    return flows_path or Path(os.environ.get("WASMFLOW_FLOWS") or "flows.yaml")


def load_runtime(flows_path: Optional[Path], engine: Optional[str] = None, database_url: Optional[str] = None):  # type: ignore[no-untyped-def]
    """Load flows.yaml and build a Runtime, or exit 2 with the file/line/field error."""
    from wasmflow.flows.loader import FlowsError, load_flows
    from wasmflow.runtime import Runtime

    path = resolve_flows_path(flows_path)
    try:
        loaded = load_flows(path)
    except FlowsError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    return Runtime(loaded.file, loaded.base_dir, database_url=database_url, engine_override=engine)


def print_result(result, show_output: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Logs, stdout/stderr, output and one status line, in that order: what a person reads after a run.

    Everything the guest wrote is printed as plain text with control sequences removed
    (`wasmflow.terminal.guest_text`), never as markup: guest text cannot style, move or fake anything.
    """
    from wasmflow.terminal import guest_text

    for ts, level, message in result.logs:
        stamp = datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]
        style = {"error": "red", "warn": "yellow", "debug": "dim", "trace": "dim"}.get(level, "")
        console.print(Text.assemble((stamp, "dim"), " ", (f"{level:5}", style), " ",
                                    guest_text(message, indent=len(stamp) + 7)), soft_wrap=True)
    for name in ("stdout", "stderr"):
        data = getattr(result, name)
        if data:
            console.print(f"[dim]--- {name} ---[/dim]")
            console.print(guest_text(bytes(data).rstrip(b"\n")), soft_wrap=True)
    if show_output and result.output is not None:
        console.print("[dim]--- output ---[/dim]")
        text = result.output.decode("utf-8", errors="replace")
        try:
            text = json.dumps(json.loads(text), indent=2)
        except ValueError:
            pass
        console.print(guest_text(text), soft_wrap=True)
    status = str(result.status)
    line = (f"[bold {STATUS_STYLE.get(status, 'default')}]{status}[/]  run {result.run_id}  "
            f"engine {result.engine} ({result.mode})  instantiate {result.instantiate_ms:.2f} ms  "
            f"run {result.run_ms:.2f} ms")
    console.print(line, soft_wrap=True)
    if result.error:
        console.print(guest_text(result.error, style="red"), soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wasmflow")
def main() -> None:
    """wasmflow: event-driven WebAssembly agents with WASI-NN inference."""


@main.command("run")
@click.argument("flow")
@click.option("--event", "event_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON payload of the event (default: {})")
@click.option("--event-name", default="manual", show_default=True, help="event name, e.g. pull_request")
@click.option("--header", "headers", multiple=True, help="event header NAME=VALUE (repeatable)")
@click.option("--engine", type=click.Choice(["wasmtime", "wasmedge"]), default=None,
              help="override the engine of flows.yaml")
@flows_path_option
def run_command(flow: str, event_file: Optional[Path], event_name: str, headers: tuple[str, ...],
                engine: Optional[str], flows_path: Optional[Path]) -> None:
    """Run FLOW once, locally, on an event; print its logs, output and status."""
    from wasmflow.host_functions.spec import Event

    runtime = load_runtime(flows_path, engine)
    try:
        try:
            runtime.flows.flow(flow)
        except KeyError as exc:
            err_console.print(f"[red]error:[/red] {escape(str(exc.args[0]))}")
            sys.exit(2)
        body = event_file.read_bytes() if event_file else b"{}"
        try:
            json.loads(body)
        except ValueError as exc:
            err_console.print(f"[red]error:[/red] {escape(f'{event_file} is not JSON: {exc}')}")
            sys.exit(2)
        header_map = {}
        for item in headers:
            name, sep, value = item.partition("=")
            if not sep:
                err_console.print(f"[red]error:[/red] --header takes NAME=VALUE, got {escape(repr(item))}")
                sys.exit(2)
            header_map[name.lower()] = value
        result = runtime.run(flow, Event(name=event_name, body=body, headers=header_map, trigger="manual"))
        print_result(result)
        sys.exit(0 if result.ok else 1)
    finally:
        runtime.close()


def _register() -> None:
    from wasmflow.build import build_command
    from wasmflow.flows.cli_commands import validate_command

    from wasmflow.wasi_nn.cli_commands import exec_command, models_group

    main.add_command(build_command, "build")
    main.add_command(exec_command, "exec")
    main.add_command(models_group, "models")
    main.add_command(validate_command, "validate")
    from wasmflow.platform import cli_commands as platform_cli
    main.add_command(platform_cli.up_command, "up")
    main.add_command(platform_cli.worker_command, "worker")
    main.add_command(platform_cli.runs_command, "runs")
    main.add_command(platform_cli.logs_command, "logs")
    main.add_command(platform_cli.events_command, "events")
    main.add_command(platform_cli.replay_command, "replay")


_register()


def entry() -> None:
    """Console-script entry point: run the CLI, then leave through `exit_now` (see wasmflow/process.py)."""
    from wasmflow.process import exit_now

    try:
        main(standalone_mode=True)
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(0)


if __name__ == "__main__":
    entry()
