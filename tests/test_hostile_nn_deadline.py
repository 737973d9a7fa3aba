"""Hostile guests, class 3 of issue 9: WASI-NN compute must stop at the run's deadline.

A host call is outside the engine's epoch interruption, so every back-end call bounds itself: ONNX
Runtime's `RunOptions.terminate` is set by a timer at the deadline (checked between nodes and Loop
iterations), a guest graph's single node too heavy to finish in time is refused before it starts,
llama.cpp generation checks the deadline between decode steps and evaluates a long prompt a batch at a
time, and waiting for a busy llama context ends at the deadline. Each ends the run `timeout`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile_support import engine_name, run_flow  # noqa: F401
from nn_guest_wat import NnGuest, NnInput, failure, nn_guest_wat
from wasmflow.engine.base import Status
from wasmflow.wasi_nn.abi import NNError
from wasmflow.wasi_nn.testmodels import write_tiny_llama
from optional_support import need_llama_cpp

need_llama_cpp()

NN = {"nn": {"load_bytes": True}}


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> bytes:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def loop_model(trips: int) -> bytes:
    """x F32 [4] -> a Loop of `trips` iterations doubling it (carried state only: every size is known)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4])])
    return _model([helper.make_node("Loop", ["M", "cond", "x"], ["y"], body=body)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                  [numpy_helper.from_array(np.array(trips, np.int64), "M"), numpy_helper.from_array(np.array(True), "cond")])


def _constant(name: str, dims: list[int]) -> tuple[Any, Any]:
    node = helper.make_node("ConstantOfShape", [name + "_shape"], [name], value=numpy_helper.from_array(np.array([0.5], np.float32)))
    return node, numpy_helper.from_array(np.array(dims, np.int64), name + "_shape")


def conv_model(channels: int, size: int, kernel: int) -> bytes:
    """One Conv of channels x channels x kernel^2 over a channels x size^2 map: one uninterruptible kernel."""
    nx, ix = _constant("X", [1, channels, size, size])
    nw, iw = _constant("W", [channels, channels, kernel, kernel])
    pad = kernel // 2
    return _model([nx, nw, helper.make_node("Conv", ["X", "W"], ["Y"], pads=[pad] * 4),
                   helper.make_node("ReduceSum", ["Y"], ["out"], keepdims=0)],
                  [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [ix, iw])


def test_onnx_loop_stops_at_the_deadline(engine_name: str, tmp_path: Path) -> None:
    guest = nn_guest_wat(NnGuest([loop_model(10**12)], inputs=[NnInput(0, [4], 1, np.ones(4, np.float32).tobytes())]))
    t0 = time.monotonic()
    result = run_flow(engine_name, tmp_path, guest, allow=NN, limits={"timeout": "2s"})
    elapsed = time.monotonic() - t0
    assert result.status is Status.TIMEOUT, (result.status, result.error, result.stdout)
    assert elapsed < 5.0, elapsed
    assert "deadline" in (result.error or "")


def test_configured_onnx_model_stops_at_the_deadline_too(engine_name: str, tmp_path: Path) -> None:
    """An operator's graph is trusted for files, not for time."""
    path = tmp_path / "m" / "loop.onnx"
    path.parent.mkdir()
    path.write_bytes(loop_model(10**12))
    guest = nn_guest_wat(NnGuest([str(path).encode()], inputs=[NnInput(0, [4], 1, np.ones(4, np.float32).tobytes())]))
    t0 = time.monotonic()
    result = run_flow(engine_name, tmp_path, guest, models={"loop": {"backend": "onnx", "path": str(path)}},
                      allow={"models": ["loop"]}, limits={"timeout": "1.5s"})
    assert result.status is Status.TIMEOUT, (result.status, result.error, result.stdout)
    assert time.monotonic() - t0 < 4.5


def test_onnx_heavy_single_node_is_refused_before_it_runs(engine_name: str, tmp_path: Path) -> None:
    """A Conv of ~1.8e11 multiply-accumulates cannot be interrupted: it is refused (too_large)."""
    guest = nn_guest_wat(NnGuest([conv_model(256, 128, 13)]))
    t0 = time.monotonic()
    result = run_flow(engine_name, tmp_path, guest, allow=NN, limits={"timeout": "60s"})
    assert time.monotonic() - t0 < 10.0
    assert result.status is Status.DENIED, (result.status, result.error, result.stdout)
    assert failure(result.stdout or b"") == ("compute", NNError.TOO_LARGE)


def test_onnx_node_that_cannot_finish_in_time_ends_the_run_timeout(engine_name: str, tmp_path: Path) -> None:
    """Under the per-node cap, but more work than the deadline leaves: refused as a timeout."""
    guest = nn_guest_wat(NnGuest([conv_model(256, 128, 11)]))  # ~1.3e11 multiply-accumulates
    result = run_flow(engine_name, tmp_path, guest, allow=NN, limits={"timeout": "1s"})
    assert result.status is Status.TIMEOUT, (result.status, result.error, result.stdout)


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with an 8k training context: generating to its end takes far longer than a second."""
    return write_tiny_llama(tmp_path_factory.mktemp("long") / "long.gguf", n_ctx=8192)


def test_ggml_generation_stops_at_the_deadline(engine_name: str, tmp_path: Path, long_llama: Path) -> None:
    """An operator's model is trusted for files, not for time: generation ends at the deadline."""
    meta = json.dumps({"n-predict": -1, "ignore-eos": True, "ctx-size": 8192, "temp": 0}).encode()
    guest = nn_guest_wat(NnGuest([meta], encoding=6, name="default", inputs=[NnInput(0, [1], 3, b"once upon a time")]))
    models = {"default": {"backend": "ggml", "path": str(long_llama), "target": "cpu"}}
    t0 = time.monotonic()
    result = run_flow(engine_name, tmp_path, guest, models=models, allow={"models": ["default"]}, limits={"timeout": "1.5s"})
    elapsed = time.monotonic() - t0
    assert result.status is Status.TIMEOUT, (result.status, result.error, result.stdout)
    assert elapsed < 4.5, elapsed


# -- the back ends directly -------------------------------------------------------------------


def test_long_prompt_is_evaluated_a_batch_at_a_time_with_the_same_tokens(long_llama: Path) -> None:
    """The deadline is checked between prompt batches; the batches are those of one eval, so greedy
    output is unchanged."""
    import llama_cpp

    from wasmflow.wasi_nn.abi import NNHalt
    from wasmflow.wasi_nn.ggml_backend import Generation, SamplingParams

    llama = llama_cpp.Llama(model_path=str(long_llama), n_ctx=1024, n_batch=32, n_ubatch=32, verbose=False)
    try:
        prompt = llama.tokenize(b"the cat is a dog and " * 20)
        assert len(prompt) > 100
        sp = SamplingParams(n_predict=8, temp=0.0, ignore_eos=True)
        checks = []
        gen = Generation(llama, prompt, sp, deadline=lambda: checks.append(1) or 60.0)
        for _ in range(8):
            gen.step()
        ours = list(gen.tokens)
        gen.close()
        assert len(checks) >= len(prompt) // 32  # one check per prompt batch at least
        llama.reset()
        direct = []
        for i, token in enumerate(llama.generate(prompt, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, reset=True)):
            direct.append(token)
            if i == 7:
                break
        assert ours == direct
        llama.reset()
        left = iter([60.0, 60.0, -1.0])
        gen = Generation(llama, prompt, sp, deadline=lambda: next(left, -1.0))
        with pytest.raises(NNHalt) as halted:
            gen.step()
        assert halted.value.status == "timeout" and "prompt" in halted.value.message
        assert llama.n_tokens <= 3 * 32  # stopped after two batches of the prompt
        gen.close()
    finally:
        llama.close()


def test_waiting_for_a_busy_llama_context_ends_at_the_deadline(long_llama: Path) -> None:
    from wasmflow.flows.model import Allow, Flow, Limits
    from wasmflow.host_functions.spec import Call, Event, RunContext
    from wasmflow.wasi_nn import ModelRegistry, WasiNNCapability, parse_preload

    cap = WasiNNCapability(ModelRegistry([parse_preload(f"default:GGML:CPU:{long_llama}")]))
    try:
        flow = Flow(name="waits", module="x.wasm", allow=Allow(models=["default"]), limits=Limits(timeout=1))
        run = RunContext(flow=flow, event=Event(name="t"), run_id="r", deadline=time.monotonic() + 0.7)
        cap.open_run(run)
        mem = _Mem()
        fns = {f.name: f for f in cap.functions()}
        call = Call(mem, run)
        name = mem.put(b"default")
        assert fns["load_by_name"].body(call, name, 7, 0) == 0
        assert fns["init_execution_context"].body(call, mem.u32(0), 4) == 0
        prompt = mem.put(b"once")
        dims = mem.put((1).to_bytes(4, "little"))
        tensor = mem.put(b"".join(v.to_bytes(4, "little") for v in (dims, 1, 3, prompt, 4)))
        assert fns["set_input"].body(call, mem.u32(4), 0, tensor) == 0
        pool = cap.registry.model("default").pool()
        held = pool.acquire(5)  # another run holds the only context
        try:
            t0 = time.monotonic()
            code = fns["compute"].body(call, mem.u32(4))
            waited = time.monotonic() - t0
        finally:
            pool.release(held)
        assert code != 0 and run.halted is not None and run.halted[0] == "timeout", (code, run.halted)
        assert 0.4 < waited < 2.0, waited
        cap.close_run(run)
    finally:
        cap.close()


class _Mem:
    """A bytearray guest memory with a bump allocator (0..64 is scratch for out-pointers)."""

    def __init__(self) -> None:
        self.buf = bytearray(1 << 16)
        self.top = 64

    def size(self) -> int:
        return len(self.buf)

    def read(self, ptr: int, length: int) -> bytes:
        return bytes(self.buf[ptr : ptr + length])

    def write(self, ptr: int, data: bytes) -> None:
        self.buf[ptr : ptr + len(data)] = data

    def put(self, data: bytes) -> int:
        at = self.top
        self.write(at, data)
        self.top += (len(data) + 7) // 8 * 8
        return at

    def u32(self, ptr: int) -> int:
        return int.from_bytes(self.buf[ptr : ptr + 4], "little")
