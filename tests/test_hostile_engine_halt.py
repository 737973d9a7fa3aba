"""A limit hit inside a host call ends the run at once, on both engines (`RunContext.halt` -> `Halt`).

The guest here ignores every error code: after the halting call it would write an output, and in the
loop variant it would call the host again forever. A test-only capability stands in for the real
host calls that halt (a WASI-NN compute past the deadline, a graph over the memory cap), so the
engines' part is tested on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_support import write_wat
from hostile_support import engine_name  # noqa: F401
from wasmflow.engine import RunRequest, Status, make_engine
from wasmflow.flows.model import Flow
from wasmflow.host_functions import Host
from wasmflow.host_functions.config import ConfigCapability
from wasmflow.host_functions.core import CoreCapability
from wasmflow.host_functions.spec import Call, Capability, Event, HostFunction

STATUSES = {0: "timeout", 1: "oom"}


class HaltingCapability(Capability):
    """`wasmflow_test::halt(kind)`: ends the run as a host-enforced limit would (0 timeout, 1 oom)."""

    name = "halt-test"

    def __init__(self) -> None:
        self.calls = 0

    def functions(self) -> list[HostFunction]:
        return [HostFunction("wasmflow_test", "halt", ("i32",), ("i32",), self.halt)]

    def halt(self, call: Call, kind: int) -> int:
        self.calls += 1
        raise call.run.halt(STATUSES[kind], f"test limit {STATUSES[kind]} hit inside a host call")


GUEST = """(module
  (import "wasmflow_test" "halt" (func $halt (param i32) (result i32)))
  (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
  (import "wasmflow" "secret_get" (func $secret (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "after")
  (data (i32.const 16) "UNDECLARED")
  (func (export "_start")
    (drop (call $secret (i32.const 16) (i32.const 10) (i32.const 64)))  ;; a refusal first: must not decide
    (drop (call $halt (i32.const KIND)))
    (drop (call $out (i32.const 0) (i32.const 5)))
    (loop $again (drop (call $halt (i32.const KIND))) (br $again))))"""


@pytest.mark.parametrize("kind", [0, 1])
def test_a_halting_host_call_stops_the_guest_before_its_next_instruction(engine_name, tmp_path: Path, kind: int):
    cap = HaltingCapability()
    engine = make_engine(engine_name, Host([CoreCapability(), ConfigCapability(environ={}), cap]), tmp_path / "cache")
    try:
        path = write_wat(tmp_path / "halt.wasm", GUEST.replace("KIND", str(kind)))
        flow = Flow(name="halting", module=str(path), limits={"timeout": "20s"})
        result = engine.run(engine.load(path, flow.name), RunRequest(flow=flow, event=Event("manual")))
    finally:
        engine.close()
    assert result.status is Status(STATUSES[kind]), result.error
    assert result.error == f"test limit {STATUSES[kind]} hit inside a host call"
    assert result.output is None, "the guest ran on after the halting call"
    assert cap.calls == 1
    assert result.run_ms < 5000  # stopped at once, not at the 20 s deadline
