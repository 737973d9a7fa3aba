"""The second engine: WasmEdge through its C API, bound with ctypes (no compiled extension of ours).

Same contract as the wasmtime engine: `WasmEdgeEngine(host, cache_dir)`, `load` once, `run` often, a
fresh instance per run, the same WASI grants, host functions, limits and statuses.

How the WasmEdge pieces map onto that contract:

- **Per engine**: the `wasmflow` and `wasi_ephemeral_nn` host modules, built once from the host's
  engine-neutral `HostFunction`s (`WasmEdge_ModuleInstanceCreate` + `WasmEdge_FunctionInstanceCreate`).
  Every function shares one ctypes trampoline; its `Data` pointer is the function's index. The host
  modules are registered into each run's store (WasmEdge links a module instance into many stores).
- **Per load**: the module parsed and validated into an AST (optionally AOT-compiled first), its
  imports checked against what we provide (so a missing import is a load error, as on wasmtime), and
  its `_start` export and initial memory read. The AST is freed when the loaded module is garbage
  collected or the engine is closed.
- **Per run**: a store, an executor (configured with the flow's memory page cap), a WASI module and
  the guest instance; all released in reverse order whatever happens. Callbacks find their run through
  the calling frame's module instance, which is unique to the run.
- **Deadline**: `_start` runs through `WasmEdge_ExecutorAsyncInvoke`; we wait with
  `WasmEdge_AsyncWaitFor` up to the deadline and then `WasmEdge_AsyncCancel`, which sets the
  executor's stop flag (checked at branches and calls). The executor is per run because that flag is
  per executor.
- **stdout/stderr**: WASI writes to real file descriptors. On WasmEdge 0.16+ the WASI module is
  created with `WasmEdge_ModuleInstanceCreateWASIWithFds`, mapping the guest's fds 0-2 to pipes of
  this run, drained by a thread into a capped buffer (so a guest printing forever costs no more than
  the cap). WasmEdge does not take ownership of those fds; we close them after the WASI module is
  gone. On 0.14/0.15, which lack that function, the process's own fds 0-2 are redirected with `dup2`
  for the duration of a run; that is process-wide, so runs on those versions are serialized. Host-side
  writes into the guest's stdout (WASI-NN stream-stdout, through `RunContext.stdout`) go into the same
  fd, so they keep their order with the guest's own and count against the same cap.
- **AOT** (only where libwasmedge was built with LLVM, i.e. `WasmEdge_CompilerCreate` returns a
  context): modules are validated, compiled once into WasmEdge's universal-wasm format in the cache
  directory (`wasmedge-<version>/`, entries checked by digest) and loaded from there. The code is
  compiled *interruptible*, or `WasmEdge_AsyncCancel` could not stop a loop; that costs speed (about
  5x on bench/engines.py's cpu-heavy guest against non-interruptible code) but the deadline is not
  optional. Elsewhere the interpreter runs the AST, and `RunResult.mode` says which. (WasmEdge falls
  back to the interpreter by itself if a compiled section fails to load; the C API does not report it.)
- **Caps**: the configure context caps the pages of each memory; module_shape refuses modules with
  more than one memory, or with GC types (whose objects WasmEdge allocates outside linear memory).
  WasmEdge has no table limit at all, so a module whose tables could grow past the flow's
  `table_elements` runs from a copy whose table section declares that maximum (parsed, or compiled,
  once per distinct cap and kept with the module): table.grow past it fails inside WasmEdge.
- **WASI clock and random**: host functions of module `wasi_snapshot_preview1` (the transcript's
  `clock_time_get` and `random_get`, so recorded runs replay exactly) are added to each run's WASI
  instance with `WasmEdge_ModuleInstanceAddFunction`, which replaces WasmEdge's own under that name.
- **Halt**: a host call that ends the run (`RunContext.halt`) returns `WasmEdge_Result_Terminate`
  from the trampoline, which unwinds the guest at once; the status comes from `RunContext.halted`.
- **Memory safety**: every object we create is released exactly once, by a `_Releaser` that runs in
  reverse order of creation (AST, configure contexts, module instances, executor, store, async
  handles, function types). Names are passed as borrowed views over Python bytes, which WasmEdge
  copies, so there are no WasmEdge strings to free. Callbacks catch everything: a Python exception
  never unwinds into C.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import select
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from wasmflow.host_functions import Host
from wasmflow.host_functions.config import wasi_env
from wasmflow.host_functions.spec import BoundedMemory, Call, Code, Halt, HostError, HostFunction, RunContext, invoke

from . import wasmedge_capi as capi
from .base import ModuleError, RunRequest, RunResult, Status, read_module
from .cache import ModuleCache, module_sha256
from .module_shape import ModuleShape, ModuleShapeError, cap_tables, inspect
from .outcome import CappedBuffer, classify_failure
from .wasmedge_capi import WASM_PAGE, WasmEdgeUnavailable

log = logging.getLogger("wasmflow.engine.wasmedge")

__all__ = ["WasmEdgeEngine", "WasmEdgeModule", "WasmEdgeUnavailable"]

# How long a cancelled guest may take to reach a stop check before we warn (it is then waited for:
# freeing its store under a running thread would be a use-after-free).
CANCEL_GRACE_MS = 5000
WAIT_SLICE_MS = 200  # the deadline wait wakes this often, so signals reach Python during long runs
CANCEL_SLICE_MS = 10  # a cancellable run's wait wakes this often to look at its cancel signal

# wasi_snapshot_preview1 as the standard defines it (and wasmtime provides). WasmEdge's WASI module
# adds its own socket extension (sock_open, sock_connect, sock_getaddrinfo, ...), which would give a
# guest the network behind the flow's back; imports outside this list are refused at load, so a guest
# links on WasmEdge exactly when it links on wasmtime.
STANDARD_WASI = frozenset(
    """args_get args_sizes_get environ_get environ_sizes_get clock_res_get clock_time_get fd_advise
    fd_allocate fd_close fd_datasync fd_fdstat_get fd_fdstat_set_flags fd_fdstat_set_rights
    fd_filestat_get fd_filestat_set_size fd_filestat_set_times fd_pread fd_prestat_get
    fd_prestat_dir_name fd_pwrite fd_read fd_readdir fd_renumber fd_seek fd_sync fd_tell fd_write
    path_create_directory path_filestat_get path_filestat_set_times path_link path_open path_readlink
    path_remove_directory path_rename path_symlink path_unlink_file poll_oneoff proc_exit proc_raise
    sched_yield random_get sock_accept sock_recv sock_send sock_shutdown""".split()
)
WASI_MODULE = "wasi_snapshot_preview1"

_NAME_MEMORY = capi.Name("memory")
_NAME_START = capi.Name("_start")
_STDIO_LOCK = threading.Lock()  # serializes runs that redirect the process's fds 0-2 (WasmEdge < 0.16)


class _Releaser:
    """Releases C objects in reverse order of creation, each exactly once, never raising."""

    def __init__(self) -> None:
        self._items: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def add(self, fn: Callable[..., Any], *args: Any) -> None:
        self._items.append((fn, args))

    def release(self) -> None:
        while self._items:
            fn, args = self._items.pop()
            try:
                fn(*args)
            except Exception:  # a Python-side cleanup failing must not skip the C releases after it
                log.exception("releasing %s", getattr(fn, "__name__", fn))


class _EdgeMemory(BoundedMemory):
    """GuestMemory over a guest's exported `memory` instance (None: the guest exports none); the bounds
    rule is BoundedMemory's, this supplies only the raw size and copies."""

    __slots__ = ("_lib", "_mem")

    def __init__(self, lib: capi.Lib, mem: Optional[int]) -> None:
        self._lib = lib
        self._mem = mem

    def size(self) -> int:
        return int(self._lib.WasmEdge_MemoryInstanceGetPageSize(self._mem)) * WASM_PAGE if self._mem else 0

    def _pointer(self, ptr: int, length: int) -> int:
        address = self._lib.WasmEdge_MemoryInstanceGetPointer(self._mem, ptr, length)
        if not address:  # WasmEdge's own bounds check agrees with ours, or something is very wrong
            raise HostError(Code.BAD_POINTER, f"range {ptr}+{length} outside guest memory")
        return int(address)

    def _load(self, ptr: int, length: int) -> bytes:
        return ctypes.string_at(self._pointer(ptr, length), length)

    def _store(self, ptr: int, data: bytes) -> None:
        ctypes.memmove(self._pointer(ptr, len(data)), data, len(data))


@dataclass
class _Active:
    """A run as the host-function trampoline sees it."""

    run: RunContext
    memory: _EdgeMemory


class _Dispatch:
    """The host functions and the runs in flight; what the one C callback needs, and nothing that
    refers back to the engine (so an engine nobody closed can still be collected)."""

    def __init__(self, lib: capi.Lib, functions: list[HostFunction]) -> None:
        self.lib = lib
        self.functions = functions
        self.runs: dict[int, _Active] = {}  # guest module instance address -> run
        self.callback = capi.HOST_FUNC(self._trampoline)

    def _trampoline(self, data: Optional[int], frame: Optional[int], params: Any, returns: Any) -> int:
        """Called by WasmEdge on the guest's thread. Returns WasmEdge_Result_Success, failures being
        error codes for the guest, or WasmEdge_Result_Terminate when the call ended the run (`Halt`).
        It must not raise, whatever happens."""
        try:
            fn = self.functions[(data or 0) - 1]
            result_type = fn.results[0] if fn.results else None
            if result_type is not None:
                _set_value(returns[0], int(Code.INTERNAL), result_type, self.lib)
            code = self._call(fn, frame, params)
            if result_type is not None:
                _set_value(returns[0], code, result_type, self.lib)
        except Halt:  # the run's status and reason are in its RunContext.halted
            return capi.RESULT_TERMINATE
        except BaseException:  # noqa: BLE001 - nothing may unwind through C
            try:
                log.exception("host function trampoline failed")
            except BaseException:  # noqa: BLE001
                pass
        return 0

    def _call(self, fn: HostFunction, frame: Optional[int], params: Any) -> int:
        active = self.runs.get(self.lib.WasmEdge_CallingFrameGetModuleInstance(frame) or 0)
        if active is None:  # a call from no run of ours (a start function): refuse, do not crash
            return int(Code.INTERNAL)
        # The raw bits: `invoke` converts each to the kind the function declares.
        return invoke(fn, Call(active.memory, active.run), [params[i].Lo for i in range(len(fn.params))])


def _set_value(value: capi.Value, number: int, kind: str, lib: capi.Lib) -> None:
    if kind == "i32":
        value.Lo = number & 0xFFFFFFFF
        value.Type = lib.i32
    else:
        value.Lo = number & 0xFFFFFFFFFFFFFFFF
        value.Type = lib.i64
    value.Hi = 0


class _Stdio:
    """The guest's fds 0-2 for one run: pipes drained into capped buffers, or the process's own."""

    def __init__(self, request: RunRequest, cap: int, dev_null: int) -> None:
        self.stdout = CappedBuffer(cap)
        self.stderr = CappedBuffer(cap)
        self._own: list[int] = []  # fds we close at the end
        self._thread: Optional[threading.Thread] = None
        self._stdin_file: Optional[Any] = None
        if request.stdin is not None:
            self._stdin_file = tempfile.TemporaryFile(prefix="wasmflow-stdin-")
            self._stdin_file.write(request.stdin)
            self._stdin_file.flush()
            self._stdin_file.seek(0)
            stdin = self._stdin_file.fileno()
        else:
            stdin = 0 if request.inherit_stdio else dev_null
        if request.inherit_stdio:
            self.fds = (stdin, 1, 2)
            return
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._own += [out_w, err_w]
        self.fds = (stdin, out_w, err_w)
        self._thread = threading.Thread(
            target=_drain, args=({out_r: self.stdout, err_r: self.stderr},), name="wasmedge-stdio", daemon=True
        )
        try:
            self._thread.start()
        except BaseException:
            self._thread = None
            for fd in (out_r, err_r):
                os.close(fd)
            self.close()
            raise

    def write_stdout(self, data: bytes) -> int:
        """Host-side writes into the guest's stdout (WASI-NN stream-stdout): into the same fd the guest
        writes to, so they land in order with its own output and under the same cap. The drain thread
        reads to EOF, so the write cannot block for good; after the run, writes are dropped."""
        fd = self.fds[1]
        if fd != 1 and fd not in self._own:  # closed: the run is over
            return 0
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:  # the process's own stdout closed under us (inherit_stdio): nothing to keep
            pass
        return len(data)

    def close(self) -> None:
        """After the WASI module is gone: close our write ends, wait for the drain to see EOF."""
        for fd in self._own:
            os.close(fd)
        self._own = []
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._stdin_file is not None:
            self._stdin_file.close()
            self._stdin_file = None


def _drain(buffers: dict[int, CappedBuffer]) -> None:
    """Read the run's pipes to EOF. Never stops early: a pipe nobody reads would block the guest in
    a WASI write, where the deadline cannot reach it."""
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while buffers:
        for fd, _ in poller.poll():
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if chunk:
                buffers[fd].write(chunk)
            else:
                poller.unregister(fd)
                os.close(fd)
                del buffers[fd]


@contextlib.contextmanager
def _redirect_process_stdio(fds: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    """WasmEdge < 0.16 only: point the process's fds 0-2 at the run's for the length of the run."""
    with _STDIO_LOCK:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        saved = [os.dup(fd) for fd in (0, 1, 2)]
        try:
            for target, fd in zip((0, 1, 2), fds):
                if target != fd:
                    os.dup2(fd, target)
            yield
        finally:
            for target, fd in zip((0, 1, 2), saved):
                os.dup2(fd, target)
                os.close(fd)


_AS_WRITTEN = -1  # key of the module's own AST in WasmEdgeModule._asts (others: a table cap)


@dataclass(eq=False)  # identity semantics: hashable, so the engine can track it weakly
class WasmEdgeModule:
    """A loaded module: its validated AST, shared by every run of the flow, and the copies of it
    whose tables are capped for a flow's `table_elements` (made on first need)."""

    flow_name: str
    path: Path
    mode: str  # "interpreter" or "aot"
    from_cache: bool
    shape: ModuleShape
    sha256: str  # of the bytes loaded (LoadedModule)
    _wasm: bytes = field(default=b"", repr=False)
    _asts: dict[int, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _release: Optional[Callable[[], Any]] = field(default=None, repr=False)

    @property
    def _ast(self) -> Optional[int]:
        return self._asts.get(_AS_WRITTEN)

    def _free(self) -> None:
        """Free the ASTs (when the object is collected, or its engine closes after its last run)."""
        if self._release is not None:
            self._release()
        self._asts.clear()


def _delete_asts(lib: capi.Lib, asts: dict[int, int]) -> None:
    for ast in asts.values():
        lib.WasmEdge_ASTModuleDelete(ast)
    asts.clear()


class WasmEdgeEngine:
    name = "wasmedge"

    def __init__(self, host: Host, cache_dir: Path) -> None:
        lib = capi.load()  # WasmEdgeUnavailable, with installation advice, when there is none
        self.lib = lib
        self.host = host
        self.version = lib.version
        self.cache = ModuleCache(Path(cache_dir) / f"wasmedge-{lib.version}")
        self._map_fds = lib.has_fd_mapping
        functions = host.functions()
        for fn in functions:
            if any(t not in ("i32", "i64") for t in (*fn.wasm_params, *fn.results)) or len(fn.results) > 1:
                raise ValueError(f"{fn.module}::{fn.name}: only i32/i64 parameters and at most one result are supported")
        self._dispatch = _Dispatch(lib, functions)
        self._lock = threading.Condition()
        self._closed = False
        self._running = 0
        self._modules: "weakref.WeakSet[WasmEdgeModule]" = weakref.WeakSet()
        self._confs: dict[int, int] = {}  # memory page cap -> WasmEdge_ConfigureContext*
        self._owned = _Releaser()  # engine-lifetime C objects
        self._finalizer = weakref.finalize(self, self._owned.release)
        try:
            self._build()
        except BaseException:
            self._owned.release()
            raise

    def _build(self) -> None:
        lib = self.lib
        self._owned.add(lambda cb: None, self._dispatch.callback)  # keep the callback alive to the very end
        self._base_conf = _check(lib.WasmEdge_ConfigureCreate(), "WasmEdge_ConfigureCreate")
        self._owned.add(lib.WasmEdge_ConfigureDelete, self._base_conf)
        self._owned.add(_delete_confs, lib, self._confs)
        self.dev_null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._owned.add(os.close, self.dev_null)
        self.mode = "interpreter"
        if lib.WasmEdge_CompilerCreate is not None:
            compiler = lib.WasmEdge_CompilerCreate(self._base_conf)
            if compiler:  # NULL where the library was built without LLVM
                lib.WasmEdge_CompilerDelete(compiler)
                lib.WasmEdge_ConfigureCompilerSetInterruptible(self._base_conf, True)  # AsyncCancel must stop AOT code
                if lib.WasmEdge_ConfigureSetRunMode is not None:
                    lib.WasmEdge_ConfigureSetRunMode(self._base_conf, capi.RUN_MODE_AOT)
                self.mode = "aot"
        # What a guest may import, with the types it must import it at.
        self._import_types: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {}
        scratch = _check(lib.WasmEdge_ModuleInstanceCreateWASI(None, 0, None, 0, None, 0), "WASI module")
        try:
            for wasi_name in sorted(STANDARD_WASI):
                func = lib.WasmEdge_ModuleInstanceFindFunction(scratch, capi.Name(wasi_name).s)
                if func:
                    self._import_types[(WASI_MODULE, wasi_name)] = self._signature(
                        lib.WasmEdge_FunctionInstanceGetFunctionType(func)
                    )
        finally:
            lib.WasmEdge_ModuleInstanceDelete(scratch)
        # One host module per import module name, shared by every run.
        self._host_modules: list[int] = []
        by_module: dict[str, list[tuple[int, HostFunction]]] = {}
        # Host functions of the WASI module itself (the clock and random values, served by the host so
        # that transcripts record them) are added to each run's WASI instance instead, replacing its own.
        self._wasi_functions: list[tuple[int, int]] = []  # (dispatch index, function type)
        for index, fn in enumerate(self._dispatch.functions, start=1):
            if fn.module == WASI_MODULE:
                ftype = self._function_type(fn)
                self._owned.add(lib.WasmEdge_FunctionTypeDelete, ftype)
                self._wasi_functions.append((index, ftype))
                continue
            by_module.setdefault(fn.module, []).append((index, fn))
        for module_name, entries in by_module.items():
            module = _check(lib.WasmEdge_ModuleInstanceCreate(capi.Name(module_name).s), "host module")
            self._owned.add(lib.WasmEdge_ModuleInstanceDelete, module)  # deletes its functions too
            self._host_modules.append(module)
            for index, fn in entries:
                params = [self._valtype(t) for t in fn.wasm_params]
                results = [self._valtype(t) for t in fn.results]
                ftype = _check(
                    lib.WasmEdge_FunctionTypeCreate(
                        (capi.ValType * max(1, len(params)))(*params), len(params),
                        (capi.ValType * max(1, len(results)))(*results), len(results),
                    ),
                    "function type",
                )
                try:
                    self._import_types[(fn.module, fn.name)] = self._signature(ftype)
                    func = _check(
                        lib.WasmEdge_FunctionInstanceCreate(ftype, self._dispatch.callback, index, 0), "host function"
                    )
                    lib.WasmEdge_ModuleInstanceAddFunction(module, capi.Name(fn.name).s, func)  # module owns it now
                finally:
                    lib.WasmEdge_FunctionTypeDelete(ftype)  # the function instance keeps its own copy

    def _function_type(self, fn: HostFunction) -> int:
        params = [self._valtype(t) for t in fn.wasm_params]
        results = [self._valtype(t) for t in fn.results]
        return _check(self.lib.WasmEdge_FunctionTypeCreate(
            (capi.ValType * max(1, len(params)))(*params), len(params),
            (capi.ValType * max(1, len(results)))(*results), len(results)), "function type")

    def _override_wasi(self, wasi: int) -> None:
        """Put the host's clock_time_get and random_get into this run's WASI instance (a module instance
        keeps the last function added under a name, so these replace WasmEdge's own)."""
        lib = self.lib
        for index, ftype in self._wasi_functions:
            fn = self._dispatch.functions[index - 1]
            func = _check(lib.WasmEdge_FunctionInstanceCreate(ftype, self._dispatch.callback, index, 0), "host function")
            lib.WasmEdge_ModuleInstanceAddFunction(wasi, capi.Name(fn.name).s, func)  # the WASI module owns it now

    def _valtype(self, kind: str) -> capi.ValType:
        return self.lib.i32 if kind == "i32" else self.lib.i64

    def _signature(self, ftype: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        lib = self.lib
        n_params = lib.WasmEdge_FunctionTypeGetParametersLength(ftype)
        params = (capi.ValType * max(1, n_params))()
        lib.WasmEdge_FunctionTypeGetParameters(ftype, params, n_params)
        n_results = lib.WasmEdge_FunctionTypeGetReturnsLength(ftype)
        results = (capi.ValType * max(1, n_results))()
        lib.WasmEdge_FunctionTypeGetReturns(ftype, results, n_results)
        return (
            tuple(lib.type_name(params[i]) for i in range(n_params)),
            tuple(lib.type_name(results[i]) for i in range(n_results)),
        )

    def _conf_for(self, memory_cap: int) -> int:
        """The configure context of executors with this memory cap (one per distinct cap)."""
        pages = max(1, min(memory_cap // WASM_PAGE, 65536))
        with self._lock:
            conf = self._confs.get(pages)
            if conf is None:
                conf = _check(self.lib.WasmEdge_ConfigureCreate(), "WasmEdge_ConfigureCreate")
                self.lib.WasmEdge_ConfigureSetMaxMemoryPage(conf, pages)
                self._confs[pages] = conf
            return conf

    def close(self) -> None:
        """Wait for runs in flight, then free every loaded module and every engine-wide object."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._running:
                self._lock.wait()
        for module in list(self._modules):
            module._free()
        self._finalizer()

    # -- loading -------------------------------------------------------------------------------

    def load(self, path: Path, flow_name: str) -> WasmEdgeModule:
        path = Path(path)
        wasm = read_module(path, flow_name)
        with self._lock:
            if self._closed:
                raise RuntimeError("the WasmEdge engine is closed")
        try:
            shape = inspect(wasm)
        except ModuleShapeError as exc:
            self.lib.WasmEdge_ASTModuleDelete(self._parse(wasm, flow_name, path))  # WasmEdge's own error first
            raise ModuleError(f"flow {flow_name!r}: {path} cannot be run: {exc}") from None
        refusal = shape.refusal()
        if refusal:
            raise ModuleError(f"flow {flow_name!r}: {path} cannot be run: {refusal}")
        code, from_cache = wasm, False
        digest = module_sha256(wasm)
        if self.mode == "aot":
            # Validate first, so an invalid module gets the interpreter's error and is never compiled.
            self.lib.WasmEdge_ASTModuleDelete(self._parse(wasm, flow_name, path))
            code, from_cache = self.cache.get_or_compile(wasm, lambda: self._compile(wasm, flow_name, path), digest)
        ast = self._parse(code, flow_name, path)
        try:
            self._link_check(ast, flow_name, path)
            module = WasmEdgeModule(flow_name, path, self.mode, from_cache, shape, digest, wasm, {_AS_WRITTEN: ast})
        except BaseException:
            self.lib.WasmEdge_ASTModuleDelete(ast)
            raise
        # Freed exactly once: when the module is collected, closed, or the engine closes.
        module._release = weakref.finalize(module, _delete_asts, self.lib, module._asts)
        self._modules.add(module)
        return module

    def _ast_for(self, module: WasmEdgeModule, per_table: int) -> int:
        """The AST to run under a cap of `per_table` elements a table: the module's own where its
        tables cannot grow past it, else a copy declaring that maximum (made once per cap)."""
        if module.shape.tables_within(per_table):
            return module._asts[_AS_WRITTEN]
        with module._lock:
            ast = module._asts.get(per_table)
            if ast is None:
                wasm = cap_tables(module._wasm, module.shape, per_table)
                code = wasm
                if self.mode == "aot":
                    code, _ = self.cache.get_or_compile(wasm, lambda: self._compile(wasm, module.flow_name, module.path))
                ast = module._asts[per_table] = self._parse(code, module.flow_name, module.path)
            return ast

    def _compile(self, wasm: bytes, flow_name: str, path: Path) -> bytes:
        """AOT-compile into WasmEdge's universal-wasm format (only where the library has LLVM)."""
        lib = self.lib
        compiler = _check(lib.WasmEdge_CompilerCreate(self._base_conf), "WasmEdge_CompilerCreate")
        try:
            with tempfile.TemporaryDirectory(prefix="wasmflow-aot-") as tmp:
                out = Path(tmp) / "module.wasm"
                buf = (ctypes.c_uint8 * len(wasm)).from_buffer_copy(wasm)
                res = lib.WasmEdge_CompilerCompileFromBytes(
                    compiler, capi.Bytes(len(wasm), ctypes.addressof(buf)), str(out).encode()
                )
                if not lib.ok(res):
                    raise ModuleError(f"flow {flow_name!r}: {path} could not be AOT-compiled: {lib.message(res)}")
                return out.read_bytes()
        finally:
            lib.WasmEdge_CompilerDelete(compiler)

    def _parse(self, code: bytes, flow_name: str, path: Path) -> int:
        lib = self.lib
        buf = (ctypes.c_uint8 * len(code)).from_buffer_copy(code)
        ast = ctypes.c_void_p()
        loader = _check(lib.WasmEdge_LoaderCreate(self._base_conf), "WasmEdge_LoaderCreate")
        try:
            res = lib.WasmEdge_LoaderParseFromBytes(loader, ctypes.byref(ast), capi.Bytes(len(code), ctypes.addressof(buf)))
        finally:
            lib.WasmEdge_LoaderDelete(loader)
        if not lib.ok(res):
            if ast.value:
                lib.WasmEdge_ASTModuleDelete(ast.value)
            raise ModuleError(f"flow {flow_name!r}: {path} is not a valid module: {lib.message(res)}")
        validator = _check(lib.WasmEdge_ValidatorCreate(self._base_conf), "WasmEdge_ValidatorCreate")
        try:
            res = lib.WasmEdge_ValidatorValidate(validator, ast.value)
        finally:
            lib.WasmEdge_ValidatorDelete(validator)
        if not lib.ok(res):
            lib.WasmEdge_ASTModuleDelete(ast.value)
            raise ModuleError(f"flow {flow_name!r}: {path} is not a valid module: {lib.message(res)}")
        return int(ast.value)  # type: ignore[arg-type]

    def _link_check(self, ast: int, flow_name: str, path: Path) -> None:
        """Refuse, at load, a module importing anything we do not provide at the type it expects (its
        `_start` was checked with its shape)."""
        lib = self.lib
        count = lib.WasmEdge_ASTModuleListImportsLength(ast)
        imports = (ctypes.c_void_p * max(1, count))()
        lib.WasmEdge_ASTModuleListImports(ast, imports, count)
        for i in range(count):
            imp = imports[i]
            qualified = (
                capi.read_string(lib.WasmEdge_ImportTypeGetModuleName(imp)),
                capi.read_string(lib.WasmEdge_ImportTypeGetExternalName(imp)),
            )
            where = f"`{qualified[0]}::{qualified[1]}`"
            expected = self._import_types.get(qualified)
            if lib.WasmEdge_ImportTypeGetExternalType(imp) != capi.EXTERNAL_FUNCTION or expected is None:
                raise ModuleError(f"flow {flow_name!r}: {path} cannot be linked: unknown import: {where} has not been defined")
            if self._signature(lib.WasmEdge_ImportTypeGetFunctionType(ast, imp)) != expected:
                raise ModuleError(f"flow {flow_name!r}: {path} cannot be linked: incompatible import type for {where}")

    # -- running -------------------------------------------------------------------------------

    def run(self, module: WasmEdgeModule, request: RunRequest) -> RunResult:
        with self._lock:
            if self._closed or module._ast is None:
                raise RuntimeError("the WasmEdge engine or this module is closed")
            self._running += 1
        try:
            return self._run(module, request)
        finally:
            with self._lock:
                self._running -= 1
                self._lock.notify_all()

    def _run(self, module: WasmEdgeModule, request: RunRequest) -> RunResult:
        flow = request.flow
        limits = flow.limits
        ctx = request.context()
        result = RunResult(status=Status.OK, run_id=ctx.run_id, engine=self.name, mode=module.mode)
        memory_bytes = [0]
        # Before anything is allocated; WasmEdge would also silently shrink an initial memory over the cap.
        over = module.shape.over_caps(limits.memory, limits.table_elements)
        if over:
            result.status, result.error = Status.OOM, over
            return result
        try:
            ast = self._ast_for(module, module.shape.per_table_cap(limits.table_elements))
        except (ModuleError, ModuleShapeError) as exc:
            result.status, result.error = Status.INVALID, str(exc)
            return result
        missing = [g.host for g in flow.allow.dir_grants if not os.path.isdir(g.host)]
        if missing:  # WasmEdge would skip such a preopen silently; a flow's grant must not vanish quietly
            result.status = Status.INVALID
            result.error = f"flow {flow.name!r}: allow.dirs names {missing[0]}, which is not a directory"
            return result
        stdio = _Stdio(request, limits.output, self.dev_null)
        ctx.stdout = stdio.write_stdout
        try:
            if self._map_fds:
                self._execute(ast, request, ctx, stdio, result, memory_bytes)
            else:
                with _redirect_process_stdio(stdio.fds):
                    self._execute(ast, request, ctx, stdio, result, memory_bytes)
        finally:
            stdio.close()
        result.stdout, result.stderr = stdio.stdout.value(ctx, "stdout"), stdio.stderr.value(ctx, "stderr")
        for attr in ("logs", "output", "response_status", "response_headers", "response_body", "denials",
                     "upstream_failures", "truncated"):
            setattr(result, attr, getattr(ctx, attr))
        if not result.ok:
            classify_failure(result, memory_bytes=memory_bytes[0], memory_cap=limits.memory)
        return result

    def _create_wasi(self, request: RunRequest, stdio: _Stdio) -> int:
        flow = request.flow
        args = flow.args if request.args is None else request.args
        argv, argc = capi.c_strings([s.encode() for s in (flow.name, *args)])
        env = wasi_env(flow) if request.env is None else request.env
        envs, envc = capi.c_strings([f"{k}={v}".encode() for k, v in env.items()])
        dirs = []
        for grant in flow.allow.dir_grants:  # WasmEdge's form: guest:host[:readonly]
            dirs.append(f"{grant.guest}:{grant.host}{':readonly' if grant.read_only else ''}".encode())
        pre, prec = capi.c_strings(dirs)
        if self._map_fds:
            wasi = self.lib.WasmEdge_ModuleInstanceCreateWASIWithFds(argv, argc, envs, envc, pre, prec, *stdio.fds)
        else:
            wasi = self.lib.WasmEdge_ModuleInstanceCreateWASI(argv, argc, envs, envc, pre, prec)
        return _check(wasi, "WASI module")

    def _execute(
        self,
        ast: int,
        request: RunRequest,
        ctx: RunContext,
        stdio: _Stdio,
        result: RunResult,
        memory_bytes: list[int],
    ) -> None:
        lib = self.lib
        owned = _Releaser()
        t0 = time.perf_counter()
        try:
            store = _check(lib.WasmEdge_StoreCreate(), "WasmEdge_StoreCreate")
            owned.add(lib.WasmEdge_StoreDelete, store)
            executor = _check(lib.WasmEdge_ExecutorCreate(self._conf_for(ctx.flow.limits.memory), None), "executor")
            owned.add(lib.WasmEdge_ExecutorDelete, executor)
            wasi = self._create_wasi(request, stdio)
            owned.add(lib.WasmEdge_ModuleInstanceDelete, wasi)
            self._override_wasi(wasi)
            for imported in (wasi, *self._host_modules):
                res = lib.WasmEdge_ExecutorRegisterImport(executor, store, imported)
                if not lib.ok(res):
                    result.status, result.error = Status.INVALID, f"registering imports failed: {lib.message(res)}"
                    return
            self.host.open_run(ctx)
            owned.add(self.host.close_run, ctx)
            instance = ctypes.c_void_p()
            res = lib.WasmEdge_ExecutorInstantiate(executor, ctypes.byref(instance), store, ast)
            if instance.value:
                owned.add(lib.WasmEdge_ModuleInstanceDelete, instance.value)
            if not lib.ok(res) or not instance.value:
                result.status, result.error = Status.TRAP, f"instantiation failed: {lib.message(res)}"
                return
            memory = lib.WasmEdge_ModuleInstanceFindMemory(instance.value, _NAME_MEMORY.s)
            guest_memory = _EdgeMemory(lib, memory)
            self._dispatch.runs[instance.value] = _Active(ctx, guest_memory)
            owned.add(self._dispatch.runs.pop, instance.value, None)
            start = lib.WasmEdge_ModuleInstanceFindFunction(instance.value, _NAME_START.s)
            t1 = time.perf_counter()
            result.instantiate_ms = (t1 - t0) * 1000
            try:
                res, timed_out = self._invoke(executor, start, ctx)
            finally:
                result.run_ms = (time.perf_counter() - t1) * 1000
                memory_bytes[0] = guest_memory.size()
            self._outcome(res, timed_out, wasi, ctx, result)
        finally:
            owned.release()

    def _invoke(self, executor: int, start: int, ctx: RunContext) -> tuple[capi.Result, bool]:
        """Run `_start` on WasmEdge's async thread and stop it at the deadline.

        The wait is sliced so that a signal (Ctrl-C) reaches Python during a long run; whatever
        interrupts the wait, the guest is stopped and waited for before its store can be freed.
        """
        lib = self.lib
        handle = _check(lib.WasmEdge_ExecutorAsyncInvoke(executor, start, None, 0), "WasmEdge_ExecutorAsyncInvoke")
        try:
            timed_out = False
            slice_ms = WAIT_SLICE_MS if ctx.cancel is None else CANCEL_SLICE_MS
            try:
                while not lib.WasmEdge_AsyncWaitFor(handle, min(slice_ms, max(0, math.ceil(ctx.remaining() * 1000)))):
                    if ctx.remaining() <= 0:
                        reason = ctx.cancelled()
                        if reason is not None and (ctx.halted is None or ctx.halted[0] == "timeout"):
                            ctx.halted = ("cancelled", reason)  # stopped the deadline's way, but on request
                        timed_out = True
                        lib.WasmEdge_AsyncCancel(handle)
                        if not lib.WasmEdge_AsyncWaitFor(handle, CANCEL_GRACE_MS):
                            # Inside a blocking WASI call, which the stop flag cannot interrupt. Its
                            # store must outlive it, so wait (wasmtime waits the same way).
                            log.warning("run %s: guest still inside a blocking call %d ms after its deadline",
                                        ctx.run_id, CANCEL_GRACE_MS)
                            lib.WasmEdge_AsyncWait(handle)
                        break
            except BaseException:
                lib.WasmEdge_AsyncCancel(handle)
                lib.WasmEdge_AsyncWait(handle)
                raise
            return lib.WasmEdge_AsyncGet(handle, None, 0), timed_out
        finally:
            lib.WasmEdge_AsyncDelete(handle)

    def _outcome(self, res: capi.Result, timed_out: bool, wasi: int, ctx: RunContext, result: RunResult) -> None:
        lib = self.lib
        if ctx.halted is not None:  # a host call ended the run (it returned Terminate): its limit decides
            result.status, result.error = Status(ctx.halted[0]), ctx.halted[1]
            return
        category, code = lib.code(res)
        if category == capi.CATEGORY_WASM and code == capi.ERR_SUCCESS:
            return
        if category == capi.CATEGORY_WASM and code == capi.ERR_TERMINATED:  # proc_exit
            result.exit_code = int(lib.WasmEdge_ModuleInstanceWASIGetExitCode(wasi))
            if result.exit_code:
                result.status = Status.ERROR
                result.error = f"the guest exited with code {result.exit_code}"
            return
        if category == capi.CATEGORY_WASM and code == capi.ERR_INTERRUPTED:
            result.status = Status.TIMEOUT
            result.error = f"deadline of {ctx.flow.limits.timeout:g}s passed"
            return
        result.status = Status.TRAP
        result.error = f"wasm trap: {lib.message(res)}"
        if timed_out:  # cancelled, but it trapped before it noticed: still a timeout
            result.status = Status.TIMEOUT
            result.error = f"deadline of {ctx.flow.limits.timeout:g}s passed"


def _delete_confs(lib: capi.Lib, confs: dict[int, int]) -> None:
    for conf in confs.values():
        lib.WasmEdge_ConfigureDelete(conf)
    confs.clear()


def _check(pointer: Optional[int], what: str) -> int:
    """A C constructor's result, or MemoryError: WasmEdge returns NULL only when it cannot allocate."""
    if not pointer:
        raise MemoryError(f"WasmEdge could not create {what}")
    return int(pointer)
