"""Hostile guests, class 1 of issue 9: reading host files through WASI-NN.

A guest may load a model from its own bytes (with `allow.nn.load_bytes`), but nothing in such a model
may make ONNX Runtime or llama.cpp open a host file: ONNX external data (anywhere in the graph: an
initializer, a node's tensor attribute, a subgraph of If/Loop, a sparse initializer; a plain name in
the working directory, `../`, or ONNX Runtime's in-memory address marker), and GGUF split keys. Each
attack asks for the planted secret (the App's PEM and the database in the working directory, a file in
its parent) and must end `denied` with no byte of it back.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile_support import assert_no_leak, engine_name, planted_secret, run_flow  # noqa: F401
from nn_guest_wat import NnGuest, failure, nn_guest_wat
from wasmflow.engine.base import Status
from wasmflow.wasi_nn.abi import NNError
from wasmflow.wasi_nn.testmodels import write_tiny_llama

NN = {"nn": {"load_bytes": True}}
SECRET_LEN = 100  # bytes of the planted secret an attack asks for (it is a little longer)


def _model(graph: Any) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="attacker")
    model.ir_version = 8
    return model.SerializeToString()


def _external(name: str, location: str, length: int = SECRET_LEN) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.UINT8
    t.dims.extend([length])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _out() -> Any:
    return helper.make_tensor_value_info("out", TensorProto.UINT8, [SECRET_LEN])


def initializer_attack(location: str) -> bytes:
    graph = helper.make_graph([helper.make_node("Identity", ["W"], ["out"])], "g", [], [_out()],
                              initializer=[_external("W", location)])
    return _model(graph)


def constant_attack(location: str) -> bytes:
    node = helper.make_node("Constant", [], ["out"], value=_external("c", location))
    return _model(helper.make_graph([node], "g", [], [_out()]))


def subgraph_attack(location: str) -> bytes:
    """The external tensor hides in the then-branch of an If."""
    branch = helper.make_graph([helper.make_node("Constant", [], ["inner"], value=_external("c", location))],
                               "then", [], [helper.make_tensor_value_info("inner", TensorProto.UINT8, [SECRET_LEN])])
    other = helper.make_graph([helper.make_node("Constant", [], ["zeros"], value=numpy_helper.from_array(
        np.zeros(SECRET_LEN, np.uint8), "z"))], "else", [], [helper.make_tensor_value_info("zeros", TensorProto.UINT8, [SECRET_LEN])])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)
    graph = helper.make_graph([node], "g", [], [_out()], initializer=[numpy_helper.from_array(np.array(True), "cond")])
    return _model(graph)


def sparse_attack(location: str) -> bytes:
    values = _external("W", location)
    indices = numpy_helper.from_array(np.arange(SECRET_LEN, dtype=np.int64), "W_indices")
    sparse = helper.make_sparse_tensor(values, indices, [SECRET_LEN])
    graph = helper.make_graph([helper.make_node("Identity", ["W"], ["out"])], "g", [], [_out()])
    graph.sparse_initializer.append(sparse)
    return _model(graph)


ATTACKS: dict[str, Callable[[str], bytes]] = {
    "initializer": initializer_attack,
    "constant-attribute": constant_attack,
    "if-subgraph": subgraph_attack,
    "sparse-initializer": sparse_attack,
}


@pytest.mark.parametrize("where", list(ATTACKS))
@pytest.mark.parametrize("location", ["github-app.pem", "wasmflow.db", "../secret.txt", "./github-app.pem"])
def test_onnx_external_data_cannot_read_host_files(engine_name: str, planted_secret: bytes, tmp_path: Path,
                                                    where: str, location: str) -> None:
    guest = nn_guest_wat(NnGuest([ATTACKS[where](location)]))
    result = run_flow(engine_name, tmp_path, guest, allow=NN)
    assert_no_leak(result, planted_secret)
    assert result.status is Status.DENIED, (result.status, result.error, result.stdout)
    assert failure(result.stdout or b"") == ("load", NNError.INVALID_ARGUMENT)


def test_onnx_memory_address_marker_is_refused(engine_name: str, planted_secret: bytes, tmp_path: Path) -> None:
    """ONNX Runtime reads external data at a raw host address when the location is its marker."""
    guest = nn_guest_wat(NnGuest([initializer_attack("*/_ORT_MEM_ADDR_/*")]))
    result = run_flow(engine_name, tmp_path, guest, allow=NN)
    assert result.status is Status.DENIED
    assert failure(result.stdout or b"") == ("load", NNError.INVALID_ARGUMENT)


def test_onnx_path_cannot_leave_allow_dirs(engine_name: str, planted_secret: bytes, tmp_path: Path) -> None:
    """A path given to `load` reaches only files inside the flow's allow.dirs: not `..`, not a symlink
    out, not a path at all without allow.dirs."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "escape.onnx").symlink_to(tmp_path / "work" / "github-app.pem")
    cases = [
        ({"dirs": [f"{models}:/m:ro"], **NN}, b"/m/../work/github-app.pem"),
        ({"dirs": [f"{models}:/m:ro"], **NN}, b"/m/escape.onnx"),
        ({"dirs": [f"{models}:/m:ro"], **NN}, b"/m/../secret.txt"),
        (NN, f"{tmp_path}/work/github-app.pem".encode()),
        (NN, b"/etc/passwd"),
    ]
    for allow, path in cases:
        result = run_flow(engine_name, tmp_path, nn_guest_wat(NnGuest([path])), allow=allow)
        assert_no_leak(result, planted_secret)
        assert result.status is Status.DENIED, (path, result.status, result.stdout)
        assert failure(result.stdout or b"") == ("load", NNError.MODEL_NOT_FOUND), path


def test_onnx_file_in_allow_dirs_needs_load_bytes(engine_name: str, tmp_path: Path) -> None:
    """A model file in allow.dirs is the guest's own input: it loads with load_bytes, not without."""
    from wasmflow.wasi_nn.testmodels import write_tiny_onnx

    models = tmp_path / "models"
    write_tiny_onnx(models / "tiny.onnx")
    x = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32).tobytes()
    ids = np.array([[1, 2, 3, 4, 5]], np.int64).tobytes()
    from nn_guest_wat import NnInput

    guest = nn_guest_wat(NnGuest([b"/m/tiny.onnx"], inputs=[NnInput(0, [1, 4], 1, x), NnInput(1, [1, 5], 5, ids)]))
    ok = run_flow(engine_name, tmp_path, guest, allow={"dirs": [f"{models}:/m:ro"], **NN})
    assert ok.status is Status.OK, (ok.error, ok.stdout)
    assert len(ok.stdout or b"") == 12  # probs: 3 floats
    refused = run_flow(engine_name, tmp_path, guest, allow={"dirs": [f"{models}:/m:ro"]})
    assert refused.status is Status.DENIED
    assert failure(refused.stdout or b"") == ("load", NNError.UNSUPPORTED_OPERATION)


def _split_gguf(path: Path) -> bytes:
    def split(writer: Any) -> None:
        writer.add_uint16("split.no", 0)
        writer.add_uint16("split.count", 2)
        writer.add_int32("split.tensors.count", 21)

    return write_tiny_llama(path, extra=split).read_bytes()


def test_gguf_split_keys_are_refused(engine_name: str, planted_secret: bytes, tmp_path: Path) -> None:
    """`split.count` makes llama.cpp derive sibling file names from the model's path and open them."""
    guest = nn_guest_wat(NnGuest([_split_gguf(tmp_path / "split.gguf")], encoding=6, compute=False))
    result = run_flow(engine_name, tmp_path, guest, allow=NN)
    assert_no_leak(result, planted_secret)
    assert result.status is Status.DENIED, (result.status, result.error, result.stdout)
    assert failure(result.stdout or b"") == ("load", NNError.INVALID_ARGUMENT)


def test_guest_gguf_is_cached_under_its_content_hash_only(engine_name: str, tmp_path: Path) -> None:
    """GGUF bytes from a guest go to the state directory's nn-cache as guest-<sha256>.gguf and nowhere else."""
    data = write_tiny_llama(tmp_path / "src" / "tiny.gguf").read_bytes()
    before = set(os.listdir(tmp_path))
    guest = nn_guest_wat(NnGuest([data], encoding=6, compute=False))
    result = run_flow(engine_name, tmp_path, guest, allow=NN)
    assert result.status is Status.OK, (result.error, result.stdout)
    cache = tmp_path / "state" / "nn-cache"
    assert sorted(os.listdir(cache)) == [f"guest-{hashlib.sha256(data).hexdigest()}.gguf"]
    assert set(os.listdir(tmp_path)) - before <= {"state", *[p for p in os.listdir(tmp_path) if p.startswith("guest-")]}
