"""Hostile outbound HTTP: a slow server must not hold a run past its deadline (class 6), and malformed
request arguments are the guest's error, INVALID, never a host fault (class 13).

Real servers on 127.0.0.1: an aiohttp app that drips its body a byte a second forever (directly and
behind a redirect), and a raw socket server that drips its status line and headers the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, Iterator

import pytest
from aiohttp import web

from hostile_support import engine_name, planted_secret, assert_no_leak, run_flow  # noqa: F401
from wasmflow.engine import Status
from wasmflow.host_functions.http import parse_request
from wasmflow.host_functions.spec import Code, HostError

BIG = 9 * 1024 * 1024


async def _drip(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    try:
        while True:  # a byte a second, forever: until the client goes away
            await response.write(b"x")
            await asyncio.sleep(1)
    except ConnectionError:  # the client hung up (its deadline): the end this handler waits for, not an error
        return response


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/drip")


async def _away(request: web.Request) -> web.Response:
    raise web.HTTPFound(f"http://localhost:{request.url.port}/ok")  # same server, another origin


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=b"b" * BIG)


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text=f"hello {request.headers.get('X-Probe', '')}")


async def _slow_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 10_000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1)
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """{"app": base URL of the aiohttp app, "raw": base URL of the slow-header server}, on loopback."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    found: dict[str, Any] = {}

    async def start() -> None:
        app = web.Application()
        app.add_routes([web.get("/drip", _drip), web.get("/redirect", _redirect), web.get("/away", _away),
                        web.get("/big", _big),
                        web.get("/ok", _ok)])
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        raw = await asyncio.start_server(_slow_headers, "127.0.0.1", 0)
        found.update(runner=runner, raw=raw, app_port=runner.addresses[0][1],
                     raw_port=raw.sockets[0].getsockname()[1])
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield {"app": f"http://127.0.0.1:{found['app_port']}", "raw": f"http://127.0.0.1:{found['raw_port']}"}

    async def stop() -> None:
        found["raw"].close()
        await found["runner"].cleanup()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:  # the drips still going
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


def _wat_bytes(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def http_guest(request: dict[str, Any] | str) -> str:
    """WAT: one `http_request` with `request` (JSON), then the code it returned as one ASCII digit of output."""
    req = (request if isinstance(request, str) else json.dumps(request)).encode()
    return f"""(module
  (import "wasmflow" "http_request" (func $http (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "{_wat_bytes(req)}")
  (func (export "_start")
    (i32.store8 (i32.const 0)
      (i32.add (i32.const 48) (call $http (i32.const 1024) (i32.const {len(req)}) (i32.const 0) (i32.const 0) (i32.const 64))))
    (drop (call $out (i32.const 0) (i32.const 1)))))
"""


def allow_loopback() -> dict[str, Any]:
    return {"http": ["http://127.0.0.1:*"]}


@pytest.mark.parametrize("where", ["app:/drip", "app:/redirect", "raw:/"], ids=["slow-body", "redirect-then-slow-body",
                                                                            "slow-headers"])
def test_slow_server_ends_at_the_run_deadline(engine_name, planted_secret, servers, tmp_path, where):
    server, path = where.split(":")
    guest = http_guest({"method": "GET", "url": servers[server] + path, "timeout_ms": 60_000})
    started = time.monotonic()
    result = run_flow(engine_name, tmp_path, guest, allow=allow_loopback(), limits={"timeout": "2s"})
    wall = time.monotonic() - started
    assert result.status is Status.TIMEOUT, (result.status, result.error)
    assert result.run_ms < 2500, f"the run took {result.run_ms:.0f} ms under a 2 s limit"
    assert wall < 5.0
    assert "deadline" in (result.error or "")
    assert result.output is None  # the guest was stopped in the call, not told and left to carry on
    assert_no_leak(result, planted_secret)


def test_request_timeout_shorter_than_the_deadline_returns_timeout(engine_name, servers, tmp_path):
    guest = http_guest({"method": "GET", "url": servers["app"] + "/drip", "timeout_ms": 500})
    result = run_flow(engine_name, tmp_path, guest, allow=allow_loopback(), limits={"timeout": "10s"})
    assert result.status is Status.OK, (result.status, result.error)
    assert result.output == str(int(Code.TIMEOUT)).encode()
    assert result.run_ms < 1500


def test_environment_proxies_are_not_used(servers, tmp_path, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    guest = http_guest({"method": "GET", "url": servers["app"] + "/ok"})
    result = run_flow("wasmtime", tmp_path, guest, allow=allow_loopback(), limits={"timeout": "5s"})
    assert result.status is Status.OK and result.output == b"0", (result.error, result.output)


def test_response_body_over_8_mib_is_too_large(servers, tmp_path):
    guest = http_guest({"method": "GET", "url": servers["app"] + "/big", "timeout_ms": 5000})
    result = run_flow("wasmtime", tmp_path, guest, allow=allow_loopback(), limits={"timeout": "10s"})
    assert result.status is Status.OK and result.output == str(int(Code.TOO_LARGE)).encode()


def test_redirect_leaving_allow_http_is_denied_on_the_hop(servers, tmp_path):
    guest = http_guest({"method": "GET", "url": servers["app"] + "/away"})
    result = run_flow("wasmtime", tmp_path, guest, allow={"http": [servers["app"]]}, limits={"timeout": "5s"})
    assert result.output == str(int(Code.DENIED)).encode()
    assert "redirect to http://localhost:" in result.denials[0]


MALFORMED = {
    "timeout-not-a-number": {"url": "{base}/ok", "timeout_ms": "abc"},
    "timeout-infinite": '{{"url": "{base}/ok", "timeout_ms": 1e400}}',
    "timeout-negative": {"url": "{base}/ok", "timeout_ms": -5},
    "headers-a-list": {"url": "{base}/ok", "headers": [["X-Probe", "1"]]},
    "header-value-a-number": {"url": "{base}/ok", "headers": {"X-Probe": 1}},
    "header-value-crlf": {"url": "{base}/ok", "headers": {"X-Probe": "a\r\nX-Injected: 1"}},
    "header-name-not-a-token": {"url": "{base}/ok", "headers": {"X Probe": "1"}},
    "method-a-number": {"url": "{base}/ok", "method": 7},
    "method-unknown": {"url": "{base}/ok", "method": "BREW"},
    "url-missing": {"method": "GET"},
    "url-a-list": {"url": ["{base}/ok"]},
    "url-not-http": {"url": "file:///etc/passwd"},
    "not-an-object": '["{base}/ok"]',
    "not-json": '{{"url": ',
}


def _fill(value: Any, base: str) -> Any:
    if isinstance(value, str):
        return value.replace("{base}", base).replace("{{", "{").replace("}}", "}")
    if isinstance(value, list):
        return [_fill(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, base) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_invalid_without_a_traceback(servers, tmp_path, caplog, case):
    spec = _fill(MALFORMED[case], servers["app"])
    with caplog.at_level(logging.DEBUG, logger="wasmflow"):
        result = run_flow("wasmtime", tmp_path, http_guest(spec), allow=allow_loopback(), limits={"timeout": "5s"})
    assert result.status is Status.OK, result.error
    assert result.output == str(int(Code.INVALID)).encode(), f"{case}: code {result.output!r}"
    # Only the host's own records: the drip servers' aiohttp logs of earlier tests may land here too.
    ours = [r for r in caplog.records if r.name.startswith("wasmflow")]
    assert not [r for r in ours if r.levelno >= logging.ERROR or r.exc_info], caplog.text


@pytest.mark.parametrize("spec, words", [
    ({"url": "http://x", "timeout_ms": "abc"}, "timeout_ms"),
    ({"url": "http://x", "headers": ["a"]}, "headers"),
    ({"url": "http://x", "headers": {"a": 1}}, "headers.a"),
    ({"url": "http://x", "method": 7}, "method"),
    ({"url": "http://x", "method": "BREW"}, "BREW"),
    ({"method": "GET"}, "url"),
])
def test_malformed_request_messages_name_the_field(spec, words):
    with pytest.raises(HostError) as err:
        parse_request(spec)
    assert err.value.code == Code.INVALID and words in err.value.message and "\n" not in err.value.message
    assert "expected a JSON object" in err.value.message


def test_well_formed_request_is_converted_once():
    request = parse_request({"url": "http://x/y", "method": "post", "headers": {"X-A": "1"}, "timeout_ms": 250})
    assert (request.method, request.url, request.headers, request.timeout_ms) == ("POST", "http://x/y", {"X-A": "1"}, 250)
    assert parse_request({"url": "http://x"}).method == "GET"
