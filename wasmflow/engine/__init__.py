"""Engines run guests; callers pick one by name."""

from __future__ import annotations

from pathlib import Path

from wasmflow.host_functions import Host

from .base import Engine, LoadedModule, ModuleError, RunRequest, RunResult, Status

ENGINES = ("wasmtime", "wasmedge")


def make_engine(name: str, host: Host, cache_dir: Path) -> Engine:
    """Build the named engine over `host`; raises ValueError for an unknown name."""
    if name == "wasmtime":
        from .wasmtime_engine import WasmtimeEngine

        return WasmtimeEngine(host, cache_dir)
    if name == "wasmedge":
        from .wasmedge_engine import WasmEdgeEngine

        return WasmEdgeEngine(host, cache_dir)
    raise ValueError(f"unknown engine {name!r} (expected one of: {', '.join(ENGINES)})")


__all__ = ["Engine", "LoadedModule", "ModuleError", "RunRequest", "RunResult", "Status", "make_engine"]
