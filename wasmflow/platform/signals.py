"""SIGTERM and SIGINT for the serving commands, caught from the moment the process starts.

`wasmflow up` and `wasmflow worker` install the handlers before they load anything, so a signal that
arrives while modules load, or just after the first claim, is a graceful stop and never the default
action (which would end the process with runs leased, to come back only when the leases expire). On the
signal the dispatcher is drained at once (nothing more is claimed or started, runs claimed but not started
go back to the queue), then the command stops the rest in order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any, Callable

log = logging.getLogger("wasmflow.platform")


class StopSignal:
    """Set by the first SIGTERM or SIGINT; runs the callbacks given to `on_stop` on a thread of its own.

    The handler itself only sets a flag and starts that thread: it runs on the main thread between two
    bytecodes, where taking a lock or waiting on the database could deadlock or stall the event loop.
    Callbacks must be idempotent: one registered as the signal arrives may be called twice.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], Any]] = []

    def install(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self._event.is_set():
            return
        self._event.set()
        log.info("%s received: stopping", signal.Signals(signum).name)
        threading.Thread(target=self._run_callbacks, name="wasmflow-stop", daemon=True).start()

    def _run_callbacks(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            self._call(callback)

    @staticmethod
    def _call(callback: Callable[[], Any]) -> None:
        try:
            callback()
        except Exception:  # one failing step must not keep the others from stopping
            log.exception("stopping: %r failed", callback)

    def on_stop(self, callback: Callable[[], Any]) -> None:
        """Call `callback` when the signal comes (at once, here, if it already came)."""
        with self._lock:
            self._callbacks.append(callback)
        if self._event.is_set():
            self._call(callback)

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        """Block the calling (main) thread until the signal; wakes every second so handlers run."""
        while not self._event.wait(1.0):
            pass


def watch_platform(stopping: StopSignal, platform: Any) -> None:
    """On the signal, drain the platform's dispatcher at once, before anything else is shut down."""
    if platform.dispatcher is not None:
        stopping.on_stop(platform.dispatcher.drain)


async def serve_until_stopped(stopping: StopSignal, platform: Any, host: str, port: int, **kw: Any) -> None:
    """`serve` (wasmflow.platform.app) with its stop tied to `stopping` instead of handlers of its own."""
    from wasmflow.platform.app import serve

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop already ended
            pass

    stopping.on_stop(wake)
    await serve(platform, host, port, stop=stop, **kw)
