"""Acknowledgements first: while webhook deliveries are arriving, the claim loop waits to start new runs.

Why: `wasmflow up` acknowledges and runs in one process. Under a burst, every run it starts (claim,
guest, result, transcript) takes CPU and the interpreter from the handlers, so senders waited: 3,000
deliveries from 100 senders were acknowledged at 2,900/s with p99 130 ms when each started a run, and
at 6,900/s with p99 25 ms when none did (measured on the 2-core development machine). A sender has a
deadline (GitHub gives up after 10 s and marks the delivery failed) and a run does not, so runs give
way: the claim loop waits while a delivery is being answered or one arrived within `quiet`, but never
longer than `longest` per claim, so under a flood that does not stop runs still start.
Runs already claimed go on; nothing is dropped or reordered.
"""

from __future__ import annotations

import threading
import time


class AckFirst:
    """Shared by the ingress (`arrived`, `answered`, on the event loop) and the dispatcher's claim and
    finish loops (`wait`). The counters are plain ints (the interpreter lock makes one int's reads and
    writes safe enough for a scheduling hint); a waiter sleeps on an Event the last answer sets, not in
    a polling loop: a thread that wakes every millisecond takes the interpreter from the handlers each
    time."""

    def __init__(self, quiet: float = 0.002, longest: float = 0.2) -> None:
        self.quiet = quiet
        self.longest = longest
        self._answering = 0
        self._last = 0.0
        self._calm = threading.Event()  # set when the last delivery in progress was answered

    def arrived(self) -> None:
        self._answering += 1
        self._last = time.monotonic()

    def answered(self) -> None:
        self._answering -= 1
        if self._answering <= 0:
            self._calm.set()

    def busy(self) -> bool:
        return self._answering > 0 or time.monotonic() - self._last < self.quiet

    def wait(self, stopping: threading.Event) -> bool:
        """Return once no delivery is in progress and none arrived within `quiet` (True), or when
        `longest` has passed or `stopping` is set (False: the caller should do little)."""
        end = time.monotonic() + self.longest
        while not stopping.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._calm.clear()  # before the check: an answer after it sets the event again
            if self._answering > 0:
                self._calm.wait(left)
                continue
            quiet_left = self.quiet - (time.monotonic() - self._last)
            if quiet_left <= 0:
                return True
            stopping.wait(min(quiet_left, left))
        return False
