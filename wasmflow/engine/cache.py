"""On-disk cache of compiled modules.

Entries are keyed by the module's SHA-256 inside a directory named for the engine and its version, so a
changed module or engine is recompiled. Each entry carries a digest of its own bytes and is checked
before use: a corrupt or truncated entry is recompiled, never handed to the engine (deserializing
untrusted machine code is how a cache becomes a crash).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

_DIGEST = 32


class ModuleCache:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def entry(self, wasm: bytes, digest: Optional[str] = None) -> Path:
        """The entry of `wasm`; `digest` is its SHA-256 in hex when the caller has it already."""
        return self.directory / ((digest or module_sha256(wasm)) + ".bin")

    def get_or_compile(self, wasm: bytes, compile_: Callable[[], bytes],
                       digest: Optional[str] = None) -> tuple[bytes, bool]:
        """(compiled bytes, whether they came from the cache)."""
        path = self.entry(wasm, digest)
        try:
            blob = path.read_bytes()
            body_digest, body = blob[:_DIGEST], blob[_DIGEST:]
            if len(blob) > _DIGEST and hashlib.sha256(body).digest() == body_digest:
                return body, True
        except OSError:
            pass
        return self.replace(wasm, compile_(), digest), False

    def replace(self, wasm: bytes, body: bytes, digest: Optional[str] = None) -> bytes:
        """Store `body` as the compiled form of `wasm` (over an entry the engine could not use)."""
        path = self.entry(wasm, digest)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(fd, "wb") as out:
            out.write(hashlib.sha256(body).digest() + body)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old entry or the new, never half
        return body


def module_sha256(wasm: bytes) -> str:
    """A module's SHA-256 in hex: its cache key, and what a transcript records of the build it ran."""
    return hashlib.sha256(wasm).hexdigest()
