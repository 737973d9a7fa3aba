"""The event, the run's identity, logs, output and the HTTP response: what every guest needs."""

from __future__ import annotations

import json
import re
import time

from .spec import Call, Capability, Code, HostError, HostFunction, i32s, read_str, write_result

MODULE = "wasmflow"
LEVELS = ("trace", "debug", "info", "warn", "error")
MAX_LOG_LINE = 16 * 1024
MAX_LOG_LINES = 10_000
MAX_OUTPUT = 1024 * 1024
MAX_RESPONSE_BODY = 8 * 1024 * 1024
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class CoreCapability(Capability):
    name = "core"

    def functions(self) -> list[HostFunction]:
        def fn(name: str, nparams: int, body) -> HostFunction:  # type: ignore[no-untyped-def]
            return HostFunction(MODULE, name, i32s(nparams), ("i32",), body)

        return [
            fn("result_read", 3, result_read),
            fn("event_name", 1, lambda c, out: write_result(c, out, c.run.event.name.encode())),
            fn("event_body", 1, lambda c, out: write_result(c, out, c.run.event.body)),
            fn("event_headers", 1, lambda c, out: write_result(c, out, json.dumps(c.run.event.headers).encode())),
            fn("run_info", 1, run_info),
            fn("log", 3, log),
            fn("set_output", 2, set_output),
            fn("set_response_status", 1, set_response_status),
            fn("set_response_header", 4, set_response_header),
            fn("set_response_body", 2, set_response_body),
        ]


def result_read(call: Call, handle: int, buf_ptr: int, buf_len: int) -> int:
    data = call.run._results.get(handle & 0xFFFFFFFF)
    if data is None:
        raise HostError(Code.NOT_FOUND, f"no result handle {handle}")
    if len(data) != (buf_len & 0xFFFFFFFF):
        raise HostError(Code.INVALID, f"result {handle} has {len(data)} bytes, not {buf_len}")
    call.memory.write(buf_ptr, data)  # bounds-checked before the handle is consumed
    call.run.take_result(handle & 0xFFFFFFFF, len(data))
    return Code.OK


def run_info(call: Call, out: int) -> int:
    run = call.run
    info = {
        "flow": run.flow.name,
        "run_id": run.run_id,
        "attempt": run.attempt,
        "max_attempts": run.flow.retry.attempts,
        "idempotency_key": run.event.idempotency_key or run.run_id,
        "trigger": run.event.trigger,
    }
    return write_result(call, out, json.dumps(info).encode())


def log(call: Call, level: int, ptr: int, length: int) -> int:
    if not 0 <= level < len(LEVELS):
        raise HostError(Code.INVALID, f"log level {level} is not 0..4")
    if len(call.run.logs) >= MAX_LOG_LINES:
        raise HostError(Code.LIMIT, f"more than {MAX_LOG_LINES} log lines")
    data = call.memory.read(ptr, min(length & 0xFFFFFFFF, MAX_LOG_LINE)) if (length & 0xFFFFFFFF) > MAX_LOG_LINE \
        else call.memory.read(ptr, length)
    call.run.logs.append((time.time(), LEVELS[level], data.decode("utf-8", errors="replace")))
    return Code.OK


def _read_capped(call: Call, ptr: int, length: int, cap: int, what: str) -> bytes:
    if (length & 0xFFFFFFFF) > cap:
        raise HostError(Code.TOO_LARGE, f"{what} of {length & 0xFFFFFFFF} bytes is over the {cap} byte limit")
    return call.memory.read(ptr, length)


def set_output(call: Call, ptr: int, length: int) -> int:
    call.run.output = _read_capped(call, ptr, length, MAX_OUTPUT, "output")
    return Code.OK


def set_response_status(call: Call, status: int) -> int:
    if not 100 <= status <= 599:
        raise HostError(Code.INVALID, f"HTTP status {status} is not 100..599")
    call.run.response_status = status
    return Code.OK


def set_response_header(call: Call, name_ptr: int, name_len: int, value_ptr: int, value_len: int) -> int:
    name = read_str(call.memory, name_ptr, name_len)
    value = read_str(call.memory, value_ptr, value_len)
    if not _TOKEN.match(name) or "\r" in value or "\n" in value:
        raise HostError(Code.INVALID, f"invalid response header {name!r}")
    call.run.response_headers.append((name, value))
    return Code.OK


def set_response_body(call: Call, ptr: int, length: int) -> int:
    call.run.response_body = _read_capped(call, ptr, length, MAX_RESPONSE_BODY, "response body")
    return Code.OK
