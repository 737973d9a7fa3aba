"""`wasmflow`: the operator's command line.

Each area owns its commands (build, flows, wasi_nn, platform) and this module only assembles them, so
adding a command touches the area it belongs to and one line here. What the commands share (the
`--flows` option, building a Runtime, printing a run) is in `wasmflow.cli_support`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
from rich.markup import escape

from wasmflow.cli_support import err_console, flows_path_option, load_runtime, print_result


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
@click.option("--github-fixtures", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="answer the guest's GitHub calls from the JSON fixtures in DIR; print what it wrote")
@flows_path_option
def run_command(flow: str, event_file: Optional[Path], event_name: str, headers: tuple[str, ...],
                engine: Optional[str], github_fixtures: Optional[Path], flows_path: Optional[Path]) -> None:
    """Run FLOW once, locally, on an event; print its logs, output and status."""
    from wasmflow.host_functions.spec import Event

    from wasmflow.scaffold.github_fixtures import fixture_run

    fixtures = fixture_run(github_fixtures) if github_fixtures else None
    runtime = fixtures.runtime(flows_path, engine) if fixtures else load_runtime(flows_path, engine)
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
        from wasmflow.platform.transcripts import persist

        persist(runtime, result)  # into the state directory's store: `wasmflow replay RUN --offline` works on it
        print_result(result)
        if fixtures:
            fixtures.report()
        sys.exit(0 if result.ok else 1)
    finally:
        runtime.close()
        if fixtures:
            fixtures.stop()


def _register() -> None:
    from wasmflow.build import build_command
    from wasmflow.flows.cli_commands import validate_command

    from wasmflow.exec_command import exec_command
    from wasmflow.wasi_nn.cli_commands import models_group

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
    from wasmflow.platform.github_cli import github_group
    main.add_command(github_group, "github")
    from wasmflow.scaffold.cli_commands import new_command
    main.add_command(new_command, "new")
    from wasmflow.platform.dev import dev_command
    main.add_command(dev_command, "dev")
    main.add_command(platform_cli.cancel_command, "cancel")
    main.add_command(platform_cli.concurrency_command, "concurrency")


_register()


def entry() -> None:
    """Console-script entry point: run the CLI, then leave through `exit_now` (see wasmflow/process.py)."""
    from wasmflow.process import exit_now

    import sqlalchemy as sa

    try:
        main(standalone_mode=True)
    except SystemExit as exc:
        exit_now(exc.code)
    except sa.exc.SQLAlchemyError as exc:  # a store that is down, locked or not wasmflow's: say so, no traceback
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        err_console.print(f"[red]error:[/red] the database failed: {escape(reason)} (check WASMFLOW_DATABASE_URL "
                          "or the flows.yaml state_dir, and that the server is up)")
        exit_now(1)
    exit_now(0)


if __name__ == "__main__":
    entry()
