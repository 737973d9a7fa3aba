"""WASI-NN (import module `wasi_ephemeral_nn`) with WasmEdge's ABI, over llama.cpp and ONNX Runtime.

`WasiNNCapability` is the engine-neutral capability; `ModelRegistry` holds the process's models.
"""

from .abi import Encoding, NNError, NNFailure, Target, TensorType
from .host import WasiNNCapability
from .registry import ModelEntry, ModelRegistry, parse_preload

__all__ = [
    "Encoding",
    "ModelEntry",
    "ModelRegistry",
    "NNError",
    "NNFailure",
    "Target",
    "TensorType",
    "WasiNNCapability",
    "parse_preload",
]
