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


def test_a_new_process_reads_the_module_shape_from_the_cache(tmp_path, monkeypatch):
    """The shape is kept beside the compiled code: a new engine over the same cache parses nothing."""
    import wasmflow.engine.wasmtime_engine as wasmtime_engine
    from wasmflow.engine.module_shape import inspect

    path = wasm(tmp_path / "m.wasm", "shaped")
    first = WasmtimeEngine(Host.default(state_dir=tmp_path / "state"), tmp_path / "cache")
    first.load(path, "f")

    def no_parse(_wasm: bytes) -> None:
        raise AssertionError("the module was parsed again")

    monkeypatch.setattr(wasmtime_engine, "inspect", no_parse)
    second = WasmtimeEngine(Host.default(state_dir=tmp_path / "state"), tmp_path / "cache")
    module = second.load(path, "f")
    assert module.from_cache and module.shape == inspect(path.read_bytes())
    assert run(second, path) == b"shaped"


def test_an_entry_of_the_older_layout_or_shape_format_is_not_trusted(engine, tmp_path):
    import zlib

    from wasmflow.engine.cache import CacheEntry

    path = wasm(tmp_path / "m.wasm", "layout")
    engine.load(path, "f")
    entry = engine.cache.entry(path.read_bytes())
    digest = entry.name[:-len(".bin")]
    code = bytes(engine.cache.get(digest).code)
    entry.write_bytes(zlib.crc32(code).to_bytes(4, "big") + code)  # the layout before shapes were kept
    assert engine.cache.get(digest) is None
    assert not engine.load(path, "f").from_cache
    assert run(engine, path) == b"layout"
    engine.cache.put(digest, code, b'{"format": 0}')  # a shape of another format: parsed afresh, code reused
    module = engine.load(path, "f")
    assert module.from_cache and module.shape.start is True
    assert engine.cache.get(digest) == CacheEntry(memoryview(bytearray(code)), module.shape.to_json())  # rewritten


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


# -- the pooling allocator: instance slots are reused, never shared ------------------------------

WRITER_WAT = """(module
 (memory (export "memory") 1)
 (func (export "_start")
  (drop (memory.grow (i32.const 2)))
  (i64.store (i32.const 40000) (i64.const 0x1122334455667788))
  (i64.store (i32.const 140000) (i64.const 0x1122334455667788))))"""

READER_WAT = """(module
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start")
  (drop (memory.grow (i32.const 2)))
  (i64.store (i32.const 0) (i64.load (i32.const 40000)))
  (i64.store (i32.const 8) (i64.load (i32.const 140000)))
  (drop (call $out (i32.const 0) (i32.const 16)))))"""


def test_runtimes_of_one_process_share_one_engine_and_its_pool(tmp_path):
    """Each pool reserves hundreds of GiB of address space: one per runtime would exhaust a process."""
    first = WasmtimeEngine(Host.default(state_dir=tmp_path / "a"), tmp_path / "cache-a")
    second = WasmtimeEngine(Host.default(state_dir=tmp_path / "b"), tmp_path / "cache-b")
    assert first.engine is second.engine and first.shared is second.shared
    assert first.linker is not second.linker  # host functions stay per host
    assert run(first, wasm(tmp_path / "a.wasm", "from a")) == b"from a"
    assert run(second, wasm(tmp_path / "b.wasm", "from b")) == b"from b"


def test_a_run_never_sees_the_memory_of_the_run_before_it_in_the_slot(engine, tmp_path):
    assert engine.pooled  # this machine can reserve the pool; the fallback has its own test
    writer, reader = write_wat(tmp_path / "w.wasm", WRITER_WAT), write_wat(tmp_path / "r.wasm", READER_WAT)
    for _ in range(3):  # the same slots, over and over
        assert run(engine, writer) is None
        assert run(engine, reader) == bytes(16)


def test_more_runs_at_once_than_instance_slots_wait_for_one(tmp_path):
    """Past the pool's slots a run waits for one instead of failing to instantiate."""
    import threading

    from wasmflow.engine.wasmtime_engine import SharedEngine

    eng = WasmtimeEngine(Host.default(state_dir=tmp_path / "state"), tmp_path / "cache", SharedEngine.create(instances=2))
    assert eng.pooled
    try:
        busy = write_wat(tmp_path / "busy.wasm", """(module (memory (export "memory") 1)
          (func (export "_start") (local i32) (local.set 0 (i32.const 30000000))
            (loop $l (local.set 0 (i32.sub (local.get 0) (i32.const 1))) (br_if $l (local.get 0)))))""")
        module = eng.load(busy, "busy")
        results: list = []
        flow = Flow(name="busy", module=str(busy))

        def go() -> None:
            results.append(eng.run(module, RunRequest(flow=flow, event=Event("manual"))))

        threads = [threading.Thread(target=go) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.status for r in results] == [Status.OK] * 6, [r.error for r in results]
    finally:
        eng.close()


def test_without_room_for_the_pool_the_engine_allocates_run_by_run(tmp_path):
    """Under an address-space limit (ulimit -v) the pool cannot be reserved: runs still work."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from test_engine_cache import READER_WAT, run
        from guest_support import write_wat
        from wasmflow.engine.wasmtime_engine import WasmtimeEngine
        from wasmflow.host_functions import Host
        from pathlib import Path
        tmp = Path({str(tmp_path)!r})
        eng = WasmtimeEngine(Host.default(state_dir=tmp / "state"), tmp / "cache")
        assert not eng.pooled
        assert run(eng, write_wat(tmp / "r.wasm", READER_WAT)) == bytes(16)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "no room for wasmtime's pooling allocator" in proc.stderr
