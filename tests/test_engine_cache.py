"""The compiled-module cache and module errors of the wasmtime engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_support import write_wat
from wasmflow.engine import ModuleError, RunRequest, Status
from wasmflow.engine.cache import ModuleCache
from wasmflow.engine.wasmtime_engine import WasmtimeEngine
from wasmflow.flows.model import Flow
from wasmflow.host_functions import Host
from wasmflow.host_functions.spec import Event

OUTPUT_WAT = """(module
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 0) "%s")
 (func (export "_start") (drop (call $out (i32.const 0) (i32.const %d)))))"""


def wasm(path: Path, text: str) -> Path:
    return write_wat(path, OUTPUT_WAT % (text, len(text)))


@pytest.fixture
def engine(tmp_path: Path):
    eng = WasmtimeEngine(Host.default(state_dir=tmp_path / "state"), tmp_path / "cache")
    yield eng
    eng.close()


def run(engine: WasmtimeEngine, path: Path) -> bytes | None:
    module = engine.load(path, "f")
    result = engine.run(module, RunRequest(flow=Flow(name="f", module=str(path)), event=Event("manual")))
    assert result.status is Status.OK, result.error
    return result.output


def test_second_load_comes_from_cache_and_changed_module_is_recompiled(engine, tmp_path):
    path = wasm(tmp_path / "m.wasm", "one")
    assert not engine.load(path, "f").from_cache
    assert engine.load(path, "f").from_cache
    wasm(path, "two")
    module = engine.load(path, "f")
    assert not module.from_cache
    assert run(engine, path) == b"two"


def test_corrupt_cache_entry_is_recompiled_not_trusted(engine, tmp_path):
    path = wasm(tmp_path / "m.wasm", "intact")
    engine.load(path, "f")
    entry = engine.cache.entry(path.read_bytes())
    blob = bytearray(entry.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # flip a byte in the compiled code
    entry.write_bytes(bytes(blob))
    module = engine.load(path, "f")
    assert not module.from_cache
    assert run(engine, path) == b"intact"
    entry.write_bytes(b"short")  # truncated entry
    assert not engine.load(path, "f").from_cache


def test_cache_is_keyed_by_engine_version(tmp_path):
    cache_dir = tmp_path / "cache"
    engine = WasmtimeEngine(Host.default(state_dir=tmp_path / "state"), cache_dir)
    assert engine.cache.directory.name == f"wasmtime-{engine.version}"
    other = ModuleCache(cache_dir / "wasmtime-0.0.1")
    calls = []
    other.get_or_compile(b"\0asm", lambda: calls.append(1) or b"x")
    assert calls == [1]  # another version's directory starts empty: nothing shared
    engine.close()


def test_missing_file_names_the_flow(engine, tmp_path):
    with pytest.raises(ModuleError, match=r"flow 'review'.*cannot read module"):
        engine.load(tmp_path / "nope.wasm", "review")


def test_malformed_module_names_the_flow(engine, tmp_path):
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\0asm\x01\x00\x00\x00garbage")
    with pytest.raises(ModuleError, match=r"flow 'review'.*not a valid module"):
        engine.load(bad, "review")
    text = tmp_path / "text.wasm"
    text.write_text("hello")
    with pytest.raises(ModuleError, match=r"flow 'review'.*not a WebAssembly module"):
        engine.load(text, "review")


def test_missing_import_names_the_flow_and_the_import(engine, tmp_path):
    path = write_wat(tmp_path / "imp.wasm",
                     '(module (import "wasmflow" "no_such_function" (func)) (memory (export "memory") 1)'
                     ' (func (export "_start")))')
    with pytest.raises(ModuleError, match=r"flow 'review'.*no_such_function"):
        engine.load(path, "review")


def test_module_without_start_is_refused(engine, tmp_path):
    path = write_wat(tmp_path / "lib.wasm", '(module (func (export "f")))')
    with pytest.raises(ModuleError, match="no _start"):
        engine.load(path, "lib")
