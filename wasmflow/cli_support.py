"""What the command groups share: the `--flows` option, finding flows.yaml, building a Runtime, printing a run.

The commands of each area (`wasmflow.platform.cli_commands`, `wasmflow.wasi_nn.cli_commands`, ...) import
these helpers from here, and `wasmflow.cli` only assembles the groups, so no command module imports the
entry point.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.text import Text

if TYPE_CHECKING:
    from wasmflow.engine import RunResult
    from wasmflow.runtime import Runtime

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

STATUS_STYLE = {"ok": "green", "error": "red", "trap": "red", "timeout": "yellow", "oom": "magenta",
                "denied": "red", "invalid": "red", "lost": "red", "upstream": "yellow"}

F = TypeVar("F", bound=Callable[..., object])


def flows_path_option(f: F) -> F:
    """`--flows PATH`, the same option and help on every command that reads flows.yaml."""
    return click.option(
        "--flows", "flows_path", type=click.Path(path_type=Path), default=None,
        help="flows.yaml to use (default: $WASMFLOW_FLOWS or ./flows.yaml)",
    )(f)


def resolve_flows_path(flows_path: Optional[Path]) -> Path:
    """`--flows` if given, else `$WASMFLOW_FLOWS`, else ./flows.yaml."""
    return flows_path or Path(os.environ.get("WASMFLOW_FLOWS") or "flows.yaml")


def load_runtime(flows_path: Optional[Path], engine: Optional[str] = None,
                 database_url: Optional[str] = None) -> "Runtime":
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


def print_result(result: "RunResult", show_output: bool = True) -> None:
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
