"""The Rust SDK against the host's ABI: `sys.rs` declares exactly the `wasmflow` functions the host
offers, and the host's error message (`last_error`) reaches the guest on both engines, through WAT and
through the SDK's `Error`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine_support import skip_without
from guest_support import write_wat
from wasmflow.engine import ENGINES, Engine, RunRequest, RunResult, Status, make_engine
from wasmflow.flows.model import Flow
from wasmflow.host_functions import Host
from wasmflow.host_functions.github import GithubCapability
from wasmflow.host_functions.llm import LlmCapability
from wasmflow.host_functions.spec import MAX_ERROR_MESSAGE, Event, HostFunction, RunContext

SYS_RS = Path(__file__).resolve().parents[1] / "guest-examples" / "sdk" / "src" / "sys.rs"


@pytest.fixture(params=list(ENGINES))
def engine(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    skip_without(request.param)
    eng = make_engine(request.param, Host.default(state_dir=tmp_path / "state"), tmp_path / "cache")
    yield eng
    eng.close()


def run(engine: Engine, wasm: Path, fl: Flow) -> RunResult:
    return engine.run(engine.load(wasm, fl.name), RunRequest(flow=fl, event=Event("manual", b"{}")))


def sys_rs_imports() -> dict[str, int]:
    """`name -> parameter count` of every function in sys.rs's `wasmflow` extern block."""
    text = SYS_RS.read_text()
    block = text.split('#[link(wasm_import_module = "wasmflow")]', 1)[1]
    block = block[block.index("{") + 1:]
    found: dict[str, int] = {}
    for name, params in re.findall(r"pub fn (\w+)\(([^)]*)\)", block, flags=re.S):
        found[name] = len([p for p in params.split(",") if p.strip()])
    return found


def test_sys_rs_declares_exactly_the_hosts_wasmflow_functions(tmp_path: Path) -> None:
    host = Host.default(state_dir=tmp_path / "state", extra=[GithubCapability(None), LlmCapability(environ={})])
    try:
        offered = {fn.name: len(fn.params) for fn in host.functions() if fn.module == "wasmflow"}
    finally:
        host.close()
    declared = sys_rs_imports()
    assert "last_error" in offered and "github_request" in offered and "llm_chat" in offered
    assert declared == offered, (sorted(set(offered) ^ set(declared)),
                                 {k: (offered.get(k), declared.get(k)) for k in offered if offered.get(k) != declared.get(k)})


def test_last_error_is_bounded_and_names_the_call() -> None:
    fn = HostFunction("wasmflow", "config_get", "ptr len ptr", ("i32",), lambda *a: 0)
    run_ctx = RunContext(flow=None, event=Event("manual"), run_id="r1")
    run_ctx.record_error(fn, 1, "é" * 5000)  # two bytes a character: the cut must not split one
    assert run_ctx.last_error is not None and len(run_ctx.last_error) <= MAX_ERROR_MESSAGE
    text = run_ctx.last_error.decode("utf-8")  # still valid UTF-8
    assert text.startswith("wasmflow::config_get: éé")
    run_ctx.record_error(fn, 3, "")
    assert run_ctx.last_error == b"wasmflow::config_get: INVALID"


# last_error before any failure (NOT_FOUND, 1), then a config_get of a key the flow does not set, then
# last_error again: the output is the first code as a digit followed by the message.
LAST_ERROR_WAT = """(module
 (import "wasmflow" "last_error" (func $last_error (param i32) (result i32)))
 (import "wasmflow" "config_get" (func $config_get (param i32 i32 i32) (result i32)))
 (import "wasmflow" "result_read" (func $result_read (param i32 i32 i32) (result i32)))
 (import "wasmflow" "set_output" (func $set_output (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 256) "nope")
 (func (export "_start") (local $first i32) (local $len i32)
  (local.set $first (call $last_error (i32.const 64)))
  (drop (call $config_get (i32.const 256) (i32.const 4) (i32.const 80)))
  (if (i32.ne (call $last_error (i32.const 64)) (i32.const 0)) (then unreachable))
  (local.set $len (i32.load (i32.const 68)))
  (if (i32.ne (call $result_read (i32.load (i32.const 64)) (i32.const 1025) (local.get $len)) (i32.const 0))
   (then unreachable))
  (i32.store8 (i32.const 1024) (i32.add (i32.const 48) (local.get $first)))
  (drop (call $set_output (i32.const 1024) (i32.add (local.get $len) (i32.const 1))))))"""


def test_last_error_gives_a_wat_guest_the_message(engine: Engine, tmp_path: Path) -> None:
    wasm = write_wat(tmp_path / "last_error.wasm", LAST_ERROR_WAT)
    result = run(engine, wasm, Flow(name="last-error", module=str(wasm)))
    assert result.status is Status.OK, result.error
    assert result.output == b"1wasmflow::config_get: no config value 'nope'"


def test_sdk_error_carries_the_hosts_message(engine: Engine, guest_wasm: dict[str, Path]) -> None:
    """hostile-http-denied `expect`s its request: the panic shows the SDK's Error, message included."""
    wasm = guest_wasm["hostile-http-denied"]
    fl = Flow(name="fetch", module=str(wasm), config={"url": "http://127.0.0.1:9/x"}, allow={"http": ["https://api.github.com"]})
    result = run(engine, wasm, fl)
    assert result.status is Status.DENIED, result.error
    stderr = result.stderr.decode("utf-8", "replace")
    assert "kind: Denied" in stderr and "wasmflow::http_request: " in stderr, stderr
    assert "not in allow.http" in stderr, stderr
