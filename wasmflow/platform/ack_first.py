"""Acknowledgements first: while webhook deliveries are arriving, the claim loop waits to start new runs.

Why: `wasmflow up` acknowledges and runs in one process. Under a burst, every run it starts (claim,
guest, result, transcript) takes CPU and the interpreter from the handlers, so senders waited: 3,000
deliveries from 100 senders were acknowledged at 2,900/s with p99 130 ms when each started a run, and
at 6,900/s with p99 25 ms when none did (measured on the 2-core development machine). A sender has a
deadline (GitHub gives up after 10 s and marks the delivery failed) and a run does not, so runs give
way: the claim loop waits while a delivery is being answered or one arrived within `quiet`, but never
longer than `longest` per claim, so under a flood that does not stop runs still start.
Runs already claimed go on; nothing is dropped or reordered.

The same holds between processes of one machine: `wasmflow worker` processes beside an
`up --workers 0` took as much CPU for their runs (and their PostgreSQL connections' work) as the
ingress took for the deliveries, even at the lowest CPU priority. The ingress publishes the time of
its latest delivery in a small memory-mapped file of the state directory (`ActivityFile`), and a
process without ingress reads it in `wait`. Workers on other machines have their own state directory,
find no such file, and never wait.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time
from pathlib import Path
from typing import Optional

# The latest arrival or answer, in seconds on CLOCK_MONOTONIC (time.monotonic: the same clock for every
# process of a boot), and how many deliveries were being answered then.
_SLOT = struct.Struct("dd")
log = logging.getLogger("wasmflow.platform")
# A neighbour whose deliveries in progress have not changed for this long is taken to be idle: it died
# while answering, or one stuck handler must not hold the workers back.
STALE = 1.0
# How often a process without ingress looks at a busy neighbour again. Each look wakes a thread; every
# 2 ms (`quiet`) the two workers' waiting threads took more CPU than the runs they put off.
NEIGHBOUR_POLL = 0.02


class ActivityFile:
    """What a machine's ingress is doing, in `path`: the time of its latest arrival or answer and the
    deliveries in progress, written at each (a store into shared memory, no system call), read by its
    neighbours.

    A torn or stale value is harmless: it is a scheduling hint. A value from before a reboot lies in the
    future of the new boot's clock and is read as no activity."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._map: Optional[mmap.mmap] = None  # the writer's: a store into it is no system call
        self._fd: Optional[int] = None  # a reader's: read with pread, so that a file cut short is no SIGBUS
        self._next_look = 0.0  # a reader looks for a missing file again at most once a second

    def open_for_writing(self) -> None:
        """Map the file (made if missing, grown if short, never cut: a reader of it stays valid)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _SLOT.size:
                os.ftruncate(fd, _SLOT.size)
            self._map = mmap.mmap(fd, _SLOT.size)
        finally:
            os.close(fd)
        self.publish(0.0, 0)

    def publish(self, now: float, answering: int) -> None:
        if self._map is not None:
            _SLOT.pack_into(self._map, 0, now, answering)

    def idle_for(self, now: float) -> Optional[float]:
        """Seconds since the neighbour's latest delivery was answered (0 while some are in progress), or
        None when there is no neighbour (no file, a time this boot's clock has not reached, or deliveries
        in progress unchanged for `STALE`)."""
        if self._fd is None:
            if now < self._next_look:
                return None
            self._next_look = now + 1.0
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                return None
        try:
            data = os.pread(self._fd, _SLOT.size, 0)
        except OSError:
            return None
        if len(data) < _SLOT.size:  # not written yet, or cut short
            return None
        last, answering = _SLOT.unpack(data)
        idle = now - last
        if idle < 0 or (answering > 0 and idle >= STALE):
            return None
        return 0.0 if answering > 0 else idle

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AckFirst:
    """Shared by the ingress (`arrived`, `answered`, on the event loop) and the dispatcher's claim and
    finish loops (`wait`). The counters are plain ints (the interpreter lock makes one int's reads and
    writes safe enough for a scheduling hint); a waiter sleeps on an Event the last answer sets, not in
    a polling loop: a thread that wakes every millisecond takes the interpreter from the handlers each
    time. Waiting for a neighbour's deliveries (`neighbour`, read while this process serves none) does
    poll, every `NEIGHBOUR_POLL`: that interpreter is not the one answering them."""

    def __init__(self, quiet: float = 0.002, longest: float = 0.2,
                 neighbour: Optional[ActivityFile] = None) -> None:
        self.quiet = quiet
        self.longest = longest
        self.neighbour = neighbour
        self._publishing = False  # this process serves the deliveries: the file is its own
        self._answering = 0
        self._last = 0.0
        self._calm = threading.Event()  # set when the last delivery in progress was answered

    def serve_ingress(self) -> None:
        """This process answers deliveries: publish them to the neighbours (when there is a file)."""
        if self.neighbour is not None and not self._publishing:
            try:
                self.neighbour.open_for_writing()
            except OSError as exc:  # the workers of this machine will not wait: nothing else changes
                log.warning("cannot publish webhook activity to %s (%s); `wasmflow worker` processes on this "
                            "machine will not give way to the acknowledgements", self.neighbour.path, exc)
                return
            self._publishing = True

    def arrived(self) -> None:
        self._answering += 1
        self._last = now = time.monotonic()
        if self._publishing:
            self.neighbour.publish(now, self._answering)  # type: ignore[union-attr]

    def answered(self) -> None:
        self._answering -= 1
        if self._publishing:
            self.neighbour.publish(time.monotonic(), self._answering)  # type: ignore[union-attr]
        if self._answering <= 0:
            self._calm.set()

    def busy(self) -> bool:
        return self._answering > 0 or time.monotonic() - self._last < self.quiet

    def wait(self, stopping: threading.Event) -> bool:
        """Return once no delivery is in progress and none arrived within `quiet`, here or at the
        neighbour (True), or when `longest` has passed or `stopping` is set (False: the caller should do
        little)."""
        end = time.monotonic() + self.longest
        while not stopping.is_set():
            now = time.monotonic()
            left = end - now
            if left <= 0:
                return False
            self._calm.clear()  # before the check: an answer after it sets the event again
            if self._answering > 0:
                self._calm.wait(left)
                continue
            quiet_left = self.quiet - (now - self._last)
            if quiet_left <= 0 and self.neighbour is not None and not self._publishing:
                idle = self.neighbour.idle_for(now)
                if idle is not None and idle < self.quiet:
                    stopping.wait(min(NEIGHBOUR_POLL, left))
                    continue
            if quiet_left <= 0:
                return True
            stopping.wait(min(quiet_left, left))
        return False

    def close(self) -> None:
        if self.neighbour is not None:
            self.neighbour.close()
