"""Ending the process without tripping over wasmtime's worker threads.

wasmtime-wasi runs a guest's filesystem calls on a tokio thread pool whose idle threads outlive the
run for a few seconds. If the interpreter finalizes while such a thread is alive, the thread aborts the
whole process (SIGABRT, exit 134: "panic in a function that cannot unwind"), turning a successful
command into a crash. Every entry point therefore ends with `exit_now`, which flushes Python's streams
and leaves through `os._exit`, skipping the finalization that triggers the abort. Anything that must
happen at exit (closing databases, flushing logs) is done explicitly before.
"""

from __future__ import annotations

import logging
import os
import sys


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
