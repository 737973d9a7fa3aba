"""WASI-NN as WasmEdge implements it: enumerations, error codes and the tensor struct.

Everything here follows WasmEdge's numbering (0.15 and later) exactly, as docs/wasi-nn.md lists it
("The ABI"), because a guest compiled for WasmEdge's GGML plugin or for LlamaEdge must run on wasmflow
unchanged: the numbers are the contract, not ours to choose.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

MODULE = "wasi_ephemeral_nn"


class NNError(enum.IntEnum):
    """WASI-NN error codes (not wasmflow's `Code`s: a WASI-NN guest reads these)."""

    SUCCESS = 0
    INVALID_ARGUMENT = 1
    INVALID_ENCODING = 2
    MISSING_MEMORY = 3
    BUSY = 4
    RUNTIME_ERROR = 5
    UNSUPPORTED_OPERATION = 6
    TOO_LARGE = 7
    NOT_FOUND = 8
    END_OF_SEQUENCE = 100
    CONTEXT_FULL = 101
    PROMPT_TOO_LONG = 102
    MODEL_NOT_FOUND = 103


class NNFailure(Exception):
    """Raised by back ends and the registry to end a WASI-NN call with `code`.

    Kept apart from `HostError` on purpose: wasmflow's BAD_POINTER (4) is WASI-NN's BUSY (4), and the
    engine adapter records code 4 as a denial. The WASI-NN capability catches this and returns the int.
    """

    def __init__(self, code: NNError, message: str = "") -> None:
        super().__init__(message or code.name.lower())
        self.code = NNError(code)
        self.message = message or code.name.lower()


class NNDenied(NNFailure):
    """The call asked for something the flow was not granted (or a model that names a host file): the
    capability records the refusal with the run, so a run that then fails is reported `denied`."""


class NNHalt(NNFailure):
    """A back-end call hit a limit that ends the whole run: the deadline ("timeout") or the memory cap
    ("oom"). The capability records it with `RunContext.halt`, so the engine stops the guest at once
    and the run ends with `status` whatever the guest would have done with the error code."""

    def __init__(self, status: str, message: str, code: NNError = NNError.RUNTIME_ERROR) -> None:
        super().__init__(code, message)
        self.status = status


class Encoding(enum.IntEnum):
    OPENVINO = 0
    ONNX = 1
    TENSORFLOW = 2
    PYTORCH = 3
    TFLITE = 4
    AUTODETECT = 5
    GGML = 6

    @classmethod
    def parse(cls, text: str) -> "Encoding":
        """Case-insensitive name as written in `--nn-preload` (`GGML`, `onnx`, ...)."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown WASI-NN encoding {text!r} (expected one of: {', '.join(e.name for e in cls)})") from None


class Target(enum.IntEnum):
    CPU = 0
    GPU = 1
    TPU = 2
    AUTO = 3

    @classmethod
    def parse(cls, text: str) -> "Target":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown WASI-NN target {text!r} (expected one of: {', '.join(t.name for t in cls)})") from None


class TensorType(enum.IntEnum):
    """WasmEdge 0.15+ numbering (the guest crate sends U8 = 3)."""

    F16 = 0
    F32 = 1
    F64 = 2
    U8 = 3
    I32 = 4
    I64 = 5

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self])


_DTYPES = {
    TensorType.F16: "<f2",
    TensorType.F32: "<f4",
    TensorType.F64: "<f8",
    TensorType.U8: "u1",
    TensorType.I32: "<i4",
    TensorType.I64: "<i8",
}

TENSOR_STRUCT = struct.Struct("<IIIII")  # dims_ptr, dims_count, type, data_ptr, data_len
BUILDER_STRUCT = struct.Struct("<II")  # ptr, len
MAX_DIMS = 16


@dataclass(frozen=True)
class Tensor:
    """A tensor as the guest described it. `type_raw` keeps the low byte only; `type` is None when it
    names no known type (GGML ignores types, so that is not an error until a back end needs one)."""

    dims: tuple[int, ...]
    type_raw: int
    data: bytes

    @property
    def type(self) -> TensorType | None:
        try:
            return TensorType(self.type_raw)
        except ValueError:
            return None


def tensor_type_word(word: int) -> int:
    """Only the low byte of the tensor type word counts: real guests leave garbage in the upper bytes
    (one prebuilt example sends 0x00100401 for F32)."""
    return word & 0xFF
