"""`wasmflow new NAME [--template T]`: a Rust agent from a template, in a new project or an existing one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wasmflow.scaffold.project import ScaffoldError, new_agent
from wasmflow.scaffold.sdk import SdkNotFound
from wasmflow.scaffold.templates import DEFAULT_TEMPLATE, TEMPLATES

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _shown(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


@click.command("new")
@click.argument("name")
@click.option("--template", "-t", "template", type=click.Choice(list(TEMPLATES)), default=DEFAULT_TEMPLATE,
              show_default=True, help="what the agent starts as")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="the project directory (default: the current one; empty or missing for a new project)")
def new_command(name: str, template: str, directory: Optional[Path]) -> None:
    """Create an agent NAME: a new project in an empty directory, or one more agent in a project.

    Templates: http, github-bot, schedule, llm, embed. The crate goes to agents/NAME, its flow into
    flows.yaml, an event to try it with into fixtures/NAME.json.
    """
    base = (directory or Path.cwd())
    try:
        created = new_agent(name, template, base)
    except (ScaffoldError, SdkNotFound) as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    what = "created project" if created.new_project else "added to project"
    console.print(f"{what} [bold]{escape(str(created.project))}[/bold]: agent [bold]{escape(name)}[/bold] "
                  f"({escape(created.template.name)}: {escape(created.template.description)})", soft_wrap=True)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("file")
    table.add_column("")
    for path in created.files:
        table.add_row(escape(_shown(path, created.project)), "new")
    for path in created.changed:
        table.add_row(escape(_shown(path, created.project)), "flow added")
    console.print(table)
    for need in created.template.needs:
        console.print(f"[yellow]needs[/yellow] {escape(need)}", soft_wrap=True)
    console.print("next:" + ("" if directory is None else f" (in {escape(str(created.project))})"))
    for command in created.commands:
        console.print(f"  {escape(command)}", soft_wrap=True)
