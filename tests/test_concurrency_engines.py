"""Cancelling a running guest on both engines: the deadline's interrupt, triggered on request.

Real guests (WAT loops, and guest-examples/cpu-heavy through the real dispatcher), no stand-ins: the run
ends `cancelled` with who cancelled it, within a few interrupt periods of the signal, where its deadline
is 30 s away.
"""

from __future__ import annotations

import threading
import time

import pytest

from wasmflow.engine.base import Status
from wasmflow.host_functions.spec import CancelSignal, Event

from platform_support import LOOP_WAT, write_wat

# A guest that never stops calling the host: the cancel reaches it through `invoke`.
HOST_LOOP_WAT = """(module
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start") (loop $l (drop (call $out (i32.const 0) (i32.const 4))) (br $l))))"""

FLOWS = """
flows:
  - name: spin
    module: {module}
    limits: {{timeout: 30s}}
"""

# Generous for a shared machine; the interrupt period is 10 ms (bench/concurrency.py measures it).
STOP_WITHIN = 2.0


def cancel_after(signal: CancelSignal, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, signal.cancel, ("cancelled by test",))
    timer.start()
    return timer


@pytest.mark.parametrize("wat", [LOOP_WAT, HOST_LOOP_WAT], ids=["pure-loop", "host-call-loop"])
def test_cancel_stops_a_running_guest_at_once(tmp_path, make_runtime, engine_name, wat):
    module = write_wat(tmp_path / "spin.wasm", wat)
    runtime = make_runtime(tmp_path, FLOWS.format(module=module), engine=engine_name)
    signal = CancelSignal()
    timer = cancel_after(signal, 0.3)
    started = time.monotonic()
    result = runtime.run("spin", Event(name="manual"), cancel=signal)
    stopped = time.monotonic()
    timer.join()
    assert result.status is Status.CANCELLED, (result.status, result.error)
    assert result.error == "cancelled by test"
    assert signal.at is not None and stopped - signal.at < STOP_WITHIN
    assert stopped - started < 0.3 + STOP_WITHIN


def test_a_cancellable_run_still_times_out_at_its_deadline(tmp_path, make_runtime, engine_name):
    module = write_wat(tmp_path / "spin.wasm", LOOP_WAT)
    flows = FLOWS.format(module=module).replace("timeout: 30s", "timeout: 300ms")
    runtime = make_runtime(tmp_path, flows, engine=engine_name)
    result = runtime.run("spin", Event(name="manual"), cancel=CancelSignal())
    assert result.status is Status.TIMEOUT and "deadline of 0.3s" in (result.error or "")


def test_a_cancellable_run_that_is_not_cancelled_finishes_normally(tmp_path, make_runtime, engine_name):
    from platform_support import OK_WAT

    module = write_wat(tmp_path / "ok.wasm", OK_WAT)
    runtime = make_runtime(tmp_path, FLOWS.format(module=module), engine=engine_name)
    result = runtime.run("spin", Event(name="manual"), cancel=CancelSignal())
    assert result.status is Status.OK and result.output == b'{"ok":true}'
