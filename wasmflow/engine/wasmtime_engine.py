"""The default engine: wasmtime through wasmtime-py.

One `wasmtime.Engine` and one `Linker` per process (WASI plus every host function, defined once and
store-independent); one compiled, pre-linked module per flow, cached on disk; a fresh `Store` and instance
per run with its own limits, deadline and captured output. Deadlines use epoch interruption: a
background thread bumps the engine's epoch every `EPOCH_MS`, so a looping guest pays nothing until it
is stopped.
"""

from __future__ import annotations

import _thread
import ctypes
import functools
import logging
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Callable

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime._func import enter_wasm as _enter_wasm

from wasmflow.host_functions import Host
from wasmflow.host_functions.config import wasi_env
from wasmflow.host_functions.spec import BoundedMemory, Call, Code, Halt, HostFunction, RunContext, invoke

from .base import ModuleError, RunRequest, RunResult, Status, read_module
from .cache import ModuleCache, module_sha256
from .module_shape import MAX_TABLES, ModuleShape, ModuleShapeError, inspect
from .outcome import CappedBuffer, classify_failure

log = logging.getLogger("wasmflow.engine.wasmtime")
EPOCH_MS = 10
POOL_INSTANCES = 64  # runs at once in the process (more wait for a slot): well above the default 4 workers
MAX_MEMORY = 4 * 1024**3  # the largest limits.memory (the wasm32 address space)
MAX_TABLE_ELEMENTS = 10_000_000  # the largest limits.table_elements (a single table may take it all)
_current = threading.local()  # the RunContext of the run executing on this thread


class _CallerMemory(BoundedMemory):
    """GuestMemory over the calling instance's exported `memory`, valid for one host call; the bounds
    rule is BoundedMemory's, this supplies only the raw size and copies.

    It works on the raw C handles (the caller's store context and the memory's export record): the
    wrappers of wasmtime-py allocate several objects per access, which cost more than the host call.
    Base and size are read once per call: the guest is suspended, so its memory cannot grow meanwhile."""

    __slots__ = ("_context", "_mem", "_size", "_addr")

    def __init__(self, context: Any, mem: Any) -> None:
        self._context = context
        self._mem = mem  # byref(wasmtime_memory_t), or None for a guest without a memory export
        self._size = -1
        self._addr = 0

    def size(self) -> int:
        if self._size < 0:
            self._size = _memory_size(self._context, self._mem) if self._mem is not None else 0
        return self._size

    def _base(self) -> int:
        if not self._addr:
            self._addr = _memory_data(self._context, self._mem) or 0
        return self._addr

    def _load(self, ptr: int, length: int) -> bytes:
        return ctypes.string_at(self._base() + ptr, length)

    def _store(self, ptr: int, data: bytes) -> None:
        ctypes.memmove(self._base() + ptr, data, len(data))


def _raw_function(name: str, restype: Any, argtypes: list[Any]) -> Any:
    """A private handle on one C function of wasmtime, typed for the hot path (an address as an int,
    not a ctypes pointer to cast), leaving wasmtime-py's own handle untouched."""
    function = type(getattr(ffi.dll, name))((name, ffi.dll))
    function.restype, function.argtypes = restype, argtypes
    return function


_memory_size = _raw_function("wasmtime_memory_data_size", ctypes.c_size_t,
                             [ctypes.POINTER(ffi.wasmtime_context_t), ctypes.POINTER(ffi.wasmtime_memory_t)])
_memory_data = _raw_function("wasmtime_memory_data", ctypes.c_void_p,
                             [ctypes.POINTER(ffi.wasmtime_context_t), ctypes.POINTER(ffi.wasmtime_memory_t)])
_caller_context = _raw_function("wasmtime_caller_context", ctypes.POINTER(ffi.wasmtime_context_t),
                                [ctypes.POINTER(ffi.wasmtime_caller_t)])
_MEMORY = b"memory"


def _memory_of(caller: Any) -> Any:
    """byref of the caller instance's exported memory, or None: looked up once per run (the export
    record stays valid for the store)."""
    item = ffi.wasmtime_extern_t()
    if not ffi.wasmtime_caller_export_get(caller, _MEMORY, len(_MEMORY), ctypes.byref(item)):
        return None
    if item.kind != ffi.WASMTIME_EXTERN_MEMORY.value:
        ffi.wasmtime_extern_delete(ctypes.byref(item))
        return None
    return ctypes.byref(item.of.memory)


def _trap(message: str) -> int:
    data = message.encode("utf-8", errors="replace")
    return ctypes.cast(ffi.wasmtime_trap_new(data, len(data)), ctypes.c_void_p).value or 0


_VALUE_KINDS = {"i32": ffi.WASM_I32, "i64": ffi.WASM_I64}


@functools.lru_cache(maxsize=None)
def _func_type(params: tuple[str, ...], results: tuple[str, ...]) -> wasmtime.FuncType:
    """The function type of a host function's signature, made once per process (a few signatures serve
    dozens of functions; the linker copies the type).

    Built on the C API directly: `wasmtime.FuncType([ValType.i32(), ...], ...)` wraps and re-creates
    each value type, 30-150 µs a signature against 10-20, paid by a new process's first load."""
    vectors = []
    for kinds in (params, results):
        vector = ffi.wasm_valtype_vec_t()
        ffi.wasm_valtype_vec_new_uninitialized(ctypes.byref(vector), len(kinds))
        for i, kind in enumerate(kinds):
            vector.data[i] = ffi.wasm_valtype_new(_VALUE_KINDS[kind])
        vectors.append(vector)
    ptr = ffi.wasm_functype_new(ctypes.byref(vectors[0]), ctypes.byref(vectors[1]))  # takes the vectors
    if not ptr:
        raise wasmtime.WasmtimeError("failed to allocate a function type")
    return wasmtime.FuncType._from_ptr(ptr, None)


def _slot_reader(arity: int) -> Callable[[Any], tuple[int, ...]]:
    """`read(slots)`: the raw argument slots of a host call as a tuple of ints.

    Every slot is read as its 64 bits, whatever the parameter's type: `invoke`'s conversions look only at
    the bits of the declared width (spec.ARG_KINDS), and an i32 lies in a slot's low half. So a reader
    depends on the arity alone, and the common ones are written out (no loop, no `exec`)."""
    if arity < len(_READERS):
        return _READERS[arity]
    return lambda slots: tuple(slots[i].i64 for i in range(arity))


def _read0(slots: Any) -> tuple[int, ...]:
    return ()


def _read1(slots: Any) -> tuple[int, ...]:
    return (slots[0].i64,)


def _read2(slots: Any) -> tuple[int, ...]:
    return (slots[0].i64, slots[1].i64)


def _read3(slots: Any) -> tuple[int, ...]:
    return (slots[0].i64, slots[1].i64, slots[2].i64)


def _read4(slots: Any) -> tuple[int, ...]:
    return (slots[0].i64, slots[1].i64, slots[2].i64, slots[3].i64)


def _read5(slots: Any) -> tuple[int, ...]:
    return (slots[0].i64, slots[1].i64, slots[2].i64, slots[3].i64, slots[4].i64)


def _read6(slots: Any) -> tuple[int, ...]:
    return (slots[0].i64, slots[1].i64, slots[2].i64, slots[3].i64, slots[4].i64, slots[5].i64)


def _read7(slots: Any) -> tuple[int, ...]:
    return (slots[0].i64, slots[1].i64, slots[2].i64, slots[3].i64, slots[4].i64, slots[5].i64, slots[6].i64)


_READERS = (_read0, _read1, _read2, _read3, _read4, _read5, _read6, _read7)


def adapt(fn: HostFunction) -> Callable[..., int]:
    """Wrap an engine-neutral body as a raw ("unchecked") wasmtime callback: find the run, give it
    memory, let `invoke` do the rest, and write the code into the result slot.

    The raw form skips wasmtime-py's trampoline, which builds a `Caller` and a `Val` per argument and
    compares types on every call; the linker has already checked the signature, so the raw slots hold
    exactly `fn.wasm_params`. `Halt` (and anything `invoke` lets through) becomes a trap; `_execute`
    re-raises what is not a `Halt`, and a halted run's status comes from `RunContext.halted`.
    """
    if len(fn.results) > 1:
        raise ValueError(f"{fn.module}::{fn.name}: host functions return at most one value")
    result = fn.results[0] if fn.results else None
    nargs = len(fn.wasm_params)
    read = _slot_reader(nargs)

    def call(_env: Any, caller: Any, slots: Any, _n: int) -> int:
        try:
            run: RunContext | None = getattr(_current, "run", None)
            if run is None:  # cannot happen for guests started by run(); refuse rather than crash
                if result is not None:
                    setattr(slots[0], result, int(Code.INTERNAL))
                return 0
            state = run.state
            mem = state.get("_memory", _MEMORY)
            if mem is _MEMORY:
                state["_memory"] = mem = _memory_of(caller)
            args = read(slots) if nargs else ()
            code = invoke(fn, Call(_CallerMemory(_caller_context(caller), mem), run), args)
            if result is not None:
                setattr(slots[0], result, code)
            return 0
        except Halt as exc:
            return _trap(exc.reason)
        except BaseException as exc:  # noqa: BLE001  (a callback must not raise into C)
            _current.raised = exc
            return _trap(f"host function {fn.module}::{fn.name} raised {type(exc).__name__}")

    return call


@dataclass
class WasmtimeModule:
    flow_name: str
    path: Path
    module: wasmtime.Module
    pre: Any  # wasmtime.InstancePre
    from_cache: bool
    shape: ModuleShape
    sha256: str  # of the bytes loaded (LoadedModule)


class WasmtimeEngine:
    name = "wasmtime"

    def __init__(self, host: Host, cache_dir: Path, shared: "SharedEngine | None" = None) -> None:
        self.host = host
        # One wasmtime engine (its instance pool, its epoch ticker) serves every WasmtimeEngine of the
        # process; each keeps its own linker, since the host functions belong to its host.
        self.shared = shared or process_engine()
        self.engine = self.shared.engine
        self.version = WASMTIME_VERSION
        self.cache = ModuleCache(Path(cache_dir) / f"wasmtime-{self.version}")
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        # The host serves WASI's clock_time_get and random_get itself (host_functions/transcript.py), so
        # the time and randomness a guest consumes are recorded and replayable: they shadow WASI's own.
        self.linker.allow_shadowing = True
        self._callbacks: list[Any] = []
        # Host functions are defined on the linker when a module that imports them is loaded: a process
        # offers dozens and a guest imports a few, and each costs a callback and a compiled reader.
        self._undefined = {(fn.module, fn.name): fn for fn in host.functions()}
        self._define_lock = threading.Lock()

    @property
    def pooled(self) -> bool:
        """Whether runs take slots of wasmtime's pooling allocator (False: the default allocator)."""
        return self.shared.slots is not None

    def close(self) -> None:
        """Nothing to release: the shared engine lives as long as the process (its ticker too)."""

    # -- loading -------------------------------------------------------------------------------

    def load(self, path: Path, flow_name: str) -> WasmtimeModule:
        path = Path(path)
        wasm = read_module(path, flow_name)

        def compile_() -> bytes:
            try:
                return bytes(wasmtime.Module(self.engine, wasm).serialize())
            except wasmtime.WasmtimeError as exc:
                raise ModuleError(f"flow {flow_name!r}: {path} is not a valid module: {_first_line(exc)}") from None

        digest = module_sha256(wasm)
        cached = self.cache.get(digest)
        # The shape kept beside the compiled code spares parsing the module again in each new process.
        shape = ModuleShape.from_json(cached.facts) if cached is not None else None
        parsed = shape is None  # then it is stored with the code, for the next process
        if shape is None:
            try:
                shape = inspect(wasm)
            except ModuleShapeError as exc:
                compile_()  # wasmtime's own error for a malformed module says more than ours
                raise ModuleError(f"flow {flow_name!r}: {path} cannot be run: {exc}") from None
        refusal = shape.refusal()  # checked again on every load: the rules may be newer than the entry
        if refusal:
            raise ModuleError(f"flow {flow_name!r}: {path} cannot be run: {refusal}")
        module = _deserialize(self.engine, cached.code) if cached is not None else None
        from_cache = module is not None
        if module is None:  # not cached, or compiled under another engine configuration: compile afresh
            code = compile_()
            self.cache.put(digest, code, shape.to_json())
            module = _deserialize(self.engine, bytearray(code))
            if module is None:
                raise ModuleError(f"flow {flow_name!r}: {path}: wasmtime cannot load the code it just compiled")
        elif parsed:  # an entry without a shape this code can read
            self.cache.put(digest, cached.code, shape.to_json())
        try:
            with self._define_lock:  # the linker is mutated here and read by instantiate_pre
                self._define_imports(shape.function_imports)
                pre = self.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ModuleError(f"flow {flow_name!r}: {path} cannot be linked: {_first_line(exc)}") from None
        return WasmtimeModule(flow_name, path, module, pre, from_cache, shape, digest)

    def _define_imports(self, imports: tuple[tuple[str, str], ...]) -> None:
        """Define on the linker the host functions among `imports` (a module's, as (module, name)) that
        no module loaded before imported (called under `_define_lock`)."""
        for key in imports:
            fn = self._undefined.pop(key, None)
            if fn is not None:
                self._define(fn)

    def _define(self, fn: HostFunction) -> None:
        ty = _func_type(tuple(fn.wasm_params), tuple(fn.results))
        callback = ffi.wasmtime_func_unchecked_callback_t(adapt(fn))
        self._callbacks.append(callback)  # the C side keeps only the pointer
        module_name, func_name = fn.module.encode(), fn.name.encode()
        error = ffi.wasmtime_linker_define_func_unchecked(
            self.linker.ptr(), module_name, len(module_name), func_name, len(func_name), ty.ptr(),
            callback, None, _no_finalizer)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)

    # -- running -------------------------------------------------------------------------------

    def run(self, module: WasmtimeModule, request: RunRequest) -> RunResult:
        ctx = request.context()
        result = RunResult(status=Status.OK, run_id=ctx.run_id, engine=self.name, mode="cranelift")
        over = module.shape.over_caps(request.flow.limits.memory, request.flow.limits.table_elements)
        if over:  # refused before anything is allocated (WasmEdge makes the same check)
            result.status, result.error = Status.OOM, over
            return result
        # A run holds one of the pool's instance slots until its store is closed (here, not whenever the
        # garbage collector gets to it): past POOL_INSTANCES at once, a run waits for a slot.
        slots = self.shared.slots
        if slots is not None and not slots.acquire(timeout=max(0.0, ctx.deadline - time.monotonic())):
            result.status = Status.TIMEOUT
            result.error = (f"deadline of {request.flow.limits.timeout:g}s passed while {self.shared.instances} other "
                            "runs held every instance slot of this process; run fewer at once (workers) or raise "
                            "limits.timeout")
            return result
        stdout, stderr = CappedBuffer(request.flow.limits.output), CappedBuffer(request.flow.limits.output)
        store = wasmtime.Store(self.engine)
        try:
            return self._in_store(module, request, ctx, result, store, stdout, stderr)
        finally:
            ctx.state.pop("_instance", None)
            store.close()
            if slots is not None:
                slots.release()

    def _in_store(self, module: WasmtimeModule, request: RunRequest, ctx: RunContext, result: RunResult,
                  store: wasmtime.Store, stdout: CappedBuffer, stderr: CappedBuffer) -> RunResult:
        flow = request.flow
        limits = flow.limits
        # Per memory and per table, so: one memory (module_shape refuses more), tables sharing the cap.
        store.set_limits(memory_size=limits.memory, table_elements=module.shape.per_table_cap(limits.table_elements),
                         instances=1, memories=1, tables=max(1, len(module.shape.tables)))
        stdin_file = None
        try:
            wasi = wasmtime.WasiConfig()
            args = flow.args if request.args is None else request.args
            _set_argv_env(wasi, (flow.name, *args), wasi_env(flow) if request.env is None else request.env)
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
            if ctx.cancel is None:
                store.set_epoch_deadline(max(1, math.ceil(limits.timeout * 1000 / EPOCH_MS)))
            else:  # cancellable: look at the cancel signal (and the deadline) on every epoch tick
                _set_epoch_callback(store.ptr(), _on_epoch, None, _no_finalizer)
                store.set_epoch_deadline(1)
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
            start = _export_func(store, instance, b"_start")
            try:
                _call_nullary(store, start)
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
        raised = getattr(_current, "raised", None)
        if raised is not None:  # what a host callback could not raise through C
            _current.raised = None
            raise raised
        if ctx.halted is not None:  # whatever unwound the guest, the limit it hit decides the status
            result.status, result.error = Status(ctx.halted[0]), ctx.halted[1]


@dataclass
class SharedEngine:
    """A wasmtime engine with its pool's slot count and its epoch ticker, made once per process.

    Why one per process: wasmtime's engines are meant to be shared, and each pool reserves about
    300 GiB of address space; a process making an engine per runtime (a test suite, a server that
    reloads its flows) ran towards the 128 TiB a process can map."""

    engine: wasmtime.Engine
    slots: "threading.BoundedSemaphore | None"  # None: the default allocator, no slots to count
    instances: int

    @classmethod
    def create(cls, instances: int = POOL_INSTANCES) -> "SharedEngine":
        engine, pooled = _new_engine(instances)
        shared = cls(engine, threading.BoundedSemaphore(instances) if pooled else None, instances)
        # A bare thread: `threading.Thread.start` waits until the new thread runs, which under load
        # cost a first run milliseconds; the ticker needs no join and dies with the process.
        _thread.start_new_thread(_tick, (engine,))
        return shared


def _tick(engine: wasmtime.Engine) -> None:
    while True:
        time.sleep(EPOCH_MS / 1000.0)
        engine.increment_epoch()


_process_engine: "SharedEngine | None" = None
_process_engine_lock = threading.Lock()


def process_engine() -> SharedEngine:
    """The process's shared engine, made on first use."""
    global _process_engine
    with _process_engine_lock:
        if _process_engine is None:
            _process_engine = SharedEngine.create()
        return _process_engine


def _config() -> wasmtime.Config:
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    # Store limits cap each memory, not their sum: a module with several memories would get the
    # cap several times. Such modules are refused at load (module_shape); this makes sure none
    # compiles even if that check were bypassed.
    config.wasm_multi_memory = False
    return config


def _new_engine(instances: int = POOL_INSTANCES) -> tuple[wasmtime.Engine, bool]:
    """The engine, with wasmtime's pooling instance allocator where the process can reserve it.

    Why: with the default allocator every run maps a fresh linear memory and unmaps it at the end; a
    short run (hello) spent a fifth of its time there and in the page faults of new memory. The pool
    reserves `instances` slots of address space once (each as large as a wasm32 memory, 4 GiB,
    and tables as long as `limits.table_elements` allows) and reuses them: instantiation and teardown
    become resetting a slot. The reservation is address space, not memory (PROT_NONE mappings, about
    300 GiB an engine); where a `ulimit -v` leaves no room for it, the engine uses the default allocator. The per-run caps are unchanged: they are the store's limits, not the pool's."""
    config = _config()
    if not _room_for_pool(instances):
        log.warning(
            "the address-space limit (ulimit -v) leaves no room for wasmtime's pooling allocator (%d GiB of "
            "reservations); runs allocate their memory one by one, which is slower: raise the limit to use it",
            _reservation(instances) >> 30)
        return wasmtime.Engine(config), False
    pool = ffi.wasmtime_pooling_allocation_config_new()
    try:
        ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pool, instances)
        ffi.wasmtime_pooling_allocation_config_total_memories_set(pool, instances)
        ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pool, MAX_MEMORY)
        ffi.wasmtime_pooling_allocation_config_max_tables_per_module_set(pool, MAX_TABLES)
        ffi.wasmtime_pooling_allocation_config_total_tables_set(pool, instances * MAX_TABLES)
        ffi.wasmtime_pooling_allocation_config_table_elements_set(pool, MAX_TABLE_ELEMENTS)
        # the instance record grows with a module's functions, globals and imports: room for big modules
        ffi.wasmtime_pooling_allocation_config_max_core_instance_size_set(pool, 16 << 20)
        # No async stacks, GC heaps or components here (module_shape refuses GC types): reserving the
        # default thousand async stacks made creating the engine 2 ms instead of 0.13.
        for setter in ("total_stacks", "total_gc_heaps", "total_component_instances"):
            getattr(ffi, f"wasmtime_pooling_allocation_config_{setter}_set")(pool, 0)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pool)
    return wasmtime.Engine(config), True


def _reservation(instances: int) -> int:
    """Address space a pool of `instances` slots may reserve, with room to spare (wasmtime reserved 258
    GiB of memory slots for 64 here): memory slots and their guards (doubled), tables, instance records."""
    return instances * ((MAX_MEMORY + (128 << 20)) * 2 + 8 * MAX_TABLES * MAX_TABLE_ELEMENTS + (16 << 20))


def _room_for_pool(instances: int) -> bool:
    """Whether this process may reserve the pool: wasmtime's C API aborts the process (a panic, not
    an error) when the reservation fails, so the address-space limit is checked first."""
    if resource is None:  # pragma: no cover - not POSIX
        return True
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return True
    try:  # what the process maps already (Linux); elsewhere a generous guess
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        mapped = 8 << 30
    return soft >= mapped + _reservation(instances)


@functools.lru_cache(maxsize=512)
def _char_array(strings: tuple[str, ...]) -> Any:
    """A C array of the UTF-8 strings, built once per distinct list: the same flow passes the same argv
    and environment on every run. The array owns its buffers; wasmtime copies them."""
    array = (ctypes.c_char_p * len(strings))(*(s.encode("utf-8") for s in strings))
    return ctypes.cast(array, ctypes.POINTER(ctypes.POINTER(ctypes.c_char)))


def _set_argv_env(wasi: wasmtime.WasiConfig, argv: tuple[str, ...], env: dict[str, str]) -> None:
    """`wasi.argv = ...; wasi.env = ...` without re-encoding the same strings on every run."""
    names, values = tuple(env), tuple(env.values())
    if not ffi.wasi_config_set_argv(wasi.ptr(), len(argv), _char_array(argv)):
        raise wasmtime.WasmtimeError("failed to configure argv")
    if not ffi.wasi_config_set_env(wasi.ptr(), len(names), _char_array(names), _char_array(values)):
        raise wasmtime.WasmtimeError("failed to configure environment")


def _deserialize(engine: wasmtime.Engine, code: Any) -> "wasmtime.Module | None":
    """The module compiled into `code` (a writable buffer: the cache's entry), or None where this engine
    cannot load it (another wasmtime version or configuration). `Module.deserialize` would copy the
    code twice before wasmtime copies it into executable memory."""
    ptr = ctypes.POINTER(ffi.wasmtime_module_t)()
    error = ffi.wasmtime_module_deserialize(engine.ptr(), (ctypes.c_uint8 * len(code)).from_buffer(code), len(code),
                                            ctypes.byref(ptr))
    if error:
        wasmtime.WasmtimeError._from_ptr(error)  # frees it
        return None
    return wasmtime.Module._from_ptr(ptr)


def _export_func(store: wasmtime.Store, instance: wasmtime.Instance, name: bytes) -> wasmtime.Func:
    """One exported function by name: `instance.exports(store)` wraps every export, which costs more
    than a short run; `load` has checked that `_start` exists and is a function."""
    item = ffi.wasmtime_extern_t()
    found = ffi.wasmtime_instance_export_get(store._context(), ctypes.byref(instance._instance), name, len(name),
                                             ctypes.byref(item))
    if not found or item.kind != ffi.WASMTIME_EXTERN_FUNC.value:
        raise wasmtime.WasmtimeError(f"the module has no {name.decode()} function")
    return wasmtime.Func._from_raw(item.of.func)


def _call_nullary(store: wasmtime.Store, func: wasmtime.Func) -> None:
    """`func(store)` for a `() -> ()` function such as `_start`, raising what `Func.__call__` raises.

    `Func.__call__` asks the store for the function's type and builds wrappers and lists of its
    parameter and result types on every call; `load` has checked `_start`'s type (and
    wasmtime_func_call checks it again)."""
    with _enter_wasm(store) as trap:
        error = ffi.wasmtime_func_call(store._context(), ctypes.byref(func._func), None, 0, None, 0, trap)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _no_finalizer(_env: Any) -> None:
    return None


# wasmtime_store_epoch_deadline_callback, declared here with a plain pointer for the context: the
# binding's own callback type would build a wasmtime-py wrapper object on every tick.
# (`dll[name]` is a function object of our own: wasmtime-py's keeps its argtypes.)
_set_epoch_callback = ffi.dll["wasmtime_store_epoch_deadline_callback"]
_set_epoch_callback.restype = None
_EPOCH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                                   ctypes.POINTER(ctypes.c_uint8))
# The store as its own pointer type: ctypes.cast would tie the pointer to itself (a reference cycle per run).
_set_epoch_callback.argtypes = [ctypes.POINTER(ffi.wasmtime_store_t), _EPOCH_CALLBACK, ctypes.c_void_p,
                                type(_no_finalizer)]


@_EPOCH_CALLBACK
def _on_epoch(_context: Any, _env: Any, delta: Any, kind: Any) -> int:
    """Epoch deadline callback of a cancellable run, called on the guest's thread every `EPOCH_MS`:
    go on for one more tick, or end the run (cancelled, or past its deadline) with the reason in
    `RunContext.halted`, which decides the status. The same interrupt as the deadline's, so a cancel
    stops a looping guest within one epoch tick of the signal."""
    ctx = getattr(_current, "run", None)
    try:
        reason = ctx.cancelled() if ctx is not None else None
        if ctx is not None and reason is None and ctx.deadline > time.monotonic():
            delta[0] = 1
            kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
            return 0
        if ctx is not None and reason is not None:
            ctx.halted = ("cancelled", reason)
        elif ctx is not None and ctx.halted is None:
            ctx.halted = ("timeout", f"deadline of {ctx.flow.limits.timeout:g}s passed")
    except Exception:  # nothing may raise through C; stop the guest
        log.exception("epoch callback failed")
    error = ffi.wasmtime_error_new(b"wasm trap: interrupt")  # wasmtime owns it from here
    return ctypes.cast(error, ctypes.c_void_p).value or 0


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


def _wasmtime_version() -> str:
    """wasmtime-py's version (it keys the module cache).

    Read from the name of the `wasmtime-X.Y.Z.dist-info` directory beside the package: importlib.metadata
    scans every distribution on the path, about 2 ms. Read once, when this module is imported
    (`WASMTIME_VERSION`): it is a fact about the installation, like a package's `__version__`.
    """
    site = os.path.dirname(os.path.dirname(os.path.abspath(wasmtime.__file__)))
    try:
        for name in os.listdir(site):
            if name.startswith("wasmtime-") and name.endswith(".dist-info"):
                return name[len("wasmtime-"):-len(".dist-info")]
    except OSError:
        pass
    return package_version("wasmtime")


WASMTIME_VERSION = _wasmtime_version()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
