"""Hostile guests, class 2 of issue 9: WASI-NN `load` of model bytes is a capability.

A flow that lists no models and no `allow.nn` must not get ONNX Runtime or llama.cpp to parse bytes of
its choosing. Without `allow.nn.load_bytes`, `load` with model bytes answers unsupported_operation (6)
and the run ends `denied`; with it, bytes over `allow.nn.max_bytes` answer too_large (7), also denied.
Models the operator configured stay reachable by name without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hostile_support import engine_name, make_flows, run_flow  # noqa: F401
from nn_guest_wat import NnGuest, NnInput, failure, nn_guest_wat
from wasmflow.engine.base import Status
from wasmflow.wasi_nn.abi import NNError
from wasmflow.wasi_nn.testmodels import write_tiny_llama, write_tiny_onnx

X = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32).tobytes()
IDS = np.array([[1, 2, 3, 4, 5]], np.int64).tobytes()


def _onnx_guest(data: bytes) -> str:
    return nn_guest_wat(NnGuest([data], inputs=[NnInput(0, [1, 4], 1, X), NnInput(1, [1, 5], 5, IDS)]))


@pytest.fixture
def onnx_bytes(tmp_path: Path) -> bytes:
    return write_tiny_onnx(tmp_path / "m" / "tiny.onnx").read_bytes()


@pytest.mark.parametrize("allow", [{}, {"models": []}, {"nn": {}}, {"nn": {"load_bytes": False}}, {"kv": True}],
                         ids=["nothing", "no-models", "nn-defaults", "load-bytes-false", "kv-only"])
def test_onnx_bytes_without_load_bytes_are_denied(engine_name: str, tmp_path: Path, onnx_bytes: bytes, allow: dict) -> None:
    result = run_flow(engine_name, tmp_path, _onnx_guest(onnx_bytes), allow=allow)
    assert result.status is Status.DENIED, (result.status, result.error, result.stdout)
    assert failure(result.stdout or b"") == ("load", NNError.UNSUPPORTED_OPERATION)


def test_gguf_bytes_without_load_bytes_are_denied(engine_name: str, tmp_path: Path) -> None:
    data = write_tiny_llama(tmp_path / "m" / "tiny.gguf").read_bytes()
    result = run_flow(engine_name, tmp_path, nn_guest_wat(NnGuest([data], encoding=6, compute=False)))
    assert result.status is Status.DENIED, (result.status, result.error, result.stdout)
    assert failure(result.stdout or b"") == ("load", NNError.UNSUPPORTED_OPERATION)
    assert not (tmp_path / "state" / "nn-cache").exists() or not list((tmp_path / "state" / "nn-cache").iterdir())


def test_load_bytes_grants_loading_within_max_bytes(engine_name: str, tmp_path: Path, onnx_bytes: bytes) -> None:
    ok = run_flow(engine_name, tmp_path, _onnx_guest(onnx_bytes), allow={"nn": {"load_bytes": True}})
    assert ok.status is Status.OK, (ok.error, ok.stdout)
    assert len(ok.stdout or b"") == 12  # three F32 probabilities
    small = {"nn": {"load_bytes": True, "max_bytes": len(onnx_bytes) - 1}}
    over = run_flow(engine_name, tmp_path, _onnx_guest(onnx_bytes), allow=small)
    assert over.status is Status.DENIED
    assert failure(over.stdout or b"") == ("load", NNError.TOO_LARGE)


def test_configured_models_need_no_load_bytes(engine_name: str, tmp_path: Path) -> None:
    path = write_tiny_onnx(tmp_path / "m" / "tiny.onnx")
    guest = nn_guest_wat(NnGuest([str(path).encode()], inputs=[NnInput(0, [1, 4], 1, X), NnInput(1, [1, 5], 5, IDS)]))
    models = {"tiny": {"backend": "onnx", "path": str(path)}}
    ok = run_flow(engine_name, tmp_path, guest, models=models, allow={"models": ["tiny"]})
    assert ok.status is Status.OK, (ok.error, ok.stdout)
    denied = run_flow(engine_name, tmp_path, guest, models=models)  # configured, but not in allow.models
    assert denied.status is Status.DENIED
    assert failure(denied.stdout or b"") == ("load", NNError.NOT_FOUND)


def test_allow_nn_is_validated(tmp_path: Path) -> None:
    from pydantic import ValidationError

    module = tmp_path / "x.wasm"
    flows = make_flows(module, allow={"nn": {"load_bytes": True, "max_bytes": "8MiB"}})
    assert flows.flows[0].allow.nn.max_bytes == 8 * 1024**2
    assert make_flows(module).flows[0].allow.nn.load_bytes is False
    for bad in ({"load_byte": True}, {"max_bytes": "0"}, {"max_bytes": "5GiB"}, {"load_bytes": "maybe"}):
        with pytest.raises(ValidationError):
            make_flows(module, allow={"nn": bad})
