"""The default engine: wasmtime through wasmtime-py.

One `wasmtime.Engine` and one `Linker` per process (WASI plus every host function, defined once and
store-independent); one compiled, pre-linked module per flow, cached on disk; a fresh `Store` and instance
per run with its own limits, deadline and captured output. Deadlines use epoch interruption: a
background thread bumps the engine's epoch every `EPOCH_MS`, so a looping guest pays nothing until it
is stopped.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Callable

import wasmtime

from wasmflow.host_functions import Host
from wasmflow.host_functions.config import wasi_env
from wasmflow.host_functions.spec import BoundedMemory, Call, Code, Halt, HostFunction, RunContext, invoke

from .base import ModuleError, RunRequest, RunResult, Status, read_module
from .cache import ModuleCache
from .module_shape import ModuleShape, ModuleShapeError, inspect
from .outcome import CappedBuffer, classify_failure

log = logging.getLogger("wasmflow.engine.wasmtime")
EPOCH_MS = 10
_current = threading.local()  # the RunContext of the run executing on this thread


class _CallerMemory(BoundedMemory):
    """GuestMemory over the calling instance's exported `memory`, valid for one host call; the bounds
    rule is BoundedMemory's, this supplies only the raw size and copies."""

    __slots__ = ("_caller", "_mem")

    def __init__(self, caller: wasmtime.Caller, mem: wasmtime.Memory | None) -> None:
        self._caller = caller
        self._mem = mem

    def size(self) -> int:
        return self._mem.data_len(self._caller) if self._mem is not None else 0

    def _base(self) -> int:
        return ctypes.addressof(self._mem.data_ptr(self._caller).contents)  # type: ignore[union-attr]

    def _load(self, ptr: int, length: int) -> bytes:
        return ctypes.string_at(self._base() + ptr, length)

    def _store(self, ptr: int, data: bytes) -> None:
        ctypes.memmove(self._base() + ptr, data, len(data))


def adapt(fn: HostFunction) -> Callable[..., int]:
    """Wrap an engine-neutral body for wasmtime: find the run, give it memory, let `invoke` do the rest."""

    def call(caller: wasmtime.Caller, *args: int) -> int:
        run: RunContext | None = getattr(_current, "run", None)
        if run is None:  # cannot happen for guests started by run(); refuse rather than crash
            return int(Code.INTERNAL)
        mem = run.state.get("_memory")
        if mem is None:  # looked up once per run: the export handle stays valid for the instance
            mem = caller.get("memory")
            run.state["_memory"] = mem = mem if isinstance(mem, wasmtime.Memory) else False
        return invoke(fn, Call(_CallerMemory(caller, mem or None), run), args)

    return call


@dataclass
class WasmtimeModule:
    flow_name: str
    path: Path
    module: wasmtime.Module
    pre: Any  # wasmtime.InstancePre
    from_cache: bool
    shape: ModuleShape


class WasmtimeEngine:
    name = "wasmtime"

    def __init__(self, host: Host, cache_dir: Path) -> None:
        self.host = host
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.cranelift_opt_level = "speed"
        # Store limits cap each memory, not their sum: a module with several memories would get the
        # cap several times. Such modules are refused at load (module_shape); this makes sure none
        # compiles even if that check were bypassed.
        config.wasm_multi_memory = False
        self.engine = wasmtime.Engine(config)
        self.version = package_version("wasmtime")
        self.cache = ModuleCache(Path(cache_dir) / f"wasmtime-{self.version}")
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        for fn in host.functions():
            ty = wasmtime.FuncType(
                [getattr(wasmtime.ValType, t)() for t in fn.wasm_params],
                [getattr(wasmtime.ValType, t)() for t in fn.results],
            )
            self.linker.define_func(fn.module, fn.name, ty, adapt(fn), access_caller=True)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="wasmtime-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_MS / 1000.0):
            self.engine.increment_epoch()

    def close(self) -> None:
        self._stop.set()

    # -- loading -------------------------------------------------------------------------------

    def load(self, path: Path, flow_name: str) -> WasmtimeModule:
        path = Path(path)
        wasm = read_module(path, flow_name)

        def compile_() -> bytes:
            try:
                return bytes(wasmtime.Module(self.engine, wasm).serialize())
            except wasmtime.WasmtimeError as exc:
                raise ModuleError(f"flow {flow_name!r}: {path} is not a valid module: {_first_line(exc)}") from None

        try:
            shape = inspect(wasm)
        except ModuleShapeError as exc:
            compile_()  # wasmtime's own error for a malformed module says more than ours
            raise ModuleError(f"flow {flow_name!r}: {path} cannot be run: {exc}") from None
        refusal = shape.refusal()
        if refusal:
            raise ModuleError(f"flow {flow_name!r}: {path} cannot be run: {refusal}")
        serialized, from_cache = self.cache.get_or_compile(wasm, compile_)
        try:
            module = wasmtime.Module.deserialize(self.engine, serialized)
        except wasmtime.WasmtimeError:  # compiled under another engine configuration: compile afresh
            serialized, from_cache = self.cache.replace(wasm, compile_()), False
            module = wasmtime.Module.deserialize(self.engine, serialized)
        try:
            pre = self.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ModuleError(f"flow {flow_name!r}: {path} cannot be linked: {_first_line(exc)}") from None
        if "_start" not in {e.name for e in module.exports}:
            raise ModuleError(f"flow {flow_name!r}: {path} has no _start export (build it as a WASI command: a bin crate)")
        return WasmtimeModule(flow_name, path, module, pre, from_cache, shape)

    # -- running -------------------------------------------------------------------------------

    def run(self, module: WasmtimeModule, request: RunRequest) -> RunResult:
        flow = request.flow
        limits = flow.limits
        ctx = request.context()
        result = RunResult(status=Status.OK, run_id=ctx.run_id, engine=self.name, mode="cranelift")
        over = module.shape.over_caps(limits.memory, limits.table_elements)
        if over:  # refused before anything is allocated (WasmEdge makes the same check)
            result.status, result.error = Status.OOM, over
            return result
        stdout, stderr = CappedBuffer(limits.output), CappedBuffer(limits.output)
        store = wasmtime.Store(self.engine)
        # Per memory and per table, so: one memory (module_shape refuses more), tables sharing the cap.
        store.set_limits(memory_size=limits.memory, table_elements=module.shape.per_table_cap(limits.table_elements),
                         instances=1, memories=1, tables=max(1, len(module.shape.tables)))
        stdin_file = None
        try:
            wasi = wasmtime.WasiConfig()
            args = flow.args if request.args is None else request.args
            wasi.argv = [flow.name, *args]
            wasi.env = list((wasi_env(flow) if request.env is None else request.env).items())
            if request.inherit_stdio:
                wasi.inherit_stdout()
                wasi.inherit_stderr()
                ctx.stdout = _write_process_stdout
            else:
                wasi.stdout_custom = stdout.write
                wasi.stderr_custom = stderr.write
                ctx.stdout = stdout.write  # host-side writes (WASI-NN stream-stdout) land in order
            if request.stdin is not None:
                stdin_file = tempfile.NamedTemporaryFile(prefix="wasmflow-stdin-")
                stdin_file.write(request.stdin)
                stdin_file.flush()
                wasi.stdin_file = stdin_file.name
            elif request.inherit_stdio:
                wasi.inherit_stdin()
            for entry, grant in zip(flow.allow.dirs, flow.allow.dir_grants):
                try:
                    wasi.preopen_dir(grant.host, grant.guest, fs_mutable=not grant.read_only)
                except wasmtime.WasmtimeError as exc:
                    result.status = Status.INVALID
                    result.error = f"flow {flow.name!r}: allow.dirs entry {entry!r} cannot be opened: {_first_line(exc)}"
                    return result
            store.set_wasi(wasi)
            store.set_epoch_deadline(max(1, math.ceil(limits.timeout * 1000 / EPOCH_MS)))
            self._execute(module, store, ctx, result)
        finally:
            if stdin_file is not None:
                stdin_file.close()
        result.stdout, result.stderr = stdout.value(ctx, "stdout"), stderr.value(ctx, "stderr")
        for attr in ("logs", "output", "response_status", "response_headers", "response_body", "denials",
                     "upstream_failures", "truncated"):
            setattr(result, attr, getattr(ctx, attr))
        if not result.ok:
            classify_failure(result, memory_bytes=result_memory(store, ctx), memory_cap=limits.memory)
        return result

    def _execute(self, module: WasmtimeModule, store: wasmtime.Store, ctx: RunContext, result: RunResult) -> None:
        self.host.open_run(ctx)
        _current.run = ctx
        t0 = time.perf_counter()
        instance = None
        try:
            instance = module.pre.instantiate(store)
            ctx.state["_instance"] = instance
            t1 = time.perf_counter()
            result.instantiate_ms = (t1 - t0) * 1000
            start = instance.exports(store)["_start"]
            try:
                start(store)
            finally:
                result.run_ms = (time.perf_counter() - t1) * 1000
        except Halt as exc:  # a host call ended the run (wasmtime-py re-raises the callback's exception)
            result.status, result.error = Status(exc.status), exc.reason
        except wasmtime.ExitTrap as exc:
            result.exit_code = exc.code
            result.status = Status.OK if exc.code == 0 else Status.ERROR
            if exc.code:
                result.error = f"the guest exited with code {exc.code}"
        except wasmtime.Trap as exc:
            result.error = _first_line(exc)
            result.status = Status.TIMEOUT if exc.trap_code == wasmtime.TrapCode.INTERRUPT else Status.TRAP
            if result.status is Status.TIMEOUT:
                result.error = f"deadline of {ctx.flow.limits.timeout:g}s passed"
        except wasmtime.WasmtimeError as exc:
            # Instantiation failures (a start function trap) land here; minimums over the caps never get
            # this far (`over_caps` in `run`), and memory the guest ends with is judged by classify_failure.
            result.status, result.error = Status.TRAP, _first_line(exc)
        finally:
            _current.run = None
            self.host.close_run(ctx)
        if ctx.halted is not None:  # whatever unwound the guest, the limit it hit decides the status
            result.status, result.error = Status(ctx.halted[0]), ctx.halted[1]


def _write_process_stdout(data: bytes) -> int:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return len(data)


def result_memory(store: wasmtime.Store, ctx: RunContext) -> int:
    """Bytes of linear memory the guest ended with (0 if it never got an instance or has no memory)."""
    instance = ctx.state.get("_instance")
    try:
        mem = instance.exports(store).get("memory") if instance is not None else None
        return mem.data_len(store) if isinstance(mem, wasmtime.Memory) else 0
    except Exception:
        return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
