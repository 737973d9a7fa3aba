"""The engine interface: what callers (CLI, dispatcher, benchmarks) see of wasmtime or WasmEdge.

Callers build a `Host` once per process (capabilities and their process-wide resources), ask an engine
to `load` a module once (compile, cache, link-check), and then `run` it as often as they like: each run is
a fresh instance with its own `RunContext`, limits and captured output.
"""

from __future__ import annotations

import enum
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from wasmflow.host_functions.spec import CancelSignal, Event, RunContext, TokenBudget


class Status(str, enum.Enum):
    OK = "ok"
    ERROR = "error"  # proc_exit(n != 0)
    TRAP = "trap"
    TIMEOUT = "timeout"
    OOM = "oom"
    DENIED = "denied"
    INVALID = "invalid"  # the module could not be compiled or linked
    # Set by the platform, never by an engine: the guest failed because a service beyond it did, or the
    # host failed around the run (transient, retried); the process running it stopped before it finished.
    UPSTREAM = "upstream"
    LOST = "lost"
    # Stopped on request (`wasmflow cancel`, a newer run of the same concurrency key): never retried.
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # so f-strings print "ok", not "Status.OK"
        return self.value


class ModuleError(Exception):
    """A module that cannot run: missing file, not WebAssembly, a missing import. Names the flow."""


def read_module(path: Path, flow_name: str) -> bytes:
    """The module's bytes, or a ModuleError naming the flow: the first check every engine makes."""
    try:
        wasm = Path(path).read_bytes()
    except OSError as exc:
        raise ModuleError(f"flow {flow_name!r}: cannot read module {path}: {exc.strerror or exc}") from None
    if not wasm.startswith(b"\0asm"):
        raise ModuleError(f"flow {flow_name!r}: {path} is not a WebAssembly module (no \\0asm header)")
    return wasm


@dataclass
class RunResult:
    status: Status
    run_id: str
    error: Optional[str] = None
    exit_code: Optional[int] = None
    output: Optional[bytes] = None
    response_status: Optional[int] = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: Optional[bytes] = None
    logs: list[tuple[float, str, str]] = field(default_factory=list)  # (unix time, level, message)
    stdout: bytes = b""
    stderr: bytes = b""
    denials: list[str] = field(default_factory=list)
    upstream_failures: list[str] = field(default_factory=list)
    truncated: dict[str, int] = field(default_factory=dict)  # output kind (logs, stdout...) -> items cut at a cap
    llm_tokens: int = 0  # prompt + generated tokens of the run's LLM calls (what a flow's `budget` counts)
    instantiate_ms: float = 0.0
    run_ms: float = 0.0
    engine: str = ""
    mode: str = ""  # e.g. "cranelift", "interpreter", "aot"

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


_run_ids = random.Random(os.urandom(32))


def local_run_id() -> str:
    """16 random hex digits for a run started outside the queue (`wasmflow run`, a benchmark). Not
    uuid4: it reads the kernel's random source each time, a system call that lets go of the interpreter
    lock, and a worker's run thread then waited for it back behind the other threads."""
    return f"{_run_ids.getrandbits(64):016x}"


@dataclass
class RunRequest:
    """Everything one run needs besides the loaded module."""

    flow: Any  # wasmflow.flows.model.Flow
    event: Event
    run_id: str = field(default_factory=local_run_id)
    attempt: int = 1
    execution: int = 1  # the claim's number among all claims of the run (see RunContext.execution)
    args: Optional[list[str]] = None  # argv after the program name; default: the flow's args
    env: Optional[dict[str, str]] = None  # extra WASI environment (wasmflow exec); default: config + secrets
    stdin: Optional[bytes] = None
    inherit_stdio: bool = False  # wasmflow exec: pass stdout/stderr through instead of capturing
    cancel: Optional[CancelSignal] = None  # set from another thread to stop the run (the dispatcher's)
    budget: Optional[TokenBudget] = None  # the flow's LLM token budget for this run's key

    def context(self) -> RunContext:
        timeout = self.flow.limits.timeout
        return RunContext(
            flow=self.flow,
            event=self.event,
            run_id=self.run_id,
            attempt=self.attempt,
            execution=self.execution,
            deadline=time.monotonic() + timeout,
            cancel=self.cancel,
            budget=self.budget,
        )


class LoadedModule(Protocol):
    flow_name: str
    path: Path
    sha256: str  # of the bytes loaded: the build a run ran, even if the file has been rebuilt since


class Engine(Protocol):
    name: str

    def load(self, path: Path, flow_name: str) -> LoadedModule:
        """Compile (or take from the cache) and link-check a module; raises ModuleError naming the flow."""
        ...

    def run(self, module: LoadedModule, request: RunRequest) -> RunResult:
        """Run `_start` in a fresh instance. Never raises for anything the guest does."""
        ...

    def close(self) -> None: ...
