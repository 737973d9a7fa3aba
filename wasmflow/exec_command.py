"""`wasmflow exec`: run any WASI command module the way `wasmedge` does, with WASI-NN.

`wasmedge --dir .:. --nn-preload default:GGML:AUTO:model.gguf app.wasm ARGS...` becomes `wasmflow exec
app.wasm --dir .:. --nn-preload default:GGML:AUTO:model.gguf -- ARGS...`: arguments, stdin, stdout and
stderr pass straight through and the guest's exit code is the command's. It needs no flows.yaml; every
preloaded model is allowed, and so is `load` with model bytes (the module is the operator's own, as
under wasmedge).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import click
from rich.console import Console

from wasmflow.wasi_nn.cli_commands import state_dir_or_default

err = Console(stderr=True, highlight=False)


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
    from wasmflow.flows.model import Allow, Flow, Limits
    from wasmflow.host_functions import Host
    from wasmflow.host_functions.spec import Event
    from wasmflow.wasi_nn.host import WasiNNCapability
    from wasmflow.wasi_nn.registry import ModelRegistry, parse_preload, preloads_from_env
    from wasmflow.wasi_nn.settings import NnAllow

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
    directory = state_dir_or_default(state_dir)
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
