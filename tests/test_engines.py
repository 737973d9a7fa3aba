"""The engine test suite, run against both engines: wasmtime (default) and WasmEdge (ctypes, C API).

Every test taking `engine_name` runs once per engine; the WasmEdge half skips where libwasmedge is
absent. Guests come from `guest-examples/` (the `guest_wasm` fixture) or are written in WAT here when
a test needs an exact sequence of WASI calls. `test_results_agree_between_engines` runs the same guests
on both and compares what a caller can see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from wasmflow.engine import ENGINES, Engine, ModuleError, RunRequest, RunResult, Status, make_engine
from engine_support import skip_without
from guest_support import write_wat
from wasmflow.engine import wasmedge_capi
from wasmflow.flows.model import Flow
from wasmflow.host_functions import Host
from wasmflow.host_functions.config import ConfigCapability
from wasmflow.host_functions.core import CoreCapability
from wasmflow.host_functions.spec import Call, Capability, Event, HostFunction



def new_engine(name: str, tmp_path: Path, host: Host | None = None) -> Engine:
    return make_engine(name, host or Host.default(state_dir=tmp_path / "state"), tmp_path / "cache")


@pytest.fixture
def engine(engine_name: str, tmp_path: Path) -> Iterator[Engine]:
    eng = new_engine(engine_name, tmp_path)
    yield eng
    eng.close()


def flow(name: str, module: Path, **kw: Any) -> Flow:
    return Flow(name=name, module=str(module), **kw)


def run(engine: Engine, module_path: Path, fl: Flow, event: Event | None = None, **req: Any) -> RunResult:
    module = engine.load(module_path, fl.name)
    return engine.run(module, RunRequest(flow=fl, event=event or Event("manual", b'{"name": "suite"}'), **req))


# -- the Rust guests ---------------------------------------------------------------------------


def hello_ok(engine: Engine, guest_wasm: dict[str, Path]) -> RunResult:
    result = run(engine, guest_wasm["hello"], flow("hello", guest_wasm["hello"], allow={"kv": True}))
    assert result.status is Status.OK, result.error
    return result


def test_hello_runs_and_kv_persists_across_runs(engine, guest_wasm):
    first = hello_ok(engine, guest_wasm)
    second = hello_ok(engine, guest_wasm)
    assert json.loads(first.output) == {"greeting": "Hello", "event": "manual", "count": 1, "who": "suite"}
    assert json.loads(second.output)["count"] == 2
    assert [(level, msg) for _, level, msg in second.logs] == [("info", "Hello, suite! event manual (run 2 of this flow)")]
    assert first.engine == engine.name and first.mode


HOSTILE = {
    "hostile-loop": ({"limits": {"timeout": "500ms"}}, Status.TIMEOUT),
    "hostile-membomb": ({"limits": {"memory": "64MiB"}}, Status.OOM),
    "hostile-read-passwd": ({}, Status.TRAP),
    "hostile-http-denied": ({}, Status.DENIED),
    "hostile-bad-pointers": ({"allow": {"kv": True}}, Status.DENIED),  # kv allowed: its calls fail on pointers alone
}


@pytest.mark.parametrize("package", sorted(HOSTILE))
def test_hostile_guest_is_stopped_and_the_next_run_succeeds(engine, guest_wasm, package):
    settings, expected = HOSTILE[package]
    result = run(engine, guest_wasm[package], flow("hostile", guest_wasm[package], **settings))
    assert result.status is expected, (result.error, result.stderr)
    if package == "hostile-loop":
        assert result.run_ms < 5000 and "deadline" in result.error
    if package == "hostile-membomb":
        assert "out of memory" in result.error
    if package == "hostile-read-passwd":
        assert b"root:" not in result.stdout and b"pre-opened" in result.stderr
    if package == "hostile-bad-pointers":
        lines = result.stdout.decode().split()
        assert len(lines) == 11 and all(line.endswith("=4") for line in lines), lines  # BAD_POINTER, every call
        assert result.exit_code == 3
    hello_ok(engine, guest_wasm)  # the host survived and runs the next guest normally


def test_cpu_heavy_guest_computes_what_python_computes(engine, guest_wasm):
    """The benchmark's guest, small: SHA-256 and JSON in the guest must match the host's answer."""
    wasm = guest_wasm["cpu-heavy"]
    result = run(engine, wasm, flow("cpu", wasm, config={"hash_kib": 64, "json_rounds": 20}))
    assert result.status is Status.OK, result.error
    out = json.loads(result.output)
    assert out["sha256"] == hashlib.sha256(bytes(i % 251 for i in range(64 * 1024))).hexdigest()
    assert out["json_rounds"] == 20


def observable(result: RunResult) -> dict[str, Any]:
    return {
        "status": result.status,
        "exit_code": result.exit_code,
        "output": result.output,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "logs": [(level, msg) for _, level, msg in result.logs],
        "denials": result.denials,
        "response": (result.response_status, result.response_headers, result.response_body),
    }


def test_results_agree_between_engines(guest_wasm, tmp_path):
    skip_without("wasmedge")
    cases = {
        "hello": {"allow": {"kv": True}},
        "cpu-heavy": {"config": {"hash_kib": 64, "json_rounds": 20}},
        **{name: settings for name, (settings, _) in HOSTILE.items()},
    }
    seen: dict[str, dict[str, Any]] = {}
    for name in ENGINES:
        engine = new_engine(name, tmp_path / name)
        try:
            for package, settings in cases.items():
                fl = flow("agree", guest_wasm[package], **settings)
                result = run(engine, guest_wasm[package], fl, Event("http", b'{"name": "both"}'))
                seen.setdefault(package, {})[name] = observable(result)
        finally:
            engine.close()
    for package, by_engine in seen.items():
        assert by_engine["wasmtime"] == by_engine["wasmedge"], package


# -- WASI grants, stdio, limits and statuses, with guests written in WAT -----------------------

ECHO_WAT = """(module
 (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func $write (param $fd i32) (param $ptr i32) (param $len i32)
  (i32.store (i32.const 16) (local.get $ptr))
  (i32.store (i32.const 20) (local.get $len))
  (drop (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 32))))
 (func (export "_start")
  ;; argv, NUL-separated, to stdout; the environment, NUL-separated, to stderr
  (drop (call $args_sizes (i32.const 0) (i32.const 4)))
  (drop (call $args_get (i32.const 1024) (i32.const 4096)))
  (call $write (i32.const 1) (i32.const 4096) (i32.load (i32.const 4)))
  (drop (call $env_sizes (i32.const 0) (i32.const 4)))
  (drop (call $env_get (i32.const 1024) (i32.const 8192)))
  (call $write (i32.const 2) (i32.const 8192) (i32.load (i32.const 4)))
  ;; one read of stdin, echoed to stdout after a '|'
  (i32.store8 (i32.const 40) (i32.const 124))
  (call $write (i32.const 1) (i32.const 40) (i32.const 1))
  (i32.store (i32.const 16) (i32.const 12288))
  (i32.store (i32.const 20) (i32.const 1024))
  (i32.store (i32.const 32) (i32.const 0))
  (drop (call $fd_read (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 32)))
  (call $write (i32.const 1) (i32.const 12288) (i32.load (i32.const 32)))))"""


def test_wasi_gets_only_declared_args_env_and_stdin(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DECLARED_SECRET", "s3cret")
    monkeypatch.setenv("UNDECLARED_SECRET", "nope")
    path = write_wat(tmp_path / "echo.wasm", ECHO_WAT)
    fl = flow("echo", path, args=["one", "two words"], config={"mode": "fast", "n": 3}, secrets=["DECLARED_SECRET"])
    result = run(engine, path, fl)
    assert result.status is Status.OK, result.error
    assert result.stdout == b"echo\0one\0two words\0|"  # no stdin given: it reads as empty
    assert sorted(result.stderr.split(b"\0")[:-1]) == [b"DECLARED_SECRET=s3cret", b"mode=fast", b"n=3"]
    piped = run(engine, path, fl, stdin=b"from stdin")
    assert piped.stdout.endswith(b"|from stdin")


def test_declared_directory_is_the_only_filesystem(engine, guest_wasm, tmp_path):
    """hostile-read-passwd reads /etc/passwd: it fails with no preopen, and reads our stand-in file
    when the flow maps a directory of ours at /etc (read-only)."""
    fake_etc = tmp_path / "etc"
    fake_etc.mkdir()
    (fake_etc / "passwd").write_text("stand-in:x:0:0\n")
    wasm = guest_wasm["hostile-read-passwd"]
    denied = run(engine, wasm, flow("dirs", wasm))
    assert denied.status is Status.TRAP and b"stand-in" not in denied.stdout
    granted = run(engine, wasm, flow("dirs", wasm, allow={"dirs": [f"{fake_etc}:/etc:ro"]}))
    assert granted.status is Status.OK, (granted.error, granted.stderr)
    assert granted.stdout == b"stand-in:x:0:0\n\n"


FLOOD_WAT = """(module
 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 2)
 (func (export "_start") (local $i i32)
  (i32.store (i32.const 0) (i32.const 1024))
  (i32.store (i32.const 4) (i32.const 65536))
  (loop $again
   (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
   (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
   (local.set $i (i32.add (local.get $i) (i32.const 1)))
   (br_if $again (i32.lt_u (local.get $i) (i32.const 64))))))"""


def test_output_is_captured_and_capped(engine, tmp_path):
    path = write_wat(tmp_path / "flood.wasm", FLOOD_WAT)  # 4 MiB to each of stdout and stderr
    result = run(engine, path, flow("flood", path, limits={"output": "256KiB"}))
    assert result.status is Status.OK, result.error
    for stream in (result.stdout, result.stderr):
        assert stream.startswith(b"\0" * 256 * 1024)
        assert stream.endswith(f"[wasmflow: {4 * 1024 * 1024 - 256 * 1024} more bytes dropped]\n".encode())


EXIT_WAT = """(module
 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
 (memory (export "memory") 1)
 (func (export "_start") (call $exit (i32.const %d))))"""


@pytest.mark.parametrize("code,status", [(0, Status.OK), (7, Status.ERROR)])
def test_proc_exit_code(engine, tmp_path, code, status):
    path = write_wat(tmp_path / f"exit{code}.wasm", EXIT_WAT % code)
    result = run(engine, path, flow("exit", path))
    assert (result.status, result.exit_code) == (status, code)


def test_trap_is_reported(engine, tmp_path):
    path = write_wat(tmp_path / "trap.wasm", '(module (memory (export "memory") 1) (func (export "_start") unreachable))')
    result = run(engine, path, flow("trap", path))
    assert result.status is Status.TRAP and result.error


def test_initial_memory_over_the_cap_is_oom(engine, tmp_path):
    path = write_wat(tmp_path / "big.wasm", '(module (memory (export "memory") 2000) (func (export "_start")))')  # 125 MiB
    assert run(engine, path, flow("big", path, limits={"memory": "64MiB"})).status is Status.OOM
    assert run(engine, path, flow("big", path, limits={"memory": "256MiB"})).status is Status.OK


GROW_WAT = """(module
 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
 (memory (export "memory") 1)
 (func (export "_start")
  ;; 16 pages (1 MiB) fit under a 2 MiB cap; 64 more do not: memory.grow answers -1
  (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then (call $exit (i32.const 1))))
  (if (i32.ne (memory.grow (i32.const 64)) (i32.const -1)) (then (call $exit (i32.const 2))))
  (call $exit (i32.const 0))))"""


def test_memory_grow_stops_at_the_cap(engine, tmp_path):
    path = write_wat(tmp_path / "grow.wasm", GROW_WAT)
    result = run(engine, path, flow("grow", path, limits={"memory": "2MiB"}))
    assert (result.status, result.exit_code) == (Status.OK, 0)


# No WASI here: wasmtime's WASI itself traps in a module without a memory export.
NO_MEMORY_WAT = """(module
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (func (export "_start") (if (i32.ne (call $out (i32.const 0) (i32.const 4)) (i32.const 4)) (then unreachable))))"""


def test_guest_without_memory_export_gets_bad_pointer(engine, tmp_path):
    path = write_wat(tmp_path / "nomem.wasm", NO_MEMORY_WAT)
    result = run(engine, path, flow("nomem", path))
    assert result.status is Status.OK, result.error  # it got BAD_POINTER (4), else it would trap
    assert "outside guest memory of 0 bytes" in result.denials[0]


class BoomCapability(Capability):
    """A capability whose function has a bug: the engine must return INTERNAL and log, not crash."""

    name = "boom"

    def functions(self) -> list[HostFunction]:
        def boom(call: Call) -> int:
            raise RuntimeError("a bug in a host function")

        return [HostFunction("test", "boom", (), ("i32",), boom)]


BOOM_WAT = """(module
 (import "test" "boom" (func $boom (result i32)))
 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
 (memory (export "memory") 1)
 (func (export "_start") (call $exit (call $boom))))"""


def test_host_function_bug_is_internal_and_logged(engine_name, tmp_path, caplog):
    engine = new_engine(engine_name, tmp_path, Host([CoreCapability(), ConfigCapability(), BoomCapability()]))
    try:
        path = write_wat(tmp_path / "boom.wasm", BOOM_WAT)
        with caplog.at_level(logging.ERROR):
            result = run(engine, path, flow("boom", path))
        assert (result.status, result.exit_code) == (Status.ERROR, 8)  # Code.INTERNAL
        assert "test::boom" in caplog.text and "a bug in a host function" in caplog.text
    finally:
        engine.close()


@pytest.mark.parametrize(
    "imports",
    [
        '(import "wasmflow" "no_such_function" (func))',
        '(import "wasmflow" "set_output" (func (param i64) (result i32)))',  # wrong type
        # WasmEdge's WASI has a socket extension; the standard (and wasmtime) has no sock_open.
        '(import "wasi_snapshot_preview1" "sock_open" (func (param i32 i32 i32) (result i32)))',
        '(import "env" "memory" (memory 1))',
    ],
)
def test_unlinkable_module_is_refused_at_load(engine, tmp_path, imports):
    path = write_wat(tmp_path / "imp.wasm", f'(module {imports} (func (export "_start")))')
    with pytest.raises(ModuleError, match=r"flow 'review'.*(cannot be linked|incompatible|unknown import)"):
        engine.load(path, "review")


def test_module_errors(engine, tmp_path):
    with pytest.raises(ModuleError, match=r"flow 'f'.*cannot read module"):
        engine.load(tmp_path / "missing.wasm", "f")
    garbage = tmp_path / "bad.wasm"
    garbage.write_bytes(b"\0asm\x01\x00\x00\x00garbage")
    with pytest.raises(ModuleError, match=r"flow 'f'.*not a valid module"):
        engine.load(garbage, "f")
    lib = write_wat(tmp_path / "lib.wasm", '(module (func (export "f")))')
    with pytest.raises(ModuleError, match="no _start"):
        engine.load(lib, "f")


def test_concurrent_runs_keep_their_own_output_and_state(engine, tmp_path):
    path = write_wat(tmp_path / "echo.wasm", ECHO_WAT)
    module = engine.load(path, "echo")
    fl = flow("echo", path)
    failures: list[str] = []

    def worker(i: int) -> None:
        for j in range(5):
            tag = f"t{i}-{j}"
            result = engine.run(module, RunRequest(flow=fl, event=Event("manual"), args=[tag], stdin=tag.encode()))
            if result.stdout != f"echo\0{tag}\0|{tag}".encode() or result.status is not Status.OK:
                failures.append(f"{tag}: {result.status} {result.stdout!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# -- WasmEdge only -----------------------------------------------------------------------------


def test_wasmedge_fallback_stdio_redirect_for_old_versions(tmp_path):
    """WasmEdge 0.14/0.15 lack WASI fd mapping; the dup2 fallback must capture the same way."""
    skip_without("wasmedge")
    engine = new_engine("wasmedge", tmp_path)
    try:
        engine._map_fds = False  # what an 0.14/0.15 library gets
        path = write_wat(tmp_path / "echo.wasm", ECHO_WAT)
        fl = flow("echo", path, args=["a"], config={"k": "v"})
        result = run(engine, path, fl, stdin=b"in")
        assert (result.status, result.stdout, result.stderr) == (Status.OK, b"echo\0a\0|in", b"k=v\0")
    finally:
        engine.close()


def test_missing_preopen_is_invalid_not_silently_dropped(guest_wasm, tmp_path, engine_name):
    skip_without(engine_name)
    engine = new_engine(engine_name, tmp_path)
    try:
        wasm = guest_wasm["hostile-read-passwd"]
        result = run(engine, wasm, flow("dirs", wasm, allow={"dirs": [f"{tmp_path}/nowhere:/etc"]}))
        assert result.status is Status.INVALID and "nowhere" in result.error, result.error
    finally:
        engine.close()


def test_wasmedge_reports_interpreter_mode_and_frees_on_close(tmp_path):
    skip_without("wasmedge")
    engine = new_engine("wasmedge", tmp_path)
    path = write_wat(tmp_path / "trap.wasm", '(module (memory (export "memory") 1) (func (export "_start") unreachable))')
    module = engine.load(path, "m")
    assert run(engine, path, flow("m", path)).mode == engine.mode in ("interpreter", "aot")
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.run(module, RunRequest(flow=flow("m", path), event=Event("manual")))


def test_wasmedge_library_lookup_honours_the_env_var(tmp_path):
    assert wasmedge_capi.candidates({wasmedge_capi.ENV_VAR: str(tmp_path / "nowhere")}) == []
    (tmp_path / "libwasmedge.so").write_bytes(b"")
    assert wasmedge_capi.candidates({wasmedge_capi.ENV_VAR: str(tmp_path)}) == [str(tmp_path / "libwasmedge.so")]
    with pytest.raises(wasmedge_capi.WasmEdgeUnavailable, match=r"WASMFLOW_WASMEDGE_LIB=.*names no libwasmedge.*installer"):
        wasmedge_capi.open_library({wasmedge_capi.ENV_VAR: str(tmp_path / "nowhere")})


@pytest.mark.parametrize("version,ok", [((0, 13, 5), False), ((0, 14, 0), True), ((0, 17, 1), True), ((0, 18, 0), False)])
def test_wasmedge_version_range(version, ok):
    class FakeLib:
        path = "/x/libwasmedge.so"
        version_tuple = version

    FakeLib.version = ".".join(map(str, version))
    if ok:
        wasmedge_capi.check_version(FakeLib())  # type: ignore[arg-type]
    else:
        with pytest.raises(wasmedge_capi.WasmEdgeUnavailable, match=r"supports? WasmEdge 0\.14 to 0\.17"):
            wasmedge_capi.check_version(FakeLib())  # type: ignore[arg-type]


@pytest.mark.parametrize("start", ['(func (export "_start") (param i32))',
                                   '(func (export "_start") (result i32) i32.const 0)'])
def test_a_start_that_takes_or_returns_values_is_refused_at_load(engine, tmp_path, start):
    """Both engines refuse it at load (wasmtime calls _start without looking its type up again)."""
    path = write_wat(tmp_path / "start.wasm", f'(module (memory (export "memory") 1) {start})')
    with pytest.raises(ModuleError, match="not as a function without parameters and results"):
        engine.load(path, "odd")
