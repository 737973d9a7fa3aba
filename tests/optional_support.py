"""Optional components of the test suite: a skip that names what is missing, never a silent pass.

`make test` installs every one of them (llama-cpp-python, the pulled models), so under CI a missing one is
a failure, not a skip: a skip must point at something a developer's machine may lack, never hide a
feature that stopped working.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest


def require(present: bool, reason: str, ci_installs: bool = True) -> None:
    """When the component `reason` names is not `present`: skip saying so, or, when CI installs it
    (`ci_installs`), fail under CI, where a skip would hide a broken install."""
    if not present:
        if ci_installs and os.environ.get("CI"):
            pytest.fail(f"{reason} (CI installs it: a skip here would hide a broken install)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def skip_unless(present: bool, reason: str) -> None:
    """Skip with `reason` when a component CI does not have either (a GPU, libwasmedge) is not
    `present`: the one kind of skip that stays a skip under CI."""
    require(present, reason, ci_installs=False)


def need_module(name: str, component: str) -> ModuleType:
    """`import name`, or a skip/failure naming the component that provides it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, f"needs {component}: {exc}")
        raise  # unreachable: require(False, ...) always raises


def need_llama_cpp() -> ModuleType:
    """llama-cpp-python, the ggml back end (`pip install -e '.[nn]'`, done by scripts/setup.sh)."""
    return need_module("llama_cpp", "llama-cpp-python, the ggml back end (pip install -e '.[nn]')")


def need_model(path: Path, name: str) -> Path:
    """A model file `wasmflow models pull NAME` makes, or a skip/failure saying to pull it."""
    require(Path(path).exists(), f"model {name} is not pulled: run `wasmflow models pull {name}` ({path} is missing)")
    return Path(path)


def need_toolchain():  # type: ignore[no-untyped-def]
    """The Rust WASI toolchain (wasmflow.build.Toolchain), or a skip/failure saying how to install it."""
    from wasmflow.build import BuildError, find_toolchain

    try:
        return find_toolchain()
    except BuildError as exc:
        require(False, f"needs a Rust toolchain for wasm32-wasi: {exc}")
        raise  # unreachable: require(False, ...) always raises


def need_gpu_llama() -> None:
    """A GPU that llama.cpp can offload to: llama-cpp-python built with CUDA on a machine with a GPU
    (CI has neither, so this stays a skip there)."""
    from wasmflow.wasi_nn.ggml_pool import gpu_offload_supported

    skip_unless(gpu_offload_supported(), "needs a GPU and llama-cpp-python built with CUDA (CMAKE_ARGS=-DGGML_CUDA=on)")


def need_gpu_onnx() -> None:
    """A GPU that ONNX Runtime can use: onnxruntime-gpu with its CUDAExecutionProvider (CI has neither)."""
    import onnxruntime

    skip_unless("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                "needs a GPU and onnxruntime-gpu (CUDAExecutionProvider)")
