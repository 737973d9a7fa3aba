"""What a long-running wasmflow process does to itself: settle its heap once loaded, and end cleanly.

A serving process (`wasmflow up`, `wasmflow worker`) imports and loads far more objects than it creates
per event: SQLAlchemy, aiohttp, wasmtime, the flows and their modules. Python's cyclic collector walks
every tracked object at each full collection, and under a burst of webhooks those come about once a
second: 30-55 ms each with the interpreter lock held, every acknowledgement in flight waiting (the ack
p99 of bench/ingress.py). `freeze_loaded_heap` moves what is loaded by then out of the collector's sight
(`gc.freeze`), and a full collection then walks only what the process made since: about 1 ms.

Ending the process without tripping over wasmtime's worker threads:

wasmtime-wasi runs a guest's filesystem calls on a tokio thread pool whose idle threads outlive the
run for a few seconds. If the interpreter finalizes while such a thread is alive, the thread aborts the
whole process (SIGABRT, exit 134: "panic in a function that cannot unwind"), turning a successful
command into a crash. Every entry point therefore ends with `exit_now`, which flushes Python's streams
and leaves through `os._exit`, skipping the finalization that triggers the abort. Anything that must
happen at exit (closing databases, flushing logs) is done explicitly before.
"""

from __future__ import annotations

import gc
import logging
import os
import sys


# Allocations net of frees between two collections of the youngest generation (Python's default: 700).
# A delivery allocates a few hundred container objects, most freed by the time it is answered: at 700 a
# collection came every few deliveries and moved the ones in flight into older generations, which are
# then walked again (7% of the process's time in bench/ingress.py). 10,000 is a few hundred kilobytes.
YOUNG_OBJECTS = 10_000


def freeze_loaded_heap() -> None:
    """Collect once, then keep everything alive now out of later collections (see the module docstring),
    and collect the youngest generation less often (`YOUNG_OBJECTS`).

    Only for a process that serves until it exits: frozen objects are never collected, so a test process
    that starts and stops platforms in turn must not call this."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_OBJECTS, *gc.get_threshold()[1:])


def exit_now(code: int | str | None = 0) -> None:
    if isinstance(code, str):  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code or 0)
