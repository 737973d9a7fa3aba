"""The wasmtime engine's raw host callbacks: what they do beyond the shared `invoke` rules.

Host functions are defined as wasmtime "unchecked" callbacks (no per-call `Caller`/`Val` objects), so
three things the old trampoline did for free are checked here on real modules: an i64 argument and a
void result reach the body and the guest intact, and an exception `invoke` does not turn into a code
(a BaseException) is not lost in C but raised out of `run` after the run's cleanup.
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
