"""The WASI-NN capability (import module `wasi_ephemeral_nn`), described once for every engine.

Twelve functions with WasmEdge's signatures and numbering (`abi.py`). What this module adds to the back
ends is the sandbox: every guest pointer is bounds-checked (a bad one is invalid_argument, as in
WasmEdge, and is recorded as a denial), graph and context handles are per run (counting up from 0), a
run may use only the models in its flow's `allow.models`, and outputs follow WasmEdge's buffer rule
(docs/wasi-nn.md): a non-zero maximum is honoured (too_large, nothing copied, the needed size written); a
maximum of 0 (what LlamaEdge passes) gets the whole output if it fits in the guest's memory.

A model outside `allow.models` answers not_found, the same as a model that does not exist, and records a
denial: the guest learns nothing about what else the host has loaded, and a run that then fails is
reported as `denied`, which is what an operator needs to see.

A model from the guest (bytes given to `load`, or a file in the flow's `allow.dirs`) is a capability
of its own, `allow.nn.load_bytes` (at most `allow.nn.max_bytes`); without it `load` answers
unsupported_operation and records a denial. Such a model is untrusted input: it may name no host file,
and what it allocates is held to the flow's `limits.memory` (`onnx_guard.py`, `gguf_guard.py`). Every
back-end call, on any model, stops at the run's deadline; a limit hit inside a call ends the run
(`RunContext.halt`) with status `timeout` or `oom`.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from wasmflow.host_functions.spec import BoundedMemory, Call, Capability, HostError, HostFunction, RunContext, Setup

from .abi import (
    BUILDER_STRUCT,
    MAX_DIMS,
    MODULE,
    TENSOR_STRUCT,
    Encoding,
    NNDenied,
    NNError,
    NNFailure,
    NNHalt,
    Target,
    Tensor,
    tensor_type_word,
)
from .registry import ModelRegistry

log = logging.getLogger("wasmflow.wasi_nn")

MAX_BUILDERS = 16
MAX_GRAPHS = 64
MAX_CONTEXTS = 64
MAX_WAIT = 3600.0  # seconds a run may queue for a llama context when it has no deadline
REFERENCE_MAX = 4096  # an ONNX builder shorter than this that reads as a path is a path, not model bytes
DEFAULT_MEMORY = 256 * 1024**2  # a flow without limits (tests driving the capability directly)


@dataclass
class GraphHandle:
    model: Any  # GgmlModel | OnnxModel
    encoding: Encoding
    name: str
    params: Any = None  # GgmlParams for GGML graphs (per run: config of this graph)


@dataclass
class NNRunState:
    graphs: list[Optional[GraphHandle]] = field(default_factory=list)
    contexts: list[Optional[Any]] = field(default_factory=list)
    by_name: dict[str, int] = field(default_factory=dict)


class _Mem(BoundedMemory):
    """The call's guest memory with WASI-NN's error: an out-of-bounds access is invalid_argument (and a
    denial), not BAD_POINTER. The bounds rule is BoundedMemory's."""

    __slots__ = ("mem", "run", "fn", "_size")

    def __init__(self, call: Call, fn: str) -> None:
        self.mem = call.memory
        self.run = call.run
        self.fn = fn
        self._size = -1

    def size(self) -> int:
        # Memory cannot grow while the guest is inside a host call: ask the engine once per call.
        if self._size < 0:
            self._size = self.mem.size()
        return self._size

    def _oob(self, ptr: int, length: int) -> NNFailure:
        reason = f"wasi_ephemeral_nn::{self.fn}: range {ptr}+{length} outside guest memory of {self.size()} bytes"
        self.run.denials.append(reason)
        return NNFailure(NNError.INVALID_ARGUMENT, reason)

    def _load(self, ptr: int, length: int) -> bytes:
        try:
            return self.mem.read(ptr, length)
        except HostError:
            raise self._oob(ptr, length) from None

    def _store(self, ptr: int, data: bytes) -> None:
        try:
            self.mem.write(ptr, data)
        except HostError:
            raise self._oob(ptr, len(data)) from None


def _nn(fn_name: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Run a body with WASI-NN error semantics: NNFailure -> its code; a guest without memory ->
    missing_memory; a bug of ours -> runtime_error (logged), never an exception into the engine."""

    def wrap(body: Callable[..., int]) -> Callable[..., int]:
        def call(self: "WasiNNCapability", c: Call, *args: int) -> int:
            mem = _Mem(c, fn_name)
            if mem.size() == 0:
                return int(NNError.MISSING_MEMORY)
            try:
                return int(body(self, mem, c.run, *args))
            except NNFailure as exc:
                if isinstance(exc, NNHalt):  # a limit hit inside the call ends the run
                    c.run.halt(exc.status, f"wasi_ephemeral_nn::{fn_name}: {exc.message}")
                elif isinstance(exc, NNDenied):
                    c.run.denials.append(f"wasi_ephemeral_nn::{fn_name}: {exc.message}")
                if exc.code not in (NNError.END_OF_SEQUENCE, NNError.CONTEXT_FULL):
                    log.info("wasi-nn %s in run %s: %s (%s)", fn_name, c.run.run_id, exc.message, exc.code.name.lower())
                return int(exc.code)
            except Exception:
                log.exception("wasi-nn %s failed in run %s", fn_name, c.run.run_id)
                return int(NNError.RUNTIME_ERROR)

        call.__name__ = fn_name
        return call

    return wrap


class WasiNNCapability(Capability):
    """WASI-NN for guests: module `wasi_ephemeral_nn`, the shared model registry, per-run handles."""

    name = "nn"

    def __init__(self, registry: ModelRegistry, stdout: Optional[Callable[[bytes], None]] = None) -> None:
        self.registry = registry
        self.stdout = stdout  # where stream-stdout goes when the engine offers no writer (wasmflow exec)

    @classmethod
    def build(cls, setup: Setup) -> "WasiNNCapability":
        return cls.from_flows(setup.flows, setup.base_dir, setup.state_dir)

    @classmethod
    def from_flows(cls, flows: Any, base_dir: Any = None, state_dir: Any = None, preloads: Any = ()) -> "WasiNNCapability":
        """The capability for a FlowsFile's `models:` (paths relative to flows.yaml) plus preloads
        (`preloads` and WASMFLOW_NN_PRELOAD). Models load lazily, on first use."""
        from pathlib import Path

        registry = ModelRegistry.from_config(
            getattr(flows, "models", {}) or {},
            base_dir=Path(base_dir) if base_dir is not None else None,
            preloads=preloads,
            cache_dir=Path(state_dir) / "nn-cache" if state_dir is not None else None,
        )
        return cls(registry)

    # -- capability plumbing -----------------------------------------------------------------

    def functions(self) -> list[HostFunction]:
        table = [
            ("load", "ptr u32 u32 u32 ptr", self.load),
            ("load_by_name", "ptr len ptr", self.load_by_name),
            ("load_by_name_with_config", "ptr len ptr len ptr", self.load_by_name_with_config),
            ("init_execution_context", "u32 ptr", self.init_execution_context),
            ("set_input", "u32 u32 ptr", self.set_input),
            ("compute", "u32", self.compute),
            ("get_output", "u32 u32 ptr len ptr", self.get_output),
            ("compute_single", "u32", self.compute_single),
            ("get_output_single", "u32 u32 ptr len ptr", self.get_output_single),
            ("fini_single", "u32", self.fini_single),
            ("unload", "u32", self.unload),
            ("finalize_execution_context", "u32", self.finalize_execution_context),
        ]
        return [HostFunction(MODULE, name, kinds, ("i32",), body) for name, kinds, body in table]

    def open_run(self, run: RunContext) -> None:
        run.state[self.name] = NNRunState()

    def close_run(self, run: RunContext) -> None:
        """Give back every llama context the run still holds (a guest that never called fini_single)."""
        state: Optional[NNRunState] = run.state.pop(self.name, None)
        if state is None:
            return
        for ctx in state.contexts:
            if ctx is not None:
                try:
                    ctx.close()
                except Exception:
                    log.exception("closing a wasi-nn context of run %s", run.run_id)
        state.contexts.clear()
        state.graphs.clear()

    def close(self) -> None:
        self.registry.close()

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _state(run: RunContext) -> NNRunState:
        state = run.state.get("nn")
        if state is None:  # a run opened without open_run (tests driving bodies directly)
            state = run.state["nn"] = NNRunState()
        return state

    @staticmethod
    def _allowed(run: RunContext) -> list[str]:
        flow = run.flow
        allow = getattr(flow, "allow", None)
        return list(getattr(allow, "models", []) or [])

    def _check_allowed(self, run: RunContext, name: str) -> None:
        if name not in self._allowed(run):
            run.denials.append(f"wasi_ephemeral_nn: model {name!r} is not in allow.models of flow {getattr(run.flow, 'name', '?')!r}")
            raise NNFailure(NNError.NOT_FOUND, f"model {name!r} not found (or not allowed)")
        self.registry.entry(name)  # allowed but not configured: not_found

    def _add_graph(self, run: RunContext, handle: GraphHandle) -> int:
        state = self._state(run)
        if len(state.graphs) >= MAX_GRAPHS:
            raise NNFailure(NNError.TOO_LARGE, f"more than {MAX_GRAPHS} graphs in one run")
        state.graphs.append(handle)
        return len(state.graphs) - 1

    def _graph(self, run: RunContext, graph: int) -> GraphHandle:
        state = self._state(run)
        if graph >= len(state.graphs) or state.graphs[graph] is None:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"no graph {graph}")
        return state.graphs[graph]  # type: ignore[return-value]

    def _ctx(self, run: RunContext, ctx: int) -> Any:
        state = self._state(run)
        if ctx >= len(state.contexts) or state.contexts[ctx] is None:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"no execution context {ctx}")
        return state.contexts[ctx]

    def _named_graph(self, run: RunContext, name: str, config: Optional[bytes]) -> int:
        state = self._state(run)
        if name in state.by_name:  # WasmEdge caches by name and ignores a new config
            return state.by_name[name]
        self._check_allowed(run, name)
        entry = self.registry.entry(name)
        model = self.registry.model(name)
        params = None
        if entry.encoding == Encoding.GGML:
            from .ggml_params import parse_metadata_bytes

            params = model.base
            if config:
                params = parse_metadata_bytes(params, config)
            model.load(warm=False)  # reads the vocabulary: a missing or broken file fails here
        else:
            model.load()
        gid = self._add_graph(run, GraphHandle(model, entry.encoding, name, params))
        state.by_name[name] = gid
        return gid

    @staticmethod
    def _limits(run: RunContext) -> Any:
        from .onnx_backend import RunLimits

        memory = getattr(getattr(run.flow, "limits", None), "memory", None)
        return RunLimits(deadline=run.deadline, memory=int(memory) if memory else DEFAULT_MEMORY)

    @staticmethod
    def _may_load_bytes(run: RunContext, size: int, what: str) -> None:
        """Loading a model the guest supplies needs `allow.nn.load_bytes`, and at most `max_bytes`."""
        nn = getattr(getattr(run.flow, "allow", None), "nn", None)
        flow = getattr(run.flow, "name", "?")
        if nn is None or not nn.load_bytes:
            raise NNDenied(NNError.UNSUPPORTED_OPERATION,
                           f"loading {what} needs `allow.nn: {{load_bytes: true}}` in flow {flow!r}; "
                           f"or load a model of allow.models by name")
        if size > nn.max_bytes:
            raise NNDenied(NNError.TOO_LARGE, f"{what} is {size} bytes, over allow.nn.max_bytes ({nn.max_bytes}) of flow {flow!r}")

    def _map_guest_path(self, run: RunContext, guest_path: str) -> Optional[tuple[str, str]]:
        """(host path, host root) for a path the guest can name through its preopened dirs, else None.
        The path is resolved (symlinks, `..`) and must stay inside the directory it starts in."""
        allow = getattr(run.flow, "allow", None)
        for grant in getattr(allow, "dir_grants", None) or []:
            host, guest = grant.host, grant.guest.rstrip("/") or "/"
            if guest_path == guest or guest_path.startswith(guest.rstrip("/") + "/"):
                rel = guest_path[len(guest):].lstrip("/")
                root = os.path.realpath(host)
                candidate = os.path.realpath(os.path.join(root, rel))
                if candidate == root or candidate.startswith(root + os.sep):
                    return candidate, root
        return None

    def _read_guest_file(self, run: RunContext, text: str) -> bytes:
        """The bytes of a model file inside the flow's `allow.dirs`, read so that what is read is what
        was checked: opened without following a final symlink, then the opened file's own path
        (/proc/self/fd) checked against the directory again, and only a regular file."""
        mapped = self._map_guest_path(run, text)
        if mapped is None:
            raise NNDenied(NNError.MODEL_NOT_FOUND, f"{text} is outside the flow's allow.dirs")
        host_path, root = mapped
        self._may_load_bytes(run, 0, f"the model file {text}")
        try:
            fd = os.open(host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            raise NNFailure(NNError.MODEL_NOT_FOUND, f"no model at {text}") from None
        try:
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                opened = host_path
            if not (opened == root or opened.startswith(root + os.sep)):
                raise NNDenied(NNError.MODEL_NOT_FOUND, f"{text} resolves outside the flow's allow.dirs")
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NNFailure(NNError.MODEL_NOT_FOUND, f"no model at {text} (not a regular file)")
            self._may_load_bytes(run, info.st_size, f"the model file {text}")
            with os.fdopen(os.dup(fd), "rb") as fh:
                return fh.read(info.st_size)
        finally:
            os.close(fd)

    def _stdout_writer(self, run: RunContext) -> Callable[[bytes], None]:
        """stream-stdout prints into the guest's stdout: the run's writer (`RunContext.stdout`, which
        both engines set), else the writer this capability was built with (bodies driven without an
        engine), else nowhere: a server's own stdout is not the guest's, and the text is in output 0
        anyway."""
        if run.stdout is not None:
            return run.stdout
        if self.stdout is not None:
            return self.stdout
        return lambda data: None

    def _read_tensor(self, mem: _Mem, ptr: int) -> Tensor:
        dims_ptr, dims_count, type_word, data_ptr, data_len = TENSOR_STRUCT.unpack(mem.read(ptr, TENSOR_STRUCT.size))
        if dims_count > MAX_DIMS:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"{dims_count} dims (at most {MAX_DIMS})")
        raw = mem.read(dims_ptr, 4 * dims_count)
        dims = tuple(int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4))
        return Tensor(dims, tensor_type_word(type_word), mem.read(data_ptr, data_len))

    def _write_output(self, mem: _Mem, data: bytes, buf_ptr: int, buf_max: int, written_ptr: int) -> int:
        if not mem.fits(written_ptr, 4):
            raise mem._oob(written_ptr, 4)
        if buf_max and len(data) > buf_max:
            mem.put_u32(written_ptr, len(data))
            return NNError.TOO_LARGE
        if not mem.fits(buf_ptr, len(data)):
            if buf_max == 0:  # released WasmEdge would have overrun; we say how much is needed
                mem.put_u32(written_ptr, len(data))
                return NNError.TOO_LARGE
            raise mem._oob(buf_ptr, len(data))
        mem.write(buf_ptr, data)
        mem.put_u32(written_ptr, len(data))
        return NNError.SUCCESS

    # -- the twelve functions ------------------------------------------------------------------

    @_nn("load")
    def load(self, mem: _Mem, run: RunContext, builders_ptr: int, count: int, encoding: int, target: int, out_graph: int) -> int:
        if count == 0 or count > MAX_BUILDERS:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"{count} graph builders (1..{MAX_BUILDERS})")
        if not mem.fits(out_graph, 4):
            raise mem._oob(out_graph, 4)
        raw = mem.read(builders_ptr, BUILDER_STRUCT.size * count)
        ranges = [BUILDER_STRUCT.unpack_from(raw, i * BUILDER_STRUCT.size) for i in range(count)]
        for ptr, length in ranges:
            if not mem.fits(ptr, length):
                raise mem._oob(ptr, length)
        try:
            enc = Encoding(encoding)
        except ValueError:
            raise NNFailure(NNError.INVALID_ENCODING, f"unknown encoding {encoding}") from None
        try:
            tgt = Target(target)
        except ValueError:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"unknown target {target}") from None
        if tgt == Target.AUTO:
            raise NNFailure(NNError.INVALID_ARGUMENT, "load does not take target AUTO (it comes only from a preload)")
        if enc not in (Encoding.GGML, Encoding.ONNX):
            raise NNFailure(NNError.INVALID_ENCODING, f"encoding {enc.name} has no back end here (GGML and ONNX do)")
        ptr, length = ranges[0]
        head = mem.read(ptr, min(length, REFERENCE_MAX))
        if not self._is_reference(enc, head, length):  # model bytes: a capability of its own, checked first
            self._may_load_bytes(run, length, f"{enc.name} model bytes")
        builders = [head if length <= REFERENCE_MAX and i == 0 else mem.read(p, n) for i, (p, n) in enumerate(ranges)]
        if enc == Encoding.GGML:
            gid = self._load_ggml(run, builders, tgt)
        else:
            gid = self._load_onnx(run, builders, tgt)
        mem.put_u32(out_graph, gid)
        return NNError.SUCCESS

    @staticmethod
    def _onnx_path(data: bytes) -> Optional[str]:
        """Builder 0 of an ONNX load as a path (short UTF-8 text that looks like one), else None."""
        if len(data) >= REFERENCE_MAX:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return text if text.startswith("/") or text.endswith(".onnx") else None

    def _is_reference(self, enc: Encoding, head: bytes, length: int) -> bool:
        """Does builder 0 name a model (a configured one, or a file) rather than carry its bytes?"""
        if enc == Encoding.GGML:
            return head.startswith(b"preload:")
        return length < REFERENCE_MAX and self._onnx_path(head) is not None

    def _load_ggml(self, run: RunContext, builders: list[bytes], target: Target) -> int:
        from .ggml_params import parse_metadata_bytes

        config = builders[1] if len(builders) > 1 else None
        weights = builders[0]
        if weights.startswith(b"preload:"):
            path = weights[len(b"preload:") :].decode("utf-8", "replace").split(",")[0]
            entry = self.registry.by_path(path)
            if entry is None:
                run.denials.append(f"wasi_ephemeral_nn::load: {path} is not a configured model")
                raise NNFailure(NNError.MODEL_NOT_FOUND, f"no configured model at {path}")
            self._check_allowed(run, entry.name)
            model = self.registry.model(entry.name)
        else:
            if not weights.startswith(b"GGUF"):
                raise NNFailure(NNError.INVALID_ARGUMENT, "builder 0 is neither preload:<path> nor GGUF bytes")
            model = self.registry.anonymous(Encoding.GGML, target, weights)
            cap = self._limits(run).memory
            if model.guest.vocab_need() > cap:
                from .gguf_guard import mib

                raise NNHalt("oom", f"guest model {model.name} needs about {mib(model.guest.vocab_need())} to open, over the "
                                    f"flow's memory limit of {mib(cap)}", NNError.TOO_LARGE)
        params = model.base if config is None else parse_metadata_bytes(model.base, config)
        model.load(warm=False)
        return self._add_graph(run, GraphHandle(model, Encoding.GGML, model.name, params))

    def _load_onnx(self, run: RunContext, builders: list[bytes], target: Target) -> int:
        data = builders[0]
        text = self._onnx_path(data)
        if text is not None:  # a path: a configured model's, or a file in the flow's preopened dirs
            entry = self.registry.by_path(text)
            if entry is not None and entry.encoding == Encoding.ONNX:
                self._check_allowed(run, entry.name)
                model = self.registry.model(entry.name)
                model.load()
                return self._add_graph(run, GraphHandle(model, Encoding.ONNX, model.name))
            data = self._read_guest_file(run, text)  # the guest's own file: as untrusted as its bytes
        model = self.registry.anonymous(Encoding.ONNX, target, data)
        model.prepare(self._limits(run))
        return self._add_graph(run, GraphHandle(model, Encoding.ONNX, model.name))

    @_nn("load_by_name")
    def load_by_name(self, mem: _Mem, run: RunContext, name_ptr: int, name_len: int, out_graph: int) -> int:
        name = mem.read(name_ptr, name_len).decode("utf-8", "replace")
        if not mem.fits(out_graph, 4):
            raise mem._oob(out_graph, 4)
        mem.put_u32(out_graph, self._named_graph(run, name, None))
        return NNError.SUCCESS

    @_nn("load_by_name_with_config")
    def load_by_name_with_config(
        self, mem: _Mem, run: RunContext, name_ptr: int, name_len: int, config_ptr: int, config_len: int, out_graph: int
    ) -> int:
        name = mem.read(name_ptr, name_len).decode("utf-8", "replace")
        config = mem.read(config_ptr, config_len)
        if not mem.fits(out_graph, 4):
            raise mem._oob(out_graph, 4)
        mem.put_u32(out_graph, self._named_graph(run, name, config or None))
        return NNError.SUCCESS

    @_nn("init_execution_context")
    def init_execution_context(self, mem: _Mem, run: RunContext, graph: int, out_ctx: int) -> int:
        g = self._graph(run, graph)
        if not mem.fits(out_ctx, 4):
            raise mem._oob(out_ctx, 4)
        state = self._state(run)
        if sum(c is not None for c in state.contexts) >= MAX_CONTEXTS:
            raise NNFailure(NNError.TOO_LARGE, f"more than {MAX_CONTEXTS} execution contexts in one run")
        if g.encoding == Encoding.GGML:
            from .ggml_backend import GgmlExecution

            ctx: Any = GgmlExecution(
                g.model,
                g.params,
                self._stdout_writer(run),
                lambda: min(run.remaining(), MAX_WAIT),
                self._limits(run).memory,
            )
        else:
            from .onnx_backend import OnnxExecution

            ctx = OnnxExecution(g.model, self._limits(run))
        state.contexts.append(ctx)
        mem.put_u32(out_ctx, len(state.contexts) - 1)
        return NNError.SUCCESS

    @_nn("set_input")
    def set_input(self, mem: _Mem, run: RunContext, ctx: int, index: int, tensor_ptr: int) -> int:
        c = self._ctx(run, ctx)
        tensor = self._read_tensor(mem, tensor_ptr)
        if hasattr(c, "prompt"):  # GGML: type and dims are ignored
            c.set_input(index, tensor.data)
        else:
            c.set_input(index, tensor)
        return NNError.SUCCESS

    @_nn("compute")
    def compute(self, mem: _Mem, run: RunContext, ctx: int) -> int:
        return int(self._ctx(run, ctx).compute())

    @_nn("get_output")
    def get_output(self, mem: _Mem, run: RunContext, ctx: int, index: int, buf_ptr: int, buf_max: int, written_ptr: int) -> int:
        data = self._ctx(run, ctx).get_output(index)
        return self._write_output(mem, data, buf_ptr, buf_max, written_ptr)

    @_nn("compute_single")
    def compute_single(self, mem: _Mem, run: RunContext, ctx: int) -> int:
        c = self._ctx(run, ctx)
        if not hasattr(c, "compute_single"):
            raise NNFailure(NNError.UNSUPPORTED_OPERATION, "compute_single is for GGML graphs")
        return int(c.compute_single())

    @_nn("get_output_single")
    def get_output_single(self, mem: _Mem, run: RunContext, ctx: int, index: int, buf_ptr: int, buf_max: int, written_ptr: int) -> int:
        c = self._ctx(run, ctx)
        if not hasattr(c, "get_output_single"):
            raise NNFailure(NNError.UNSUPPORTED_OPERATION, "get_output_single is for GGML graphs")
        return self._write_output(mem, c.get_output_single(index), buf_ptr, buf_max, written_ptr)

    @_nn("fini_single")
    def fini_single(self, mem: _Mem, run: RunContext, ctx: int) -> int:
        c = self._ctx(run, ctx)
        if not hasattr(c, "fini_single"):
            raise NNFailure(NNError.UNSUPPORTED_OPERATION, "fini_single is for GGML graphs")
        c.fini_single()
        return NNError.SUCCESS

    @_nn("unload")
    def unload(self, mem: _Mem, run: RunContext, graph: int) -> int:
        """Drop the run's handle; the model itself stays loaded for other runs (loaded once per process)."""
        g = self._graph(run, graph)
        state = self._state(run)
        state.graphs[graph] = None
        for name, gid in list(state.by_name.items()):
            if gid == graph:
                del state.by_name[name]
        del g
        return NNError.SUCCESS

    @_nn("finalize_execution_context")
    def finalize_execution_context(self, mem: _Mem, run: RunContext, ctx: int) -> int:
        c = self._ctx(run, ctx)
        c.close()
        self._state(run).contexts[ctx] = None
        return NNError.SUCCESS



__all__ = ["WasiNNCapability", "NNRunState", "GraphHandle"]
