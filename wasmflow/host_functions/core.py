"""The event, the run's identity, logs, output and the HTTP response: what every guest needs.

Everything a guest pushes out is capped per run by the flow's `limits:` (log lines and bytes, output,
response headers and body): past a cap the call answers LIMIT or TOO_LARGE without copying the guest's
bytes, and what was cut is marked (a final log line) and counted in `RunContext.truncated` for metrics.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from .spec import (Call, Capability, Code, HostError, HostFunction, RunContext, check_range, read_str,
                   write_result)

MODULE = "wasmflow"
LEVELS = ("trace", "debug", "info", "warn", "error")
MAX_LOG_LINE = 16 * 1024  # longer lines are cut to this, with a marker
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HTAB (RFC 9110 field values)


@dataclass
class _Spent:
    """How much of the run's output caps a guest has used, and how much it has had dropped."""

    log_lines: int = 0
    log_bytes: int = 0
    dropped_lines: int = 0
    dropped_bytes: int = 0
    header_bytes: int = 0


def _spent(run: RunContext) -> _Spent:
    return run.state.setdefault("core", _Spent())


def _cut(run: RunContext, kind: str) -> None:
    run.truncated[kind] = run.truncated.get(kind, 0) + 1


class CoreCapability(Capability):
    name = "core"

    def functions(self) -> list[HostFunction]:
        def fn(name: str, params: "str | int", body) -> HostFunction:  # type: ignore[no-untyped-def]
            """params: the kinds ("u32 ptr len"), or a count of u32 parameters."""
            return HostFunction(MODULE, name, ("u32",) * params if isinstance(params, int) else params, ("i32",), body)

        return [
            fn("result_read", "u32 ptr len", result_read),
            fn("last_error", "ptr", last_error),
            fn("event_name", "ptr", lambda c, out: write_result(c, out, c.run.event.name.encode())),
            fn("event_body", "ptr", lambda c, out: write_result(c, out, c.run.event.body)),
            fn("event_headers", "ptr", lambda c, out: write_result(c, out, json.dumps(c.run.event.headers).encode())),
            fn("run_info", "ptr", run_info),
            fn("log", "i32 ptr len", log),
            fn("set_output", "ptr len", set_output),
            fn("set_response_status", "i32", set_response_status),
            fn("set_response_header", "ptr len ptr len", set_response_header),
            fn("set_response_body", "ptr len", set_response_body),
        ]

    def close_run(self, run: RunContext) -> None:
        """Say in the log what the log caps dropped, so a reader knows the log is not the whole story."""
        spent = run.state.get("core")
        if spent is not None and spent.dropped_lines:
            run.logs.append((time.time(), "warn", f"[wasmflow: {spent.dropped_lines} log lines / "
                                                   f"{spent.dropped_bytes} bytes dropped]"))


def result_read(call: Call, handle: int, buf_ptr: int, buf_len: int) -> int:
    data = call.run._results.get(handle)
    if data is None:
        raise HostError(Code.NOT_FOUND, f"no result handle {handle}")
    if len(data) != buf_len:
        raise HostError(Code.INVALID, f"result {handle} has {len(data)} bytes, not {buf_len}")
    call.memory.write(buf_ptr, data)  # bounds-checked before the handle is consumed
    call.run.take_result(handle, len(data))
    return Code.OK


def last_error(call: Call, out: int) -> int:
    """Why the run's most recent failed host call failed (`module::name: message`, at most 4 KiB).

    NOT_FOUND, returned rather than raised, when no call has failed: reading the message is not itself a
    failure, so it never replaces the message it reads.
    """
    if call.run.last_error is None:
        return Code.NOT_FOUND
    return write_result(call, out, call.run.last_error)


def run_info(call: Call, out: int) -> int:
    run = call.run
    info = {
        "flow": run.flow.name,
        "run_id": run.run_id,
        "attempt": run.attempt,
        "execution": run.execution,
        "max_attempts": run.flow.retry.attempts,
        "idempotency_key": run.event.idempotency_key or run.run_id,
        "trigger": run.event.trigger,
    }
    return write_result(call, out, json.dumps(info).encode())


def log(call: Call, level: int, ptr: int, length: int) -> int:
    """One log line: cut past MAX_LOG_LINE; dropped (LIMIT) once the run's log_lines or log_bytes are spent."""
    if not 0 <= level < len(LEVELS):
        raise HostError(Code.INVALID, f"log level {level} is not 0..4")
    run = call.run
    limits, spent = run.flow.limits, _spent(run)
    if spent.log_lines < limits.log_lines and spent.log_bytes < limits.log_bytes:
        message = call.memory.read(ptr, min(length, MAX_LOG_LINE)).decode("utf-8", errors="replace")
        if length > MAX_LOG_LINE:
            message += f" [wasmflow: {length - MAX_LOG_LINE} bytes cut]"
            _cut(run, "logs")
        size = len(message.encode("utf-8"))
        if spent.log_bytes + size <= limits.log_bytes:
            spent.log_lines += 1
            spent.log_bytes += size
            run.logs.append((time.time(), LEVELS[level], message))
            return Code.OK
        spent.log_bytes = limits.log_bytes  # a line that does not fit ends the run's logging
    spent.dropped_lines += 1
    spent.dropped_bytes += length
    _cut(run, "logs")
    raise HostError(Code.LIMIT, f"log limit reached ({limits.log_lines} lines or {limits.log_bytes} bytes per "
                                "run: limits.log_lines, limits.log_bytes)")


def _read_capped(call: Call, ptr: int, length: int, cap: int, what: str, kind: str) -> bytes:
    if length > cap:
        _cut(call.run, kind)
        raise HostError(Code.TOO_LARGE, f"{what} of {length} bytes is over the {cap} byte limit "
                                        f"(limits.{kind})")
    return call.memory.read(ptr, length)


def set_output(call: Call, ptr: int, length: int) -> int:
    call.run.output = _read_capped(call, ptr, length, call.run.flow.limits.output, "output", "output")
    return Code.OK


def set_response_status(call: Call, status: int) -> int:
    if not 200 <= status <= 599:  # 1xx is not a final status: it would break the connection's framing
        raise HostError(Code.INVALID, f"HTTP status {status} is not 200..599")
    call.run.response_status = status
    return Code.OK


def set_response_header(call: Call, name_ptr: int, name_len: int, value_ptr: int, value_len: int) -> int:
    """Append a header; the count and total bytes are checked before the guest's bytes are read."""
    run = call.run
    limits, spent = run.flow.limits, _spent(run)
    check_range(call.memory.size(), name_ptr, name_len)  # a bad pointer is BAD_POINTER whatever the sizes
    check_range(call.memory.size(), value_ptr, value_len)
    if len(run.response_headers) >= limits.response_headers:
        _cut(run, "response_headers")
        raise HostError(Code.LIMIT, f"more than {limits.response_headers} response headers (limits.response_headers)")
    size = name_len + value_len
    if spent.header_bytes + size > limits.response_header_bytes:
        _cut(run, "response_headers")
        raise HostError(Code.TOO_LARGE, f"response headers over {limits.response_header_bytes} bytes "
                                        "(limits.response_header_bytes)")
    name = read_str(call.memory, name_ptr, name_len)
    value = read_str(call.memory, value_ptr, value_len)
    if not _TOKEN.match(name) or _BAD_VALUE.search(value):
        raise HostError(Code.INVALID, f"invalid response header {name[:80]!r}: names are tokens, values have no "
                                      "control characters")
    spent.header_bytes += size
    run.response_headers.append((name, value))
    return Code.OK


def set_response_body(call: Call, ptr: int, length: int) -> int:
    call.run.response_body = _read_capped(call, ptr, length, call.run.flow.limits.response_body, "response body",
                                          "response_body")
    return Code.OK
