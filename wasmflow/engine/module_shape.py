"""What a module asks for before it runs: its memories, its tables, whether it uses GC types.

Why read the binary ourselves: the flow's caps (`limits.memory`, `limits.table_elements`) are for the
whole instance, but both engines apply them per memory or per table (wasmtime's store limits), or
not at all (WasmEdge has no table setting, and allocates GC objects outside linear memory). So at
load a module is refused if it declares more memories or tables than we can cap, or GC types; at run
the caps are split between its tables and checked against its minimums before anything is allocated.
Both engines use this one parser, so they refuse the same modules with the same words.

It also says whether the module is a WASI command (a `_start` function taking and returning nothing), so
both engines refuse a module that is not with the same words, before compiling it.

Only the type, import, function, table, memory and export sections are read; anything malformed there is
a `ModuleShapeError`, which the engines report as an invalid module. A shape is a pure function of the
module's bytes, so it is kept beside the compiled code in the module cache (`to_json`, `from_json`): a
new process's first run then reads it instead of parsing the module again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

WASM_PAGE = 65536
# A module may have one linear memory (Rust and C guests for wasm32-wasi have exactly one); with
# more, the per-memory caps of the engines would multiply the flow's cap.
MAX_MEMORIES = 1
# Tables share `limits.table_elements` evenly; wasm32-wasi guests have at most one.
MAX_TABLES = 8

_SECTION_TYPE, _SECTION_IMPORT, _SECTION_FUNCTION, _SECTION_TABLE, _SECTION_MEMORY, _SECTION_EXPORT = 1, 2, 3, 4, 5, 7
_START = "_start"
# Bumped whenever ModuleShape's fields change: a cached shape of another format is parsed afresh.
_JSON_FORMAT = 1
_FUNC_TYPE = 0x60
_REF_TYPES = (0x63, 0x64)  # (ref null? heaptype): followed by a heap type (s33)


class ModuleShapeError(ValueError):
    """The module's type, import, table or memory section is malformed or uses an unsupported form."""


@dataclass(frozen=True)
class Limits:
    """A memory's (in pages) or table's (in elements) declared size; `max` None when unbounded."""

    min: int
    max: Optional[int]


@dataclass(frozen=True)
class TableEntry:
    """A table the module defines, with where its limits lie in the binary (to rewrite its maximum)."""

    limits: Limits
    ref_type: bytes  # the encoded reference type, copied verbatim when the section is rewritten
    flags: int


@dataclass(frozen=True)
class ModuleShape:
    memories: tuple[Limits, ...]  # imported ones first, as the index space orders them
    tables: tuple[Limits, ...]
    defined_tables: tuple[TableEntry, ...]
    gc_types: bool
    table_section: Optional[tuple[int, int]]  # (start, end) of the whole section, header included
    # (module, name) of each imported function: read here, the engine's own import list costs a new
    # process's first run a third of a millisecond (wasmtime-py builds an object per import and per name)
    function_imports: tuple[tuple[str, str], ...] = ()
    # the `_start` export: None if there is none, True for a function taking and returning nothing (a WASI
    # command's entry point), False for anything else
    start: Optional[bool] = None

    def memory_min_bytes(self) -> int:
        return self.memories[0].min * WASM_PAGE if self.memories else 0

    def refusal(self) -> Optional[str]:
        """Why the module cannot be loaded at all (None: it can)."""
        if len(self.memories) > MAX_MEMORIES:
            return (f"it declares {len(self.memories)} linear memories; wasmflow allows at most {MAX_MEMORIES} "
                    "(the memory cap is for the whole instance: build the guest for wasm32-wasi without multi-memory)")
        if len(self.tables) > MAX_TABLES:
            return f"it declares {len(self.tables)} tables; wasmflow allows at most {MAX_TABLES}"
        if self.gc_types:
            return ("it declares garbage-collected (struct or array) types, whose objects live outside linear "
                    "memory where the flow's memory cap cannot bound them; wasmflow does not run GC guests")
        if self.start is None:
            return "it has no _start export (build it as a WASI command: a bin crate)"
        if not self.start:
            return ("it exports _start, but not as a function without parameters and results (a WASI command's "
                    "entry point): build it as a WASI command, a bin crate")
        return None

    def to_json(self) -> bytes:
        """The shape as the module cache keeps it beside the compiled code."""
        return json.dumps({
            "format": _JSON_FORMAT,
            "memories": [[m.min, m.max] for m in self.memories],
            "tables": [[t.min, t.max] for t in self.tables],
            "defined_tables": [[t.limits.min, t.limits.max, t.ref_type.hex(), t.flags] for t in self.defined_tables],
            "gc_types": self.gc_types,
            "table_section": self.table_section,
            "function_imports": self.function_imports,
            "start": self.start,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Optional[ModuleShape]":
        """The shape `to_json` wrote, or None for anything else (another format, damage): parse afresh."""
        try:
            d: Any = json.loads(data)
            if d["format"] != _JSON_FORMAT:
                return None
            section = d["table_section"]
            return cls(
                memories=tuple(Limits(lo, hi) for lo, hi in d["memories"]),
                tables=tuple(Limits(lo, hi) for lo, hi in d["tables"]),
                defined_tables=tuple(TableEntry(Limits(lo, hi), bytes.fromhex(ref), flags)
                                     for lo, hi, ref, flags in d["defined_tables"]),
                gc_types=bool(d["gc_types"]),
                table_section=(int(section[0]), int(section[1])) if section is not None else None,
                function_imports=tuple((str(m), str(n)) for m, n in d["function_imports"]),
                start=d["start"],
            )
        except (ValueError, TypeError, KeyError, IndexError):
            return None

    def per_table_cap(self, table_elements: int) -> int:
        """Elements each table may hold so that all of them together stay within `table_elements`."""
        return max(0, table_elements // max(1, len(self.tables)))

    def over_caps(self, memory_cap: int, table_elements: int) -> Optional[str]:
        """Why the module's minimums do not fit the flow's caps (None: they do). Checked before
        instantiation, so nothing is allocated for a module that cannot fit."""
        if self.memory_min_bytes() > memory_cap:
            return (f"out of memory: the module's initial memory of {self.memory_min_bytes() // 1024**2} MiB "
                    f"is over the {memory_cap // 1024**2} MiB cap")
        per_table = self.per_table_cap(table_elements)
        for limits in self.tables:
            if limits.min > per_table:
                share = f" ({per_table} for each of its {len(self.tables)} tables)" if len(self.tables) > 1 else ""
                return (f"out of memory: the module's table needs {limits.min} elements at start, over the flow's "
                        f"table_elements limit of {table_elements}{share}")
        return None

    def tables_within(self, per_table: int) -> bool:
        """Whether every table is declared with a maximum no larger than `per_table`."""
        return all(t.max is not None and t.max <= per_table for t in self.tables)


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: Optional[int] = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ModuleShapeError("unexpected end of section")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uleb(self, bits: int = 32) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift >= bits + 7:
                raise ModuleShapeError("integer too long")
        if value >> bits:
            raise ModuleShapeError("integer out of range")
        return value

    def skip(self, count: int) -> None:
        if self.pos + count > self.end:
            raise ModuleShapeError("unexpected end of section")
        self.pos += count

    def name(self) -> str:
        length = self.uleb()
        start = self.pos
        self.skip(length)
        # Names that are not UTF-8 are the engine's to refuse; here they only have to match nothing.
        return self.data[start:self.pos].decode("utf-8", errors="replace")

    def limits(self) -> tuple[Limits, int]:
        flags = self.byte()
        if flags & ~0x0F:
            raise ModuleShapeError(f"unknown limits flags {flags:#x}")
        bits = 64 if flags & 0x04 else 32
        minimum = self.uleb(bits)
        maximum = self.uleb(bits) if flags & 0x01 else None
        if flags & 0x08:  # custom page size: log2 of the page size follows
            self.uleb()
        return Limits(minimum, maximum), flags

    def heap_type(self) -> None:
        self.uleb(33)  # an s33: abstract heap types are negative one-byte values, type indices positive

    def value_type(self) -> None:
        code = self.byte()
        if code in _REF_TYPES:
            self.heap_type()

    def ref_type(self) -> bytes:
        start = self.pos
        self.value_type()
        return bytes(self.data[start:self.pos])


def _sections(wasm: bytes) -> list[tuple[int, int, int, int]]:
    """(id, header start, payload start, end) of every section."""
    if wasm[:4] != b"\0asm" or len(wasm) < 8:
        raise ModuleShapeError("not a WebAssembly module")
    out = []
    reader = _Reader(wasm, 8)
    while reader.pos < len(wasm):
        start = reader.pos
        section = reader.byte()
        size = reader.uleb()
        if reader.pos + size > len(wasm):
            raise ModuleShapeError(f"section {section} runs past the end of the module")
        out.append((section, start, reader.pos, reader.pos + size))
        reader.pos += size
    return out


def inspect(wasm: bytes) -> ModuleShape:
    """The module's memories, tables, GC use and entry point, from its binary; ModuleShapeError if malformed."""
    memories: list[Limits] = []
    tables: list[Limits] = []
    defined: list[TableEntry] = []
    gc_types = False
    table_section = None
    function_imports: list[tuple[str, str]] = []
    types: list[bool] = []  # per function type: whether it takes and returns nothing
    imported_types: list[int] = []  # the type index of each imported function
    functions: Optional[_Reader] = None  # the function section, read only as far as `_start` needs
    start_export: Optional[tuple[int, int]] = None  # (kind, index) of the `_start` export
    for section, start, payload, end in _sections(wasm):
        reader = _Reader(wasm, payload, end)
        if section == _SECTION_TYPE:
            for _ in range(reader.uleb()):
                form = reader.byte()
                if form != _FUNC_TYPE:  # rec groups, sub types, struct and array types
                    gc_types = True
                    break
                counts = []
                for _ in range(2):  # parameters, then results
                    counts.append(reader.uleb())
                    for _ in range(counts[-1]):
                        reader.value_type()
                types.append(counts == [0, 0])
        elif section == _SECTION_IMPORT:
            for _ in range(reader.uleb()):
                module, name = reader.name(), reader.name()
                kind = reader.byte()
                if kind == 0x00:  # function: type index
                    imported_types.append(reader.uleb())
                    function_imports.append((module, name))
                elif kind == 0x01:  # table
                    reader.ref_type()
                    tables.append(reader.limits()[0])
                elif kind == 0x02:  # memory
                    memories.append(reader.limits()[0])
                elif kind == 0x03:  # global: value type, mutability
                    reader.value_type()
                    reader.byte()
                elif kind == 0x04:  # tag: attribute, type index
                    reader.byte()
                    reader.uleb()
                else:
                    raise ModuleShapeError(f"unknown import kind {kind:#x}")
        elif section == _SECTION_FUNCTION:
            functions = reader
        elif section == _SECTION_TABLE:
            table_section = (start, end)
            for _ in range(reader.uleb()):
                if wasm[reader.pos:reader.pos + 1] == b"\x40":  # a table with an initializer expression
                    raise ModuleShapeError("tables with initializer expressions are not supported")
                ref_type = reader.ref_type()
                limits, flags = reader.limits()
                tables.append(limits)
                defined.append(TableEntry(limits, ref_type, flags))
        elif section == _SECTION_MEMORY:
            for _ in range(reader.uleb()):
                memories.append(reader.limits()[0])
        elif section == _SECTION_EXPORT:
            for _ in range(reader.uleb()):
                name = reader.name()
                kind, index = reader.byte(), reader.uleb()
                if name == _START:
                    start_export = (kind, index)
                    break
    # A GC module's types were not all read; it is refused for its GC types whatever its _start.
    start = False if gc_types else _is_command_start(start_export, types, imported_types, functions)
    return ModuleShape(tuple(memories), tuple(tables), tuple(defined), gc_types, table_section, tuple(function_imports),
                       start)


def _is_command_start(export: Optional[tuple[int, int]], types: list[bool], imported_types: list[int],
                      functions: "Optional[_Reader]") -> Optional[bool]:
    """ModuleShape.start: whether the `_start` export is a function of type [] -> [] (None: no export)."""
    if export is None:
        return None
    kind, index = export
    if kind != 0x00:  # a memory, table, global or tag named _start
        return False
    if index < len(imported_types):
        type_index = imported_types[index]
    else:
        if functions is None:
            raise ModuleShapeError("_start names a function the module does not have")
        count = functions.uleb()
        if index - len(imported_types) >= count:
            raise ModuleShapeError("_start names a function the module does not have")
        for _ in range(index - len(imported_types)):
            functions.uleb()
        type_index = functions.uleb()
    if type_index >= len(types):
        raise ModuleShapeError("_start has a type the module does not declare")
    return types[type_index]


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def cap_tables(wasm: bytes, shape: ModuleShape, per_table: int) -> bytes:
    """The module with every table it defines declared with a maximum of at most `per_table`.

    For an engine with no table limit of its own (WasmEdge): table.grow past a declared maximum fails
    inside the engine (it returns -1, as the standard says), so the cap holds however the guest grows.
    The module's tables must fit (`over_caps` is None): a minimum above `per_table` is not rewritten.
    """
    if shape.table_section is None or shape.tables_within(per_table):
        return wasm
    body = bytearray(_uleb(len(shape.defined_tables)))
    for table in shape.defined_tables:
        if table.flags & ~0x05:  # only 32/64-bit indices and a maximum are known to carry nothing else
            raise ModuleShapeError(f"cannot cap a table with limits flags {table.flags:#x}")
        maximum = per_table if table.limits.max is None else min(table.limits.max, per_table)
        maximum = max(maximum, table.limits.min)
        body += table.ref_type + bytes([table.flags | 0x01]) + _uleb(table.limits.min) + _uleb(maximum)
    start, end = shape.table_section
    return wasm[:start] + bytes([_SECTION_TABLE]) + _uleb(len(body)) + bytes(body) + wasm[end:]
