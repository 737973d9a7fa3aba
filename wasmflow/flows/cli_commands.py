"""`wasmflow validate`: check flows.yaml before deploying it, and show what each flow may do.

The table is the review surface for a change to flows.yaml: triggers and granted capabilities side by
side, so widening a flow's access is visible at a glance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from wasmflow.fields import format_duration, format_size
from wasmflow.terminal import clean

from .loader import FlowsError, LoadedFlows, load_flows
from .model import Flow, Limits, Trigger

_DEFAULT_METHODS = ["GET", "POST"]


@click.command("validate")
@click.argument("flows_yaml", required=False, type=click.Path(path_type=Path))
@click.option("--flows", "flows_option", type=click.Path(path_type=Path), default=None,
              help="same as FLOWS_YAML, for symmetry with the other commands")
def validate_command(flows_yaml: Optional[Path], flows_option: Optional[Path]) -> None:
    """Check FLOWS_YAML (default: $WASMFLOW_FLOWS or ./flows.yaml) and list its flows.

    Exits 0 when the file is valid, 2 with file:line: field: problem for each problem otherwise.
    """
    if flows_yaml and flows_option and flows_yaml != flows_option:
        raise click.UsageError("give the flows file once: as FLOWS_YAML or as --flows")
    path = flows_yaml or flows_option or Path(os.environ.get("WASMFLOW_FLOWS") or "flows.yaml")
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        loaded = load_flows(path)
    except FlowsError as exc:
        # soft_wrap: one problem per line, never broken, so editors and grep can use file:line.
        for problem in exc.problems:
            err.print(f"[red]error:[/red] {escape(clean(str(problem)))}", soft_wrap=True)
        if len(exc.problems) > 1:
            err.print(f"{escape(str(path))}: {len(exc.problems)} problems", soft_wrap=True)
        raise SystemExit(2) from None
    flows = loaded.file.flows
    if flows:
        out.print(flows_table(loaded))
    for warning in module_warnings(loaded):
        err.print(f"[yellow]warning:[/yellow] {escape(clean(warning))}", soft_wrap=True)
    noun = "flow" if len(flows) == 1 else "flows"
    out.print(f"[green]valid:[/green] {escape(str(path))} ({len(flows)} {noun}, engine {loaded.file.engine})",
              soft_wrap=True)


def flows_table(loaded: LoadedFlows) -> Table:
    table = Table(title=None, show_lines=True)
    for column in ("flow", "module", "triggers", "allows", "limits"):
        table.add_column(column, overflow="fold")
    for flow in loaded.file.flows:
        module = flow.module + (f"\n({flow.engine})" if flow.engine else "")
        triggers = [describe_trigger(t) for t in flow.on] or ["manual only"]
        table.add_row(*(Text(clean(cell)) for cell in (flow.name, module, "\n".join(triggers),
                                                "\n".join(describe_allows(flow)) or "nothing",
                                                "\n".join(describe_limits(flow)))))
    return table


def describe_trigger(trigger: Trigger) -> str:
    """`github: pull_request.opened`, `cron 0 9 * * MON Europe/Berlin`, `http`."""
    if trigger.github is not None:
        text = "github: " + ", ".join(trigger.github.events)
        if trigger.github.repos != ["*/*"]:
            text += " in " + ", ".join(trigger.github.repos)
        return text
    if trigger.schedule is not None:
        s = trigger.schedule
        text = f"cron {s.cron} {s.timezone}"
        if s.overlap != "skip":
            text += f", overlap {s.overlap}"
        if s.catch_up:
            text += f", catch up {format_duration(s.catch_up)}"
        return text
    if trigger.http is None:  # Trigger's validator requires exactly one kind
        return "no trigger"
    methods = trigger.http.methods
    return "http" if methods == _DEFAULT_METHODS else "http " + " ".join(methods)


def describe_allows(flow: Flow) -> list[str]:
    """Everything the flow is granted beyond computing: one line per capability, secrets included."""
    allow, lines = flow.allow, []
    if allow.http:
        lines.append("http: " + ", ".join(allow.http))
    if allow.models:
        lines.append("models: " + ", ".join(allow.models))
    if allow.kv:
        lines.append("kv")
    if allow.github:
        lines.append("github: " + ", ".join(f"{k}={v}" for k, v in allow.github.items()))
    if allow.github_repos:
        lines.append("github repos: " + ", ".join(allow.github_repos))
    if allow.dirs:
        lines.append("dirs: " + ", ".join(allow.dirs))
    if flow.secrets:
        lines.append("secrets: " + ", ".join(flow.secrets))
    if flow.llm is not None:
        for use, endpoint in (("chat", flow.llm.chat), ("embeddings", flow.llm.embeddings)):
            if endpoint is not None:
                lines.append(f"llm {use}: {endpoint.model}" + (f" at {endpoint.base_url}" if endpoint.base_url else ""))
    return lines


def describe_limits(flow: Flow) -> list[str]:
    limits, retry = flow.limits, flow.retry
    lines = [f"timeout {format_duration(limits.timeout)}", f"memory {format_size(limits.memory)}",
             f"output {format_size(limits.output)}"]
    defaults = Limits()
    if limits.table_elements != defaults.table_elements:
        lines.append(f"table {limits.table_elements} elements")
    if (limits.log_lines, limits.log_bytes) != (defaults.log_lines, defaults.log_bytes):
        lines.append(f"logs {limits.log_lines} lines / {format_size(limits.log_bytes)}")
    if (limits.response_headers, limits.response_header_bytes) != (defaults.response_headers,
                                                                   defaults.response_header_bytes):
        lines.append(f"response headers {limits.response_headers} / {format_size(limits.response_header_bytes)}")
    if limits.response_body != defaults.response_body:
        lines.append(f"response body {format_size(limits.response_body)}")
    lines.append(f"retry {retry.attempts}x {retry.backoff}")
    return lines


def module_warnings(loaded: LoadedFlows) -> list[str]:
    """Modules that are not on disk: not fatal (a .wasm may be built later), but usually a typo."""
    return [f"flow {flow.name!r}: module {flow.module!r} not found in {loaded.base_dir} "
            "(build it, or fix the path; relative paths are relative to the flows file)"
            for flow in loaded.file.flows if not loaded.resolve(flow.module).exists()]
