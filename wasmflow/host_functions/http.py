"""Outbound HTTP, limited to the origins in the flow's `allow.http`.

The host makes the request (the guest has no sockets) with aiohttp on a private event loop, checks every
hop of a redirect chain against the allow list, and bounds the whole exchange (DNS, connect, TLS, request,
headers, body, every redirect) by one deadline: the run's, or the request's own `timeout_ms` if sooner.
A per-read socket timeout would not do: a server sending a byte a second never lets one read time out.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import struct
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Optional
from urllib.parse import urljoin, urlsplit

import aiohttp
import yarl
from pydantic import Field, field_validator

from . import validate
from .http_allow import HttpAllowList
from .spec import Call, Capability, Code, HostError, HostFunction, check_range
from .validate import GuestRequest

MAX_BODY = 8 * 1024 * 1024  # request and response bodies
MAX_REQUESTS = 100  # per run
MAX_REDIRECTS = 10
DEFAULT_TIMEOUT_MS = 10_000
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "wasmflow"
# Set by the host from the URL and body: a guest's own value would let it talk to another virtual host
# than the allowed one, or desynchronise the connection.
HOST_SET_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te",
                              "trailer", "keep-alive", "proxy-authorization", "proxy-connection"})
CREDENTIAL_HEADERS = ("authorization", "cookie")  # dropped when a redirect leaves the origin
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpRequestSpec(GuestRequest):
    """The request a guest passes to `http_request` (docs/abi.md), declared and checked in one place.

    Strict: a number where a string belongs (or the reverse) is the guest's mistake, answered INVALID with
    the field's name, not coerced and not left to fail deep inside the HTTP client.
    """

    url: str
    method: str = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_ms: float = Field(default=DEFAULT_TIMEOUT_MS, gt=0, allow_inf_nan=False)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.lower().startswith(("http://", "https://")):
            raise ValueError(f"only http and https URLs, got {value[:200]!r}")
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value.upper() not in METHODS:
            raise ValueError(f"unsupported method {value[:40]!r} (one of {', '.join(METHODS)})")
        return value.upper()

    @field_validator("headers", mode="before")
    @classmethod
    def _no_headers(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN.match(name):
                raise ValueError(f"header name {name[:80]!r} is not an HTTP token")
            if name.lower() in HOST_SET_HEADERS:
                raise ValueError(f"header {name!r} is set by the host, not the guest")
            if _BAD_VALUE.search(text):
                raise ValueError(f"header {name!r} has a control character (CR, LF, NUL...) in its value")
        return value


EXPECTED = ('a JSON object {"url": "https://...", "method": "GET", "headers": {"name": "value"}, '
            '"timeout_ms": 10000}')


def parse_request(spec: Any) -> HttpRequestSpec:
    """The guest's request JSON as an HttpRequestSpec, or HostError(INVALID) naming the bad fields."""
    return validate.parse_request(HttpRequestSpec, spec, "http_request", EXPECTED)


class _Refused(Exception):
    """A redirect pointed outside allow.http: the caller records the denial on the run."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class _Loop:
    """aiohttp needs an event loop; host calls run on plain threads. One private loop thread serves them
    all, started on the first request, with one session (connection pool, no cookie jar, no proxies)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self.session: Optional[aiohttp.ClientSession] = None

    def submit(self, coro_fn: Any, *args: Any) -> "Future[Any]":
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="wasmflow-http", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
                asyncio.run_coroutine_threadsafe(self._open(), loop).result()
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop)

    async def _open(self) -> None:
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),  # runs (and flows) share the pool, never cookies
            trust_env=False,  # no proxies or .netrc from the host's environment
            auto_decompress=False,  # the body is what the server sent: no decompression bombs
            skip_auto_headers=("Accept-Encoding",),
            headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=None),  # the whole exchange is bounded by the caller
            requote_redirect_url=False,
        )

    def close(self) -> None:
        with self._lock:
            loop, thread, session = self._loop, self._thread, self.session
            self._loop = self._thread = self.session = None
        if loop is None:
            return
        if session is not None:
            try:
                asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=5)
            except Exception:  # closing is best effort; the loop goes anyway
                pass
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)


class HttpCapability(Capability):
    name = "http"

    def __init__(self) -> None:
        self._loop = _Loop()

    def functions(self) -> list[HostFunction]:
        return [HostFunction("wasmflow", "http_request", "ptr len ptr len ptr", ("i32",), self.http_request)]

    def close(self) -> None:
        self._loop.close()

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _allow_list(patterns: tuple[str, ...]) -> HttpAllowList:
        """Parsed once per set of patterns (per flow), not per run."""
        return HttpAllowList(list(patterns))

    def http_request(self, call: Call, req_ptr: int, req_len: int, body_ptr: int, body_len: int, out: int) -> int:
        run = call.run
        state = run.state.setdefault("http", {"count": 0, "allow": self._allow_list(tuple(run.flow.allow.http))})
        check_range(call.memory.size(), out, 16)
        request = validate.read_request(call.memory, req_ptr, req_len, HttpRequestSpec, "http_request", EXPECTED)
        url = state["allow"].connect_url(request.url)
        if url is None:
            raise run.deny(f"{request.url} is not in allow.http")
        if body_len > MAX_BODY:
            raise HostError(Code.TOO_LARGE, f"request body over {MAX_BODY // 1024**2} MiB")
        body = call.memory.read(body_ptr, body_len) if body_len else None
        if state["count"] >= MAX_REQUESTS:
            raise HostError(Code.LIMIT, f"more than {MAX_REQUESTS} HTTP requests in one run")
        state["count"] += 1
        remaining = run.remaining()
        if remaining <= 0:
            raise run.halt("timeout", f"deadline of {run.flow.limits.timeout:g}s passed")
        own = request.timeout_ms / 1000.0
        timeout = min(own, remaining)
        future = self._loop.submit(self._exchange, state["allow"], request, url, body, timeout)
        try:
            status, headers, data = future.result(timeout=timeout + 5.0)  # the loop enforces `timeout`
        except (asyncio.TimeoutError, FutureTimeout):
            future.cancel()
            if own >= remaining:  # the run's deadline, not the request's own, ran out: the run ends
                raise run.halt("timeout", f"deadline of {run.flow.limits.timeout:g}s passed during an HTTP "
                                          f"request to {_origin(url)}") from None
            raise HostError(Code.TIMEOUT, f"{_origin(url)}: no complete answer within {request.timeout_ms:g} ms") from None
        except _Refused as refused:
            raise run.deny(f"redirect to {refused.url} is not in allow.http") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise HostError(Code.UPSTREAM, f"{_origin(url)}: {exc.__class__.__name__}: {exc}"[:500]) from None
        head = json.dumps({"status": status, "headers": headers}).encode()
        h1, l1 = run.put_result(head)
        h2, l2 = run.put_result(data)
        call.memory.write(out, struct.pack("<IIII", h1, l1, h2, l2))
        return Code.OK

    async def _exchange(self, allow: HttpAllowList, request: HttpRequestSpec, url: str, body: Optional[bytes],
                        timeout: float) -> tuple[int, dict[str, str], bytes]:
        """The request and its redirects, all within `timeout` seconds (asyncio.TimeoutError past it)."""
        return await asyncio.wait_for(self._follow(allow, request, url, body), timeout)

    async def _follow(self, allow: HttpAllowList, request: HttpRequestSpec, url: str,
                      body: Optional[bytes]) -> tuple[int, dict[str, str], bytes]:
        session = self._loop.session
        if session is None:  # the client was closed (the process is shutting down)
            raise HostError(Code.INTERNAL, "the HTTP client is closed; the platform is shutting down")
        method, headers = request.method, dict(request.headers)
        for _ in range(MAX_REDIRECTS + 1):
            async with session.request(method, yarl.URL(url, encoded=True), data=body, headers=headers,
                                       allow_redirects=False) as response:
                location = response.headers.get("Location")
                if response.status not in REDIRECTS or location is None:
                    return response.status, {k.lower(): v for k, v in response.headers.items()}, await _read_body(response)
            target = urljoin(url, location)
            next_url = allow.connect_url(target)
            if next_url is None:
                raise _Refused(target[:500])
            if _origin(next_url) != _origin(url):
                headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
            if (response.status == 303 and method != "HEAD") or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            url = next_url
        raise HostError(Code.UPSTREAM, f"{_origin(url)}: more than {MAX_REDIRECTS} redirects")


async def _read_body(response: aiohttp.ClientResponse) -> bytes:
    """The body, or HostError(TOO_LARGE) as soon as it passes MAX_BODY (not after buffering all of it)."""
    if response.content_length is not None and response.content_length > MAX_BODY:
        raise HostError(Code.TOO_LARGE, f"response body of {response.content_length} bytes is over "
                                        f"{MAX_BODY // 1024**2} MiB")
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > MAX_BODY:
            raise HostError(Code.TOO_LARGE, f"response body over {MAX_BODY // 1024**2} MiB")
    return bytes(data)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
