"""The engine-facing parts of a capability, written once (issue 10, knot 3).

- Streamed text (WASI-NN `stream-stdout`) reaches the guest's stdout on both engines, the same text, in
  order with the guest's own output: through `RunContext.stdout`, which both engines set.
- Argument kinds are declared once and converted once in `invoke`: wasmtime's signed values and
  WasmEdge's raw bits reach a body as the same numbers.
- One bounds rule (`BoundedMemory`) for every guest memory accessor.
- `allow.dirs` parsed once, by the model (`DirGrant`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_support import skip_without
from guest_support import write_wat
from wasmflow.engine import make_engine
from wasmflow.engine.base import RunRequest, Status
from wasmflow.flows.model import Allow, DirGrant, Flow, Limits
from wasmflow.host_functions import Host
from wasmflow.host_functions.spec import (BoundedMemory, Call, Code, Event, HostError, HostFunction, RunContext,
                                          invoke)
from optional_support import need_llama_cpp

REPO = Path(__file__).resolve().parents[1]
STREAM_ARGS = ["--temp", "0", "--n-predict", "8", "--metadata", '{"stream-stdout": true}', "once upon a time"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_llama_cpp()
    from wasmflow.wasi_nn.testmodels import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def _streamed(engine_name: str, guest_wasm: dict[str, Path], gguf: Path, cache: Path) -> bytes:
    from wasmflow.wasi_nn import ModelRegistry, WasiNNCapability, parse_preload

    host = Host([WasiNNCapability(ModelRegistry([parse_preload(f"default:GGML:AUTO:{gguf}")]))])
    engine = make_engine(engine_name, host, cache)
    try:
        module = engine.load(guest_wasm["llama-chat"], "nn-test")
        flow = Flow(name="nn-test", module="x.wasm", allow=Allow(models=["default"]),
                    limits=Limits(timeout=120, memory="1GiB"))
        result = engine.run(module, RunRequest(flow=flow, event=Event(name="test"), args=STREAM_ARGS))
    finally:
        engine.close()
        host.close()
    assert result.status is Status.OK, (engine_name, result.error, result.stderr)
    return result.stdout


def _halves(stdout: bytes) -> bytes:
    """The streamed text of `text + text + newline`: the host streamed it, then the guest printed it."""
    text = stdout[: (len(stdout) - 1) // 2]
    assert text and stdout == text + text + b"\n", stdout
    return text


@pytest.mark.parametrize("engine_name", ["wasmtime", "wasmedge"])
def test_streamed_text_reaches_captured_stdout(engine_name: str, guest_wasm: dict[str, Path], tiny_gguf: Path,
                                               tmp_path: Path) -> None:
    skip_without(engine_name)
    _halves(_streamed(engine_name, guest_wasm, tiny_gguf, tmp_path))


def test_streamed_text_is_the_same_on_both_engines(guest_wasm: dict[str, Path], tiny_gguf: Path, tmp_path: Path) -> None:
    skip_without("wasmedge")
    texts = {name: _halves(_streamed(name, guest_wasm, tiny_gguf, tmp_path / name)) for name in ("wasmtime", "wasmedge")}
    assert texts["wasmtime"] == texts["wasmedge"]


@pytest.mark.parametrize("engine_name", ["wasmtime", "wasmedge"])
def test_streamed_text_reaches_the_process_stdout_under_exec(engine_name: str, guest_wasm: dict[str, Path],
                                                            tiny_gguf: Path, tmp_path: Path) -> None:
    """`wasmflow exec` passes stdout through (inherit_stdio): the streamed text comes out of the process."""
    skip_without(engine_name)
    code = "from wasmflow.exec_command import exec_command; exec_command()"
    args = [str(guest_wasm["llama-chat"]), "--engine", engine_name, "--state-dir", str(tmp_path),
            "--nn-preload", f"default:GGML:AUTO:{tiny_gguf}", "--", *STREAM_ARGS]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    _halves(done.stdout)


# -- argument kinds ----------------------------------------------------------------------------------


def _run() -> RunContext:
    return RunContext(flow=Flow(name="f", module="x.wasm"), event=Event("e"), run_id="r", deadline=time.monotonic() + 30)


def test_invoke_converts_each_kind_once_whatever_the_engine_passes() -> None:
    seen: list[tuple[int, ...]] = []
    fn = HostFunction("t", "f", "ptr len u32 i32 i64", ("i32",), lambda call, *args: seen.append(args) or 0)
    assert fn.wasm_params == ("i32", "i32", "i32", "i32", "i64")
    call = Call(None, _run())  # type: ignore[arg-type]
    invoke(fn, call, [-1, -2, -3, -4, -5])  # wasmtime-py: signed values
    invoke(fn, call, [0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFC, 0xFFFFFFFFFFFFFFFB])  # WasmEdge: raw bits
    invoke(fn, call, [0x7_00000010, 5, 6, 0x80000000, 1 << 63])  # junk above 32 bits is not part of an i32
    assert seen[0] == seen[1] == (0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, -4, -5)
    assert seen[2] == (0x10, 5, 6, -(1 << 31), -(1 << 63))


@pytest.mark.parametrize("arity", range(8))
def test_every_arity_of_unsigned_parameters_masks_each_one(arity: int) -> None:
    # The common shapes have callers written out, the others are compiled: both must convert alike.
    seen: list[tuple[int, ...]] = []
    kinds = tuple(("ptr", "len", "u32")[i % 3] for i in range(arity))
    fn = HostFunction("t", "f", kinds, ("i32",), lambda call, *args: seen.append(args) or 0)
    call = Call(None, _run())  # type: ignore[arg-type]
    raw = [-1 - i if i % 2 else (0x5_00000000 + i) for i in range(arity)]
    assert invoke(fn, call, raw) == 0
    assert seen == [tuple(v & 0xFFFFFFFF for v in raw)]


def test_unknown_parameter_kind_is_refused_at_definition() -> None:
    with pytest.raises(ValueError, match="unknown parameter kind 'pointer'"):
        HostFunction("t", "f", "pointer len", ("i32",), lambda call, a, b: 0)


def test_a_wrong_argument_count_is_internal_not_a_crash() -> None:
    fn = HostFunction("t", "f", "ptr len", ("i32",), lambda call, a, b: 0)
    assert invoke(fn, Call(None, _run()), [1]) == Code.INTERNAL  # type: ignore[arg-type]


# -- one bounds rule ---------------------------------------------------------------------------------


class _Bytes(BoundedMemory):
    """A BoundedMemory over a bytearray: only the raw parts, like an engine's accessor."""

    __slots__ = ("buf", "raw_calls")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.raw_calls = 0

    def size(self) -> int:
        return len(self.buf)

    def _load(self, ptr: int, length: int) -> bytes:
        self.raw_calls += 1
        return bytes(self.buf[ptr:ptr + length])

    def _store(self, ptr: int, data: bytes) -> None:
        self.raw_calls += 1
        self.buf[ptr:ptr + len(data)] = data


def test_bounded_memory_checks_before_any_raw_access() -> None:
    mem = _Bytes(64)
    mem.write(60, b"abcd")
    assert mem.read(60, 4) == b"abcd" and mem.read(64, 0) == b""
    assert mem.u32(60) == int.from_bytes(b"abcd", "little")
    calls = mem.raw_calls
    for ptr, length in [(61, 4), (64, 1), (0xFFFFFFFF, 2), (-1, 1), (0, -1), (0, 65)]:
        with pytest.raises(HostError) as err:
            mem.read(ptr, length)
        assert err.value.code == Code.BAD_POINTER
    with pytest.raises(HostError):
        mem.write(62, b"xyz")
    assert mem.raw_calls == calls  # nothing out of bounds reached the engine's raw copy


@pytest.mark.parametrize("engine_name", ["wasmtime", "wasmedge"])
def test_engines_share_the_bounds_rule(engine_name: str, tmp_path: Path) -> None:
    """A guest passing u32::MAX as a pointer, or a length past its memory, is BAD_POINTER on both engines."""
    skip_without(engine_name)
    wat = """(module
      (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (i32.store8 (i32.const 0) (call $out (i32.const -1) (i32.const 1)))
        (i32.store8 (i32.const 1) (call $out (i32.const 65535) (i32.const 2)))
        (i32.store8 (i32.const 2) (call $out (i32.const 65534) (i32.const 2)))
        (drop (call $out (i32.const 0) (i32.const 3)))))"""
    path = write_wat(tmp_path / "g.wasm", wat)
    host = Host.default(state_dir=tmp_path / "state")
    engine = make_engine(engine_name, host, tmp_path / "cache")
    try:
        flow = Flow(name="g", module=str(path))
        result = engine.run(engine.load(path, "g"), RunRequest(flow=flow, event=Event("e")))
    finally:
        engine.close()
        host.close()
    assert result.status is Status.OK, result.error
    assert result.output == bytes([Code.BAD_POINTER, Code.BAD_POINTER, Code.OK])
    assert len(result.denials) == 2


# -- allow.dirs --------------------------------------------------------------------------------------


def test_dir_grants_are_parsed_once_by_the_model() -> None:
    allow = Allow(dirs=["/srv/data:/data:ro", "/tmp/work:/work"])
    assert allow.dir_grants == [DirGrant("/srv/data", "/data", True), DirGrant("/tmp/work", "/work", False)]
    assert allow.dirs == ["/srv/data:/data:ro", "/tmp/work:/work"]  # flows.yaml's form is kept as written
    for bad in ("/srv", "/a:/b:rw", ":/b", "/a::ro", "/a:/b:ro:x"):
        with pytest.raises(ValueError, match="expected host_path:guest_path"):
            Allow(dirs=[bad])


@pytest.mark.parametrize("engine_name", ["wasmtime", "wasmedge"])
def test_a_read_only_grant_is_read_only_on_both_engines(engine_name: str, tmp_path: Path) -> None:
    """The grant the model parsed is what the engine preopens: readable at its guest path, not writable."""
    skip_without(engine_name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_bytes(b"hello")
    wat = """(module
      (import "wasi_snapshot_preview1" "path_open"
        (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
      (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "in.txt")
      (data (i32.const 120) "new.txt")
      (func (export "_start")
        ;; fd 3 is the first preopen. Read in.txt (rights: fd_read), then create new.txt (O_CREAT, fd_write).
        (i32.store8 (i32.const 0) (call $open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 6)
          (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 200)))
        (i32.store8 (i32.const 1) (call $open (i32.const 3) (i32.const 0) (i32.const 120) (i32.const 7)
          (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 204)))
        (drop (call $out (i32.const 0) (i32.const 2)))))"""
    path = write_wat(tmp_path / "g.wasm", wat)
    host = Host.default(state_dir=tmp_path / "state")
    engine = make_engine(engine_name, host, tmp_path / "cache")
    try:
        flow = Flow(name="g", module=str(path), allow=Allow(dirs=[f"{tmp_path / 'data'}:/data:ro"]))
        result = engine.run(engine.load(path, "g"), RunRequest(flow=flow, event=Event("e")))
    finally:
        engine.close()
        host.close()
    assert result.status is Status.OK, result.error
    assert result.output is not None and result.output[0] == 0, result.output  # read: allowed
    assert result.output[1] != 0  # create: refused (errno, not success)
    assert not (tmp_path / "data" / "new.txt").exists()
