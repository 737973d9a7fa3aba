"""The `onnx` back end: ONNX Runtime, with WasmEdge's numbering (ONNX = 1) and honest outputs.

Inputs are by index (the graph's input order) and may be F32, F16, U8, I32 or I64; the guest's tensor
type must match what the graph declares (a mismatch is invalid_argument, not a silent cast: a guest
that sends I32 token ids to an I64 input has a bug it should hear about). Outputs keep their true
dims and element type; `get_output` returns the raw little-endian bytes, as WASI-NN defines it.

An `InferenceSession` is safe to call from several threads at once, so runs share one per model
without a lock; the per-run state is only the inputs and outputs of an execution context.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .abi import NNError, NNFailure, Tensor, TensorType

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

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self.session()
        with self._lock:
            self.in_flight += 1
        t0 = time.perf_counter()
        try:
            return list(sess.run(None, feeds))
        except Exception as exc:
            raise NNFailure(NNError.RUNTIME_ERROR, f"onnxruntime: {str(exc).splitlines()[0] if str(exc) else exc}") from None
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
        self.outputs = [np.ascontiguousarray(o) for o in self.model.run(feeds)]
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
