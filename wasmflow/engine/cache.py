"""On-disk cache of compiled modules.

Entries are keyed by the module's SHA-256 inside a directory named for the engine and its version, so a
changed module or engine is recompiled. Each entry carries a CRC-32 of its own bytes and is checked
before use: a corrupt or truncated entry is recompiled, never handed to the engine (deserializing
damaged machine code is how a cache becomes a crash).

Beside the compiled code an entry keeps the engine's facts about the module (its shape, from
module_shape): they are a pure function of the module's bytes, and reading them back costs a new
process's first run less than working them out again.

Why a CRC and not a cryptographic digest: the check is against accidents (a torn write, a bad disk
block), and it is paid by every new process's first run: SHA-256 of hello's 350 KB entry took 0.37 ms
here, CRC-32 0.12 ms. Against someone who can write the state directory no digest stored beside the
entry helps, SHA-256 or CRC alike: they write a matching one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

# An entry: this layout's tag, the CRC-32 of everything after it, the length of the facts, the facts, the
# compiled code. An entry of another layout (no tag) is compiled afresh.
_LAYOUT = b"wfc2"
_CHECK = len(_LAYOUT) + 4
_HEAD = _CHECK + 4


@dataclass(frozen=True)
class CacheEntry:
    code: memoryview  # what the engine compiled: a writable view, so an engine can load it without a copy
    facts: bytes  # what the engine keeps about the module beside it (b"": nothing)


class ModuleCache:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def entry(self, wasm: bytes, digest: Optional[str] = None) -> Path:
        """The entry of `wasm`; `digest` is its SHA-256 in hex when the caller has it already."""
        return self.directory / ((digest or module_sha256(wasm)) + ".bin")

    def get(self, digest: str) -> Optional[CacheEntry]:
        """The entry of the module with this SHA-256, or None: absent, damaged, or in an older layout."""
        try:
            with open(self.directory / (digest + ".bin"), "rb") as entry:
                blob = bytearray(os.fstat(entry.fileno()).st_size)
                if entry.readinto(blob) != len(blob):  # shortened while being read
                    return None
        except OSError:
            return None
        if (len(blob) <= _HEAD or blob[:len(_LAYOUT)] != _LAYOUT
                or zlib.crc32(memoryview(blob)[_CHECK:]) != int.from_bytes(blob[len(_LAYOUT):_CHECK], "big")):
            return None
        end = _HEAD + int.from_bytes(blob[_CHECK:_HEAD], "big")
        if end >= len(blob):
            return None
        return CacheEntry(memoryview(blob)[end:], bytes(blob[_HEAD:end]))

    def put(self, digest: str, code: bytes, facts: bytes = b"") -> None:
        """Store `code` (and `facts`) as the compiled form of the module with this SHA-256."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = len(facts).to_bytes(_HEAD - _CHECK, "big") + facts + code
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(fd, "wb") as out:
            out.write(_LAYOUT + zlib.crc32(payload).to_bytes(_CHECK - len(_LAYOUT), "big") + payload)
        os.replace(tmp, self.directory / (digest + ".bin"))  # atomic: a reader sees the old entry or the new

    def get_or_compile(self, wasm: bytes, compile_: Callable[[], bytes],
                       digest: Optional[str] = None) -> tuple[bytes, bool]:
        """(compiled code, whether it came from the cache), for an engine that keeps no facts."""
        digest = digest or module_sha256(wasm)
        cached = self.get(digest)
        if cached is not None:
            return bytes(cached.code), True
        code = compile_()
        self.put(digest, code)
        return code, False


def module_sha256(wasm: bytes) -> str:
    """A module's SHA-256 in hex: its cache key, and what a transcript records of the build it ran."""
    return hashlib.sha256(wasm).hexdigest()
