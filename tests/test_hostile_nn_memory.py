"""Hostile guests, class 4 of issue 9: WASI-NN allocation must stay inside the flow's memory limit.

A 16 MiB flow tries to make the host allocate gigabytes through a model it supplies: a tensor whose
shape comes from its input data (ConstantOfShape, Expand, Tile, Range), from a cast the host cannot
follow, or from the graph itself; a sparse initializer that densifies to gigabytes; a graph whose shape
inference builds huge shape vectors (which ONNX Runtime does in the host while creating a session); a
GGUF whose metadata asks llama.cpp for a gigantic context. Each must end `oom` with the host's peak RSS
growing far less than the attack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile_support import PeakRss, engine_name, run_flow  # noqa: F401
from nn_guest_wat import NnGuest, NnInput, nn_guest_wat
from wasmflow.engine.base import Status
from wasmflow.wasi_nn.testmodels import write_tiny_llama, write_tiny_onnx
from optional_support import need_llama_cpp

CAP = {"memory": "16MiB", "timeout": "60s"}
NN = {"nn": {"load_bytes": True}}
BIG = [768, 1024, 1024]  # 3 GiB of F32
RSS_BOUND_MIB = 300


def _model(nodes: list[Any], inputs: list[Any], inits: list[Any] = [], out: str = "y",  # noqa: B006
           out_type: int = TensorProto.FLOAT) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(out, out_type, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _i64(name: str, n: int) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.INT64, [n])


def _fill(value: float = 1.0) -> Any:
    return numpy_helper.from_array(np.array([value], np.float32))


def _reduce(src: str) -> Any:  # the guest gets a scalar back: only the intermediate is huge
    return helper.make_node("ReduceSum", [src], ["y"], keepdims=0)


def _shape_input(values: list[int]) -> NnInput:
    return NnInput(0, [len(values)], 5, np.array(values, np.int64).tobytes())


def data_dependent_attacks() -> dict[str, tuple[bytes, list[NnInput]]]:
    """Attacks whose huge size comes from the guest's input values."""
    ones = numpy_helper.from_array(np.ones((1, 1024, 1024), np.float32)[:, :1, :1], "one")
    return {
        "constant-of-shape": (_model([helper.make_node("ConstantOfShape", ["s"], ["big"], value=_fill()), _reduce("big")],
                                     [_i64("s", 3)]), [_shape_input(BIG)]),
        "expand": (_model([helper.make_node("Expand", ["one", "s"], ["big"]), _reduce("big")], [_i64("s", 3)], [ones]),
                   [_shape_input(BIG)]),
        "tile": (_model([helper.make_node("Tile", ["one", "s"], ["big"]), _reduce("big")], [_i64("s", 3)], [ones]),
                 [_shape_input(BIG)]),
        "range": (_model([helper.make_node("Squeeze", ["s"], ["limit"]), helper.make_node("Range", ["zero", "limit", "step"], ["big"]),
                          helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)], [_i64("s", 1)],
                         [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "step")],
                         out_type=TensorProto.INT64),
                  [_shape_input([int(np.prod(BIG)) // 2])]),  # 3 GiB of I64
        "reshape-matmul": (_model([helper.make_node("ConstantOfShape", ["s"], ["a"], value=_fill()),
                                   helper.make_node("Transpose", ["a"], ["at"]), helper.make_node("MatMul", ["at", "a"], ["big"]),
                                   _reduce("big")], [_i64("s", 2)]),
                           [_shape_input([1, 28000])]),  # a small vector, and its outer product of 3 GiB
        "cast-hides-the-shape": (_model([helper.make_node("Cast", ["f"], ["s"], to=TensorProto.INT64),
                                         helper.make_node("ConstantOfShape", ["s"], ["big"], value=_fill()), _reduce("big")],
                                        [helper.make_tensor_value_info("f", TensorProto.FLOAT, [3])]),
                                 [NnInput(0, [3], 1, np.array(BIG, np.float32).tobytes())]),
    }


@pytest.mark.parametrize("attack", list(data_dependent_attacks()))
def test_graph_sized_by_guest_data_ends_oom(engine_name: str, tmp_path: Path, attack: str) -> None:
    model, inputs = data_dependent_attacks()[attack]
    guest = nn_guest_wat(NnGuest([model], inputs=inputs))
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, guest, allow=NN, limits=CAP)
    assert result.status is Status.OOM, (result.status, result.error, result.stdout)
    assert "memory" in (result.error or "")
    assert rss.grew_mib < RSS_BOUND_MIB, rss.grew_mib


def _sparse_bomb() -> bytes:
    values = numpy_helper.from_array(np.ones(1, np.float32), "W")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "W_indices")
    graph = helper.make_graph([_reduce("W")], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, BIG))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _shape_doubling(steps: int) -> bytes:
    """Shape -> Concat(s, s) -> ... : shape inference builds a vector of 2**steps dims, in the host
    process while ONNX Runtime creates a session (about 1.8 GB for 22 steps)."""
    nodes = [helper.make_node("Shape", ["x"], ["s0"])]
    for i in range(steps):
        nodes.append(helper.make_node("Concat", [f"s{i}", f"s{i}"], [f"s{i + 1}"], axis=0))
    nodes.append(helper.make_node("Size", [f"s{steps}"], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], out_type=TensorProto.INT64)


def static_attacks() -> dict[str, tuple[bytes, list[NnInput]]]:
    """Attacks in the graph itself, refused at `load`."""
    return {
        "fixed-constant-of-shape": (_model([helper.make_node("ConstantOfShape", ["s"], ["big"], value=_fill()), _reduce("big")], [],
                                           [numpy_helper.from_array(np.array(BIG, np.int64), "s")]), []),
        "sparse-initializer": (_sparse_bomb(), []),
        "shape-inference-amplifier": (_shape_doubling(22), [NnInput(0, [2, 3], 1, np.zeros(6, np.float32).tobytes())]),
    }


@pytest.mark.parametrize("attack", list(static_attacks()))
def test_graph_too_big_by_itself_ends_oom_at_load(engine_name: str, tmp_path: Path, attack: str) -> None:
    model, inputs = static_attacks()[attack]
    guest = nn_guest_wat(NnGuest([model], inputs=inputs))
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, guest, allow=NN, limits=CAP)
    assert result.status is Status.OOM, (result.status, result.error, result.stdout)
    assert "load" in (result.error or "")
    assert rss.grew_mib < RSS_BOUND_MIB, rss.grew_mib


def test_gguf_asking_for_a_huge_context_ends_oom(engine_name: str, tmp_path: Path) -> None:
    """A GGUF claiming a 1M-token training context, and a guest asking for all of it: llama.cpp would
    allocate and clear a KV cache of 512 MiB (and compute buffers beyond)."""
    need_llama_cpp()
    import json

    data = write_tiny_llama(tmp_path / "m" / "huge.gguf", n_ctx=1 << 20).read_bytes()
    meta = json.dumps({"ctx-size": 1 << 20, "n-predict": 1}).encode()
    guest = nn_guest_wat(NnGuest([data, meta], encoding=6, inputs=[NnInput(0, [1], 3, b"hello")]))
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, guest, allow=NN, limits=CAP)
    assert result.status is Status.OOM, (result.status, result.error, result.stdout)
    assert rss.grew_mib < RSS_BOUND_MIB, rss.grew_mib


def test_ordinary_graph_runs_under_a_small_cap(engine_name: str, tmp_path: Path) -> None:
    """The checks refuse attacks, not models: the tiny classifier runs in a 16 MiB flow."""
    data = write_tiny_onnx(tmp_path / "m" / "tiny.onnx").read_bytes()
    x = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32).tobytes()
    ids = np.array([[1, 2, 3, 4, 5]], np.int64).tobytes()
    guest = nn_guest_wat(NnGuest([data], inputs=[NnInput(0, [1, 4], 1, x), NnInput(1, [1, 5], 5, ids)]))
    result = run_flow(engine_name, tmp_path, guest, allow=NN, limits=CAP)
    assert result.status is Status.OK, (result.status, result.error, result.stdout)
    assert np.isclose(np.frombuffer(result.stdout or b"", np.float32).sum(), 1.0)


def test_session_arena_is_a_hard_backstop() -> None:
    """What the static checks are not shown (here: the bound is skipped), ONNX Runtime's arena of the
    guest's session still refuses: its max_mem is the flow's memory limit."""
    from wasmflow.wasi_nn.abi import NNHalt
    from wasmflow.wasi_nn.onnx_backend import GuestOnnxModel, RunLimits

    model_bytes, _ = data_dependent_attacks()["constant-of-shape"]
    model = GuestOnnxModel("backstop", model_bytes, "cpu")
    limits = RunLimits(memory=16 * 1024**2)
    model.prepare(limits)
    sess, _ = model._session_for(limits.memory)
    small = model._run(sess, {"s": np.array([16, 16, 16], np.int64)}, limits)
    assert float(small[0]) == 4096.0
    with PeakRss() as rss:
        with pytest.raises(NNHalt) as halted:
            model._run(sess, {"s": np.array(BIG, np.int64)}, limits)
    assert halted.value.status == "oom"
    assert rss.grew_mib < 64, rss.grew_mib


def test_exported_shape_computations_are_followed(engine_name: str, tmp_path: Path) -> None:
    """Exported graphs size tensors with Shape -> Gather -> Range on a dynamic dim: the checks follow
    such computations (they are evaluated on the real input shape) instead of refusing the graph."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["n"]),
             helper.make_node("Range", ["zero", "n", "step"], ["positions"]),
             helper.make_node("Cast", ["positions"], ["pos_f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "pos_f"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "step")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.full((1, 8), 0.5, np.float32)
    guest = nn_guest_wat(NnGuest([model.SerializeToString()], inputs=[NnInput(0, [1, 8], 1, x.tobytes())]))
    result = run_flow(engine_name, tmp_path, guest, allow=NN, limits=CAP)
    assert result.status is Status.OK, (result.status, result.error, result.stdout)
    assert np.allclose(np.frombuffer(result.stdout or b"", np.float32), 0.5 + np.arange(8))
