"""Run one function on hostile input in a child process with a memory cap and a time limit.

Parsing a guest's ONNX bytes amplifies them: protobuf objects cost tens of bytes per byte of input,
and shape inference with data propagation (ONNX's and ONNX Runtime's own, run while a session is
created) can be made to build shape vectors of gigabytes from a graph of a few hundred bytes. No check
made in the host process can be cheaper than that work, so the work happens in a child forked from a
forkserver (a clean, single-threaded process with the model libraries already imported): the child's
address space is capped with RLIMIT_AS, its working directory is an empty directory, and the parent
waits at most until the run's deadline, then kills it. What comes back is a small verdict.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import tempfile
import threading
from typing import Any, Callable

from .abi import NNError, NNFailure, NNHalt

SLACK = 64 * 1024**2  # address space the child may map beyond its budget (library arenas, thread stacks)
_PRELOAD = ["numpy", "onnx", "onnx.shape_inference", "onnxruntime", "wasmflow.wasi_nn.onnx_guard"]
_ctx_lock = threading.Lock()
_ctx: Any = None


class Refusal(Exception):
    """Raised inside the child to refuse the input: `status` "denied" / "oom" / "timeout" / "invalid"."""

    def __init__(self, status: str, message: str, code: NNError = NNError.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _context() -> Any:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            _ctx = ctx
        return _ctx


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], memory: int) -> None:
    """The child: cap the address space, move into an empty directory, run `fn`, send the verdict."""
    try:
        with tempfile.TemporaryDirectory(prefix="wasmflow-nn-inspect-") as empty:
            os.chdir(empty)
            limit = _status_kib("VmSize") * 1024 + memory + SLACK
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # peak RSS counts from here
            except OSError:
                pass
            start = _status_kib("VmRSS")
            try:
                value = fn(*args)
            except Refusal as exc:
                conn.send(("refused", exc.status, int(exc.code), exc.message))
                return
            except MemoryError:
                conn.send(("refused", "oom", int(NNError.TOO_LARGE), "the model needs more memory than the flow's limit to load"))
                return
            except Exception as exc:  # a library's error on a malformed model
                full = str(exc)
                text = full.splitlines()[0] if full else type(exc).__name__
                if any(mark in full for mark in ("bad_alloc", "Failed to allocate", "std::length_error", "Available memory of")):
                    conn.send(("refused", "oom", int(NNError.TOO_LARGE), f"out of memory inspecting the model: {text[:300]}"))
                else:
                    conn.send(("refused", "invalid", int(NNError.INVALID_ARGUMENT), f"the model is not valid: {text[:300]}"))
                return
            grew = max(0, _status_kib("VmHWM") - start) * 1024
            conn.send(("ok", value, grew))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], args: tuple[Any, ...], memory: int, timeout: float) -> tuple[Any, int]:
    """`fn(*args)` in a capped child: its value and the peak memory it needed (bytes).

    Raises NNHalt ("oom" / "timeout") when the child runs out of `memory` (plus SLACK) or past `timeout`
    seconds, NNDenied or NNFailure for a `Refusal` raised in the child (see `refusal_failure`). The
    calling process must be importable without side effects (an `if __name__ == "__main__"` guard), as
    every multiprocessing start method but fork requires.
    """
    ctx = _context()
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(writer, fn, args, int(memory)), daemon=True)
    proc.start()
    writer.close()
    try:
        if not reader.poll(max(0.0, timeout)):
            proc.kill()
            raise NNHalt("timeout", "the run's deadline passed while the guest's model was being checked")
        try:
            verdict = reader.recv()
        except EOFError:
            proc.join(5)
            code = proc.exitcode
            if code is not None and code < 0 and -code in (signal.SIGKILL, signal.SIGABRT, signal.SIGBUS):
                raise NNHalt("oom", f"checking the guest's model needed more than the flow's memory limit (signal {-code})",
                             NNError.TOO_LARGE) from None
            raise NNFailure(NNError.INVALID_ARGUMENT, f"the guest's model crashed the model checker (exit {code})") from None
    finally:
        reader.close()
        proc.join(1)
        if proc.is_alive():
            proc.kill()
            proc.join(1)
    if verdict[0] == "ok":
        return verdict[1], verdict[2]
    _, status, code, message = verdict
    raise refusal_failure(status, NNError(code), message)


def refusal_failure(status: str, code: NNError, message: str) -> NNFailure:
    """The NNFailure the capability raises for a refusal: a halt for oom/timeout, a denial otherwise."""
    from .abi import NNDenied

    if status in ("oom", "timeout"):
        return NNHalt(status, message, code)
    if status == "denied":
        return NNDenied(code, message)
    return NNFailure(code, message)


__all__ = ["Refusal", "run_isolated", "refusal_failure"]
