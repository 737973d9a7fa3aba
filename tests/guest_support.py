"""Guests for tests: the one way to write one from WebAssembly text (`write_wat`), and a plain guest
memory (`Memory`) for calling host function bodies directly."""

from __future__ import annotations

from pathlib import Path

import wasmtime

from wasmflow.host_functions.spec import Code, HostError


def write_wat(path: Path, text: str) -> Path:
    """Compile the WAT `text` to a .wasm at `path` and return `path` (a test's guest in a few lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wasmtime.wat2wasm(text))
    return path


class Memory:
    """A guest memory as a plain bytearray (the GuestMemory protocol), to call host bodies directly."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.buf = bytearray(size)
        self.top = 1024

    def size(self) -> int:
        return len(self.buf)

    def read(self, ptr: int, length: int) -> bytes:
        if ptr + length > len(self.buf):
            raise HostError(Code.BAD_POINTER)
        return bytes(self.buf[ptr:ptr + length])

    def write(self, ptr: int, data: bytes) -> None:
        if ptr + len(data) > len(self.buf):
            raise HostError(Code.BAD_POINTER)
        self.buf[ptr:ptr + len(data)] = data

    def put(self, data: bytes) -> tuple[int, int]:
        ptr = self.top
        self.write(ptr, data)
        self.top += len(data) + 8
        return ptr, len(data)
