"""What both engines share about a run's outcome: capped output capture and status classification."""

from __future__ import annotations

from typing import Optional

from wasmflow.host_functions.spec import RunContext

from .base import RunResult, Status

# A trap with memory this close to the cap means `memory.grow` failed and the guest's allocator gave up.
OOM_MARGIN = 16 * 1024 * 1024
_ALLOC_FAILURE = b"memory allocation of"


class CappedBuffer:
    """Collects a guest's stdout or stderr up to a cap; writes past it are accepted and dropped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.dropped = 0

    def write(self, chunk: bytes) -> int:
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))
        return len(chunk)

    def value(self, run: Optional[RunContext] = None, kind: str = "") -> bytes:
        """The bytes kept, with a marker saying how many were dropped; counted in `run.truncated[kind]`."""
        if self.dropped and run is not None:
            run.truncated[kind] = self.dropped
        if self.dropped:
            return bytes(self.data) + f"\n[wasmflow: {self.dropped} more bytes dropped]\n".encode()
        return bytes(self.data)


def classify_failure(result: RunResult, memory_bytes: int, memory_cap: int) -> None:
    """Refine a failed run's status: a trap at the memory cap is `oom`; a failure after a refusal is `denied`."""
    if result.status is Status.TRAP and (
        memory_bytes >= memory_cap - OOM_MARGIN or _ALLOC_FAILURE in result.stderr
    ):
        result.status = Status.OOM
        result.error = f"out of memory: linear memory reached {memory_bytes // 1024**2} MiB of the {memory_cap // 1024**2} MiB cap"
    elif result.status in (Status.TRAP, Status.ERROR) and result.denials:
        result.status = Status.DENIED
        result.error = f"{result.error}; refused: {result.denials[0]}"
