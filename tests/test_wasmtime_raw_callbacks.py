"""The wasmtime engine's raw host callbacks: what they do beyond the shared `invoke` rules.

Host functions are defined as wasmtime "unchecked" callbacks (no per-call `Caller`/`Val` objects), so
three things the old trampoline did for free are checked here on real modules: an i64 argument and a
void result reach the body and the guest intact, and an exception `invoke` does not turn into a code
(a BaseException) is not lost in C but raised out of `run` after the run's cleanup. And every argument
kind arrives converted, at any arity, on both engines (the callback reads each slot's 64 bits and leaves
the width to the conversion).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_support import write_wat
from wasmflow.engine import RunRequest, Status, make_engine
from wasmflow.flows.model import Flow
from wasmflow.host_functions import Host
from wasmflow.host_functions.spec import Call, Capability, Event, HostFunction, RunContext


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt/SystemExit: nothing a host call may swallow."""


class ProbeCapability(Capability):
    name = "probe"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.closed = 0

    def functions(self) -> list[HostFunction]:
        def record(call: Call, delta: int, ptr: int) -> int:
            self.seen.append((delta, ptr))
            call.memory.write(ptr, delta.to_bytes(8, "little", signed=True))
            return 0

        def ping(call: Call) -> int:  # declared void below: its code must not be written to a result slot
            self.seen.append((0, -1))
            return 0

        def interrupt(call: Call) -> int:
            raise Interrupt("stop the process")

        return [
            HostFunction("probe", "record", "i64 ptr", ("i32",), record),
            HostFunction("probe", "ping", (), (), ping),
            HostFunction("probe", "interrupt", (), ("i32",), interrupt),
        ]

    def close_run(self, run: RunContext) -> None:
        self.closed += 1


RECORD_WAT = """(module
  (import "probe" "record" (func $record (param i64 i32) (result i32)))
  (import "probe" "ping" (func $ping))
  (memory (export "memory") 1)
  (func (export "_start")
    (call $ping)
    (if (i32.ne (call $record (i64.const -5000000000) (i32.const 64)) (i32.const 0)) (then unreachable))
    (if (i64.ne (i64.load (i32.const 64)) (i64.const -5000000000)) (then unreachable))))
"""

INTERRUPT_WAT = """(module
  (import "probe" "interrupt" (func $interrupt (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $interrupt))))
"""


@pytest.fixture
def probe_engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    probe = ProbeCapability()
    engine = make_engine("wasmtime", Host.default(state_dir=tmp_path / "state", extra=[probe]), tmp_path / "cache")
    yield engine, probe
    engine.close()


def _run(engine, tmp_path: Path, name: str, wat: str):  # type: ignore[no-untyped-def]
    path = write_wat(tmp_path / f"{name}.wasm", wat)
    flow = Flow(name=name, module=str(path))
    return engine.run(engine.load(path, name), RunRequest(flow=flow, event=Event("manual")))


def test_i64_argument_and_void_result_round_trip(probe_engine, tmp_path: Path) -> None:
    engine, probe = probe_engine
    result = _run(engine, tmp_path, "record", RECORD_WAT)
    assert result.status is Status.OK, result.error
    assert probe.seen == [(0, -1), (-5000000000, 64)]


def test_base_exception_in_a_host_call_is_raised_after_cleanup(probe_engine, tmp_path: Path) -> None:
    engine, probe = probe_engine
    with pytest.raises(Interrupt, match="stop the process"):
        _run(engine, tmp_path, "interrupt", INTERRUPT_WAT)
    assert probe.closed == 1
    # The engine is still usable, and the next run does not see the old exception.
    assert _run(engine, tmp_path, "record", RECORD_WAT).status is Status.OK


class KindsCapability(Capability):
    """Host functions of 7 and 9 parameters, every kind at the edge of its range."""

    name = "kinds"

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def functions(self) -> list[HostFunction]:
        def record(call: Call, *args: int) -> int:
            self.seen.append(args)
            return 0

        return [HostFunction("kinds", "seven", "i32 u32 ptr len i64 i32 i64", ("i32",), record),
                HostFunction("kinds", "nine", "i64 i32 u32 i64 ptr i32 len i64 i32", ("i32",), record)]


KINDS_WAT = """(module
  (import "kinds" "seven" (func $seven (param i32 i32 i32 i32 i64 i32 i64) (result i32)))
  (import "kinds" "nine" (func $nine (param i64 i32 i32 i64 i32 i32 i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $seven (i32.const -1) (i32.const -1) (i32.const 0x80000000) (i32.const 7)
                       (i64.const 0x8000000000000000) (i32.const 0x7fffffff) (i64.const -1)))
    (drop (call $nine (i64.const 0x7fffffffffffffff) (i32.const -2) (i32.const 0x80000000) (i64.const 0)
                      (i32.const -1) (i32.const 0x80000000) (i32.const 0) (i64.const -2) (i32.const 1)))))
"""


def test_every_argument_kind_arrives_converted_at_any_arity(engine_name, tmp_path: Path) -> None:
    """Signed kinds sign-extend from their width and the unsigned ones keep it, on both engines, for an
    arity with its own caller (7) and one past them (9)."""
    kinds = KindsCapability()
    engine = make_engine(engine_name, Host.default(state_dir=tmp_path / "state", extra=[kinds]), tmp_path / "cache")
    try:
        result = _run(engine, tmp_path, "kinds", KINDS_WAT)
    finally:
        engine.close()
    assert result.status is Status.OK, result.error
    assert kinds.seen == [
        (-1, 0xFFFFFFFF, 0x80000000, 7, -(1 << 63), 0x7FFFFFFF, -1),
        ((1 << 63) - 1, -2, 0x80000000, 0, 0xFFFFFFFF, -(1 << 31), 0, -2, 1),
    ]
