"""The `onnx` back end: ONNX Runtime, with WasmEdge's numbering (ONNX = 1) and honest outputs.

Inputs are by index (the graph's input order) and may be F32, F16, U8, I32 or I64; the guest's tensor
type must match what the graph declares (a mismatch is invalid_argument, not a silent cast: a guest
that sends I32 token ids to an I64 input has a bug it should hear about). Outputs keep their true
dims and element type; `get_output` returns the raw little-endian bytes, as WASI-NN defines it.

An `InferenceSession` is safe to call from several threads at once, so runs share one per model
without a lock; the per-run state is only the inputs and outputs of an execution context.

Every compute stops at the run's deadline: a timer sets `RunOptions.terminate`, which ONNX Runtime
checks between nodes and between iterations of a Loop, and the call then ends the run `timeout`.
A graph a guest supplied (`GuestOnnxModel`) is also held to the flow's memory limit: it is checked
in a capped child before the host loads it and before each new set of input shapes runs
(`onnx_guard.py`), and its session allocates from an arena of its own whose `max_mem` is that limit,
so what the checks cannot foresee still ends the run `oom` instead of growing the host.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from .abi import NNDenied, NNError, NNFailure, NNHalt, Tensor, TensorType

ACCEPTED_INPUTS = {TensorType.F32, TensorType.F16, TensorType.U8, TensorType.I32, TensorType.I64}
_ORT_TYPES = {
    "tensor(float)": TensorType.F32,
    "tensor(float16)": TensorType.F16,
    "tensor(double)": TensorType.F64,
    "tensor(uint8)": TensorType.U8,
    "tensor(int32)": TensorType.I32,
    "tensor(int64)": TensorType.I64,
}


def _ort():  # type: ignore[no-untyped-def]
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise NNFailure(NNError.UNSUPPORTED_OPERATION, f"the onnx back end needs onnxruntime: {exc}") from None
    return onnxruntime


def providers(target: str) -> list[str]:
    """Execution providers for a target: CUDA first when onnxruntime has it and the target allows a GPU."""
    available = _ort().get_available_providers()
    chosen: list[str] = []
    if target in ("gpu", "auto") and "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


MAX_WAIT = 3600.0  # seconds a run without a deadline may wait for a guest graph's session
VET_TIMEOUT = 120.0  # seconds a model check may take at most, whatever the deadline
MAX_NODE_MACS = 2**37  # multiply-accumulates one uninterruptible node of a guest's graph may need
MACS_PER_SECOND = 1e11  # a fast core's rate: a node needing more than the time left is refused
MAX_SESSIONS = 4  # sessions (one per memory limit) kept per guest graph
MAX_BOUNDS = 32  # input-shape sets whose check result is kept per guest graph


@dataclass(frozen=True)
class RunLimits:
    """What one run allows a compute: its deadline (a `time.monotonic()` value) and, for a guest's
    graph, the bytes the graph may allocate (the flow's `limits.memory`)."""

    deadline: float = float("inf")
    memory: int = 256 * 1024**2

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class _Watch:
    """Sets `RunOptions.terminate` when the deadline passes (one timer thread per compute)."""

    def __init__(self, options: Any, deadline: float) -> None:
        self.options = options
        self.fired = False
        delay = deadline - time.monotonic()
        self._timer: Optional[threading.Timer] = None
        if delay <= 0:
            self._fire()
        elif math.isfinite(delay):
            self._timer = threading.Timer(delay, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        self.options.terminate = True

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


@contextmanager
def deadline_watch(options: Any, deadline: float) -> Iterator[_Watch]:
    watch = _Watch(options, deadline)
    try:
        yield watch
    finally:
        watch.cancel()


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _is_allocation_failure(text: str) -> bool:
    return "Available memory of" in text or "Failed to allocate" in text or "bad_alloc" in text


class OnnxModel:
    """One ONNX graph loaded into an InferenceSession, shared by every run of the process."""

    backend = "onnx"

    def __init__(self, name: str, source: "str | bytes", target: str = "auto", options: Optional[dict[str, Any]] = None) -> None:
        self.name = name
        self.source = source
        self.target = target
        self.options = dict(options or {})
        self.path = source if isinstance(source, str) else f"<{len(source)} bytes sha256:{hashlib.sha256(source).hexdigest()[:12]}>"
        self._session: Any = None
        self._inputs: Optional[list[Any]] = None
        self._lock = threading.Lock()
        self.calls_total = 0
        self.in_flight = 0
        self.seconds_total = 0.0

    def load(self, warm: bool = True) -> None:
        self.session()

    def session(self) -> Any:
        with self._lock:
            if self._session is None:
                ort = _ort()
                if isinstance(self.source, str) and not os.path.exists(self.source):
                    raise NNFailure(NNError.MODEL_NOT_FOUND, f"model file {self.source} does not exist")
                so = ort.SessionOptions()
                threads = self.options.get("threads")
                if isinstance(threads, int) and threads > 0:
                    so.intra_op_num_threads = threads
                so.log_severity_level = 3
                try:
                    self._session = ort.InferenceSession(self.source, sess_options=so, providers=providers(self.target))
                except Exception as exc:  # onnxruntime raises its own exception types for bad models
                    raise NNFailure(NNError.INVALID_ARGUMENT, f"onnxruntime could not load {self.path}: {exc}") from None
            return self._session

    def inputs(self) -> list[Any]:
        """The graph's inputs (name, type, shape), read once: set_input consults them on every call."""
        if self._inputs is None:
            self._inputs = list(self.session().get_inputs())
        return self._inputs

    def outputs(self) -> list[Any]:
        return list(self.session().get_outputs())

    def run(self, feeds: dict[str, np.ndarray], limits: RunLimits = RunLimits()) -> list[np.ndarray]:
        """One compute, stopped at the run's deadline (the run then ends `timeout`)."""
        return self._run(self.session(), feeds, limits)

    def _run(self, sess: Any, feeds: dict[str, np.ndarray], limits: RunLimits, options: Optional[dict[str, str]] = None) -> list[np.ndarray]:
        if limits.remaining() <= 0:
            raise NNHalt("timeout", "the run's deadline passed before the ONNX compute")
        ro = _ort().RunOptions()
        ro.log_severity_level = 4  # the failure is reported to the guest and logged once by the capability
        for key, value in (options or {}).items():
            ro.add_run_config_entry(key, value)
        with self._lock:
            self.in_flight += 1
        t0 = time.perf_counter()
        try:
            with deadline_watch(ro, limits.deadline) as watch:
                try:
                    return list(sess.run(None, feeds, ro))
                except Exception as exc:
                    if watch.fired:
                        raise NNHalt("timeout", f"the run's deadline passed during the ONNX compute of {self.name}") from None
                    text = _first_line(exc)
                    if _is_allocation_failure(text):
                        raise NNHalt("oom", f"the ONNX compute of {self.name} needed more memory than it may use: {text[:300]}",
                                     NNError.TOO_LARGE) from None
                    raise NNFailure(NNError.RUNTIME_ERROR, f"onnxruntime: {text}") from None
        finally:
            with self._lock:
                self.in_flight -= 1
                self.calls_total += 1
                self.seconds_total += time.perf_counter() - t0

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "onnx",
            "loaded": self._session is not None,
            "instances": 1 if self._session is not None else 0,
            "busy": self.in_flight,
            "waiting": 0,
            "acquired_total": self.calls_total,
            "wait_seconds_total": 0.0,
            "busy_total": 0,
        }

    def close(self) -> None:
        with self._lock:
            self._session = None


_arena_lock = threading.Lock()


def _mib(n: float) -> str:
    return f"{n / 1024**2:.1f} MiB"


class GuestOnnxModel(OnnxModel):
    """A graph from a guest's bytes: checked before it loads and before each new set of input shapes,
    run in sessions whose memory arena is capped at the flow's memory limit (one session per limit,
    one compute at a time per session, so the cap is exact), on one thread."""

    def __init__(self, name: str, data: bytes, target: str = "auto") -> None:
        super().__init__(name, bytes(data), target, {})
        self._vetted: Any = None
        self._vet_lock = threading.Lock()
        self._sessions: "OrderedDict[int, tuple[Any, threading.Lock]]" = OrderedDict()
        self._bounds: "OrderedDict[tuple[Any, ...], Any]" = OrderedDict()

    # -- checks ------------------------------------------------------------------------------

    def _vet(self, limits: RunLimits) -> Any:
        """The model checked in a child capped at the flow's memory limit (once per model)."""
        from . import onnx_guard
        from .isolate import run_isolated

        with self._vet_lock:
            if self._vetted is None:
                timeout = min(VET_TIMEOUT, limits.remaining())
                self._vetted, _ = run_isolated(onnx_guard.vet, (self.source, limits.memory), limits.memory, timeout)
            return self._vetted

    def prepare(self, limits: RunLimits) -> None:
        """What `load` checks: no file references, constants and fixed-shape tensors within the memory
        limit, and a session for that limit."""
        vetted = self._vet(limits)
        if vetted.constants > limits.memory:
            raise NNHalt("oom", f"guest graph {self.name} holds {_mib(vetted.constants)} of constants, over the flow's memory "
                                f"limit of {_mib(limits.memory)}", NNError.TOO_LARGE)
        if vetted.largest_fixed > limits.memory:
            raise NNHalt("oom", f"guest graph {self.name} has a tensor {vetted.largest_fixed_name!r} of {_mib(vetted.largest_fixed)}, "
                                f"over the flow's memory limit of {_mib(limits.memory)}", NNError.TOO_LARGE)
        self._session_for(limits.memory)

    def _bound(self, feeds: dict[str, np.ndarray], limits: RunLimits) -> Any:
        from . import onnx_guard
        from .isolate import run_isolated

        spec = []
        for name, arr in feeds.items():
            small = arr.dtype.kind in "iu" and arr.size <= onnx_guard.SMALL_FEED
            spec.append((name, arr.dtype.str, tuple(int(d) for d in arr.shape), arr.tobytes() if small else None))
        key = tuple(spec)
        with self._lock:
            found = self._bounds.get(key)
            if found is not None:
                self._bounds.move_to_end(key)
                return found
        timeout = min(VET_TIMEOUT, limits.remaining())
        result, _ = run_isolated(onnx_guard.bound, (self._vetted.skeleton, spec), limits.memory, timeout)
        with self._lock:
            self._bounds[key] = result
            while len(self._bounds) > MAX_BOUNDS:
                self._bounds.popitem(last=False)
        return result

    # -- sessions ----------------------------------------------------------------------------

    def _session_for(self, cap: int) -> tuple[Any, threading.Lock]:
        from .onnx_guard import GUEST_DISABLED_OPTIMIZERS, guest_session_options

        with self._lock:
            entry = self._sessions.get(cap)
            if entry is not None:
                self._sessions.move_to_end(cap)
                return entry
        ort = _ort()
        so = guest_session_options()
        so.add_session_config_entry("session.use_env_allocators", "1")
        chosen: list[Any] = []
        for name in providers(self.target):
            if name == "CUDAExecutionProvider":
                chosen.append((name, {"gpu_mem_limit": str(cap), "arena_extend_strategy": "kSameAsRequested"}))
            else:
                chosen.append(name)
        with _arena_lock:  # a session takes the environment's allocator registered when it is created
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"max_mem": int(cap), "arena_extend_strategy": 1}))
            try:
                sess = ort.InferenceSession(self._vetted.model, sess_options=so, providers=chosen,
                                            disabled_optimizers=GUEST_DISABLED_OPTIMIZERS)
            except Exception as exc:
                text = _first_line(exc)
                if _is_allocation_failure(text):
                    raise NNHalt("oom", f"loading guest graph {self.name} needs more than the flow's memory limit of {_mib(cap)}",
                                 NNError.TOO_LARGE) from None
                raise NNFailure(NNError.INVALID_ARGUMENT, f"onnxruntime could not load {self.path}: {text}") from None
        with self._lock:
            entry = self._sessions.setdefault(cap, (sess, threading.Lock()))
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)  # dropped, not closed: a run may still use it
            return entry

    def load(self, warm: bool = True) -> None:
        raise NNFailure(NNError.INVALID_ARGUMENT, "a guest's graph loads through prepare(limits)")

    def session(self) -> Any:
        """Any of the model's sessions (they differ only in their memory cap): for input metadata."""
        with self._lock:
            if self._sessions:
                return next(reversed(self._sessions.values()))[0]
        raise NNFailure(NNError.INVALID_ARGUMENT, f"guest graph {self.name} is not loaded")

    # -- compute -----------------------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray], limits: RunLimits = RunLimits()) -> list[np.ndarray]:
        self.prepare(limits)
        bound = self._bound(feeds, limits)
        need = bound.peak + self._vetted.constants
        if need > limits.memory:
            raise NNHalt("oom", f"guest graph {self.name} would allocate {_mib(need)} for these inputs, over the flow's memory "
                                f"limit of {_mib(limits.memory)}", NNError.TOO_LARGE)
        if bound.heaviest_macs > MAX_NODE_MACS:
            raise NNDenied(NNError.TOO_LARGE, f"guest graph {self.name}: {bound.heaviest_node} needs {bound.heaviest_macs:.3g} "
                                              f"multiply-accumulates in one step, more than the {MAX_NODE_MACS:.3g} a node may take")
        if bound.heaviest_macs > max(0.0, limits.remaining()) * MACS_PER_SECOND:
            raise NNHalt("timeout", f"guest graph {self.name}: {bound.heaviest_node} cannot finish before the run's deadline "
                                    f"({bound.heaviest_macs:.3g} multiply-accumulates in one step that cannot be interrupted)")
        sess, busy = self._session_for(limits.memory)
        if not busy.acquire(timeout=max(0.0, min(limits.remaining(), MAX_WAIT))):
            raise NNHalt("timeout", f"the run's deadline passed waiting for guest graph {self.name}")
        try:
            return self._run(sess, feeds, limits, {"memory.enable_memory_arena_shrinkage": "cpu:0"})
        finally:
            busy.release()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["loaded"] = bool(self._sessions)
        out["instances"] = len(self._sessions)
        return out

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()


def tensor_to_array(t: Tensor) -> np.ndarray:
    """The guest's tensor as a numpy array; its byte length must match its dims and type exactly."""
    tt = t.type
    if tt is None or tt not in ACCEPTED_INPUTS:
        raise NNFailure(NNError.INVALID_ARGUMENT, f"tensor type {t.type_raw} is not one of F32, F16, U8, I32, I64")
    count = 1
    for d in t.dims:
        count *= d
    itemsize = tt.dtype.itemsize
    if count * itemsize != len(t.data):
        raise NNFailure(NNError.INVALID_ARGUMENT, f"dims {list(t.dims)} of {tt.name} need {count * itemsize} bytes, got {len(t.data)}")
    return np.frombuffer(t.data, dtype=tt.dtype).reshape(t.dims)


@dataclass
class OnnxExecution:
    """A WASI-NN execution context on an ONNX graph (per run)."""

    model: OnnxModel
    limits: RunLimits = RunLimits()
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    outputs: list[np.ndarray] = field(default_factory=list)

    def set_input(self, index: int, tensor: Tensor) -> None:
        declared = self.model.inputs()
        if index >= len(declared):
            raise NNFailure(NNError.INVALID_ARGUMENT, f"input index {index} out of range: the graph has {len(declared)} inputs")
        arr = tensor_to_array(tensor)
        want = _ORT_TYPES.get(declared[index].type)
        if want is not None and want != tensor.type:
            raise NNFailure(
                NNError.INVALID_ARGUMENT,
                f"input {index} ({declared[index].name}) is {want.name}, the guest sent {tensor.type.name if tensor.type is not None else tensor.type_raw}",
            )
        shape = declared[index].shape
        if len(shape) != arr.ndim or any(isinstance(s, int) and s != d for s, d in zip(shape, arr.shape)):
            raise NNFailure(NNError.INVALID_ARGUMENT, f"input {index} ({declared[index].name}) has shape {shape}, the guest sent {list(arr.shape)}")
        self.inputs[index] = arr

    def compute(self) -> NNError:
        declared = self.model.inputs()
        missing = [i for i in range(len(declared)) if i not in self.inputs]
        if missing:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"inputs {missing} are not set")
        feeds = {declared[i].name: self.inputs[i] for i in range(len(declared))}
        self.outputs = [np.ascontiguousarray(o) for o in self.model.run(feeds, self.limits)]
        return NNError.SUCCESS

    def output_array(self, index: int) -> np.ndarray:
        if not self.outputs:
            raise NNFailure(NNError.INVALID_ARGUMENT, "compute has not run")
        if index >= len(self.outputs):
            raise NNFailure(NNError.INVALID_ARGUMENT, f"output index {index} out of range: the graph has {len(self.outputs)} outputs")
        return self.outputs[index]

    def get_output(self, index: int) -> bytes:
        arr = self.output_array(index)
        return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()

    def close(self) -> None:
        self.inputs.clear()
        self.outputs = []
