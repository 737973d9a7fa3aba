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
from wasmflow.engine.module_shape import MAX_MEMORIES, ModuleShape, ModuleShapeError, inspect


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


def test_the_shape_says_whether_start_is_a_command_entry_point_as_wasmtime_does(guest_wasm):
    engine = wasmtime.Engine()
    for name, path in guest_wasm.items():
        start = next(e.type for e in wasmtime.Module(engine, path.read_bytes()).exports if e.name == "_start")
        assert isinstance(start, wasmtime.FuncType) and not start.params and not start.results, name
        assert inspect(path.read_bytes()).start is True, name


@pytest.mark.parametrize("wat,start", [
    ('(module (func (export "f")))', None),
    ('(module (memory (export "_start") 1))', False),
    ('(module (func) (func (param i32)) (export "_start" (func 1)))', False),
    ('(module (func (param i32)) (func) (export "_start" (func 1)))', True),
    ('(module (type (func)) (type (func (result i32))) (import "m" "a" (func (type 1))) (import "m" "b" (func (type 0)))'
     ' (export "_start" (func 1)))', True),
    ('(module (import "m" "a" (func (param i64))) (export "_start" (func 0)))', False),
])
def test_the_shape_finds_start_among_imported_and_defined_functions(wat, start):
    assert inspect(wasmtime.wat2wasm(wat)).start is start


@pytest.mark.parametrize("data", [
    # _start names function 5 of a module with one
    b"\0asm\1\0\0\0" b"\1\4\1\x60\0\0" b"\3\2\1\0" b"\7\x0a\1\6_start\0\5",
    # _start's function has type 3 of one
    b"\0asm\1\0\0\0" b"\1\4\1\x60\0\0" b"\3\2\1\3" b"\7\x0a\1\6_start\0\0",
    # no function section at all
    b"\0asm\1\0\0\0" b"\1\4\1\x60\0\0" b"\7\x0a\1\6_start\0\0",
])
def test_a_start_naming_what_the_module_lacks_is_an_error_not_a_crash(data):
    with pytest.raises(ModuleShapeError):
        inspect(data)


def test_a_shape_survives_the_cache_and_nothing_else_passes_for_one(guest_wasm):
    for name, path in guest_wasm.items():
        shape = inspect(path.read_bytes())
        assert ModuleShape.from_json(shape.to_json()) == shape, name
    tables = inspect(wasmtime.wat2wasm('(module (table 2 10 funcref) (table 1 externref) (func (export "_start")))'))
    assert len(tables.defined_tables) == 2 and ModuleShape.from_json(tables.to_json()) == tables
    for junk in (b"", b"\xff\xfe", b"[]", b"null", b'{"format": 1}', tables.to_json().replace(b'"format":1', b'"format":0'),
                 tables.to_json().replace(b'"memories":[]', b'"memories":[1]')):
        assert ModuleShape.from_json(junk) is None, junk


@pytest.mark.parametrize("data", [b"\0asm\1\0\0\0\5\x03\x01\x10\x01", b"\0asm\1\0\0\0\5\x80"])
def test_a_malformed_memory_section_is_an_error_not_a_crash(data):
    with pytest.raises(ModuleShapeError):
        inspect(data)
