"""Hostile guests, class 5: the memory cap covers the whole instance, not each memory or table.

A module with four memories used to get four times the flow's `limits.memory`; four tables got four
times `limits.table_elements`; on WasmEdge, which has no table setting at all, one table.grow could
take hundreds of MiB; GC objects live outside linear memory altogether. Each test runs the attack on
both engines and checks the run's status, what the guest got, and the host's peak RSS.
"""

from __future__ import annotations

import struct

import pytest
import wasmtime

from hostile_support import PeakRss, engine_name, planted_secret, run_flow, assert_no_leak  # noqa: F401
from wasmflow.engine import Status
from wasmflow.engine.module_shape import MAX_MEMORIES, ModuleShapeError, inspect


def test_four_memories_are_refused_at_load_and_nothing_is_allocated(engine_name, planted_secret, tmp_path):
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, "engine_four_memories.wat", limits={"memory": "32MiB"})
    assert result.status is Status.INVALID, result.error
    assert "4 linear memories" in result.error and f"at most {MAX_MEMORIES}" in result.error
    assert result.output is None  # the guest never started
    assert_no_leak(result, planted_secret)
    assert rss.grew_mib < 40, f"host grew {rss.grew_mib:.0f} MiB for a module that must not run"


def test_an_imported_memory_counts_too(engine_name, tmp_path):
    wat = """(module (import "env" "memory" (memory 1)) (memory (export "memory") 1)
      (func (export "_start")))"""
    result = run_flow(engine_name, tmp_path, wat)
    assert result.status is Status.INVALID and "2 linear memories" in result.error


def test_one_memory_grown_past_the_cap_is_oom_and_the_host_stays_near_the_cap(engine_name, tmp_path):
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, "engine_grow_to_cap.wat", limits={"memory": "32MiB"})
    assert result.status is Status.OOM, result.error
    assert rss.grew_mib < 32 + 48, f"host grew {rss.grew_mib:.0f} MiB under a 32 MiB cap"


def test_the_table_cap_is_shared_by_all_tables(engine_name, tmp_path):
    result = run_flow(engine_name, tmp_path, "engine_many_tables.wat", limits={"table_elements": 1000})
    assert result.status is Status.OK, result.error
    (total,) = struct.unpack("<I", result.output)
    assert 0 < total <= 1000, f"four tables held {total} elements under a cap of 1000"


def test_one_huge_table_grow_is_refused_without_allocating(engine_name, tmp_path):
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, "engine_table_bomb.wat")
    assert result.status is Status.OK, result.error
    assert struct.unpack("<i", result.output) == (-1,), "table.grow of 16 Mi elements succeeded"
    assert rss.grew_mib < 40, f"host grew {rss.grew_mib:.0f} MiB for a refused table.grow"


def test_a_table_whose_minimum_is_over_the_cap_is_oom_before_it_is_allocated(engine_name, tmp_path):
    wat = '(module (memory (export "memory") 1) (table 5000 funcref) (func (export "_start")))'
    result = run_flow(engine_name, tmp_path, wat, limits={"table_elements": 1000})
    assert result.status is Status.OOM and "table" in result.error and "1000" in result.error


def test_a_memory_minimum_over_the_cap_is_oom_on_both_engines(engine_name, tmp_path):
    wat = '(module (memory (export "memory") 1024) (func (export "_start")))'  # 64 MiB at start
    result = run_flow(engine_name, tmp_path, wat, limits={"memory": "16MiB"})
    assert result.status is Status.OOM and "64 MiB" in result.error and "16 MiB" in result.error


def test_gc_types_are_refused_at_load(engine_name, tmp_path):
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, "engine_gc_arrays.wat", limits={"memory": "16MiB"})
    assert result.status is Status.INVALID and "garbage-collected" in result.error
    assert rss.grew_mib < 40


def test_rust_guests_pass_the_shape_check(guest_wasm):
    for name, path in guest_wasm.items():
        shape = inspect(path.read_bytes())
        assert len(shape.memories) == 1 and len(shape.tables) <= 1, name


def test_the_shape_lists_the_function_imports_wasmtime_sees(guest_wasm):
    # The wasmtime engine links host functions from this list instead of asking wasmtime for it.
    engine = wasmtime.Engine()
    for name, path in guest_wasm.items():
        module = wasmtime.Module(engine, path.read_bytes())
        expected = tuple((i.module, i.name) for i in module.imports if isinstance(i.type, wasmtime.FuncType))
        assert expected and inspect(path.read_bytes()).function_imports == expected, name


@pytest.mark.parametrize("data", [b"\0asm\1\0\0\0\5\x03\x01\x10\x01", b"\0asm\1\0\0\0\5\x80"])
def test_a_malformed_memory_section_is_an_error_not_a_crash(data):
    with pytest.raises(ModuleShapeError):
        inspect(data)
