"""Outbound HTTP, limited to the origins in the flow's `allow.http`.

The host makes the request (the guest has no sockets), checks every hop of a redirect chain against the
allow list, and bounds the call by the run's deadline, so a slow server cannot hold a run past it.
"""

from __future__ import annotations

import functools
import json
import struct
import urllib.error
import urllib.request

from .http_allow import HttpAllowList
from .spec import Call, Capability, Code, HostError, HostFunction, check_range, i32s, read_json

MAX_BODY = 8 * 1024 * 1024
MAX_REQUESTS = 100
DEFAULT_TIMEOUT_MS = 10_000
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow: HttpAllowList, call: Call) -> None:
        self.allow, self.call = allow, call

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not self.allow.allows(newurl):
            raise self.call.run.deny(f"redirect to {newurl} is not in allow.http")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _NoProxy(urllib.request.ProxyHandler):
    def __init__(self) -> None:
        super().__init__({})


class HttpCapability(Capability):
    name = "http"

    def functions(self) -> list[HostFunction]:
        return [HostFunction("wasmflow", "http_request", i32s(5), ("i32",), self.http_request)]

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _allow_list(patterns: tuple[str, ...]) -> HttpAllowList:
        """Parsed once per set of patterns (per flow), not per run."""
        return HttpAllowList(list(patterns))

    def http_request(self, call: Call, req_ptr: int, req_len: int, body_ptr: int, body_len: int, out: int) -> int:
        state = call.run.state.setdefault("http", {"count": 0, "allow": self._allow_list(tuple(call.run.flow.allow.http))})
        check_range(call.memory.size(), out, 16)
        spec = read_json(call.memory, req_ptr, req_len)
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise HostError(Code.INVALID, 'request must be a JSON object with a "url"')
        method = str(spec.get("method", "GET")).upper()
        if method not in METHODS:
            raise HostError(Code.INVALID, f"unsupported method {method}")
        url = spec["url"]
        if not url.startswith(("http://", "https://")):
            raise HostError(Code.INVALID, f"only http and https URLs: {url!r}")
        if not state["allow"].allows(url):
            raise call.run.deny(f"{url} is not in allow.http")
        if (body_len & 0xFFFFFFFF) > MAX_BODY:
            raise HostError(Code.TOO_LARGE, "request body over 8 MiB")
        body = call.memory.read(body_ptr, body_len) if body_len else None
        if state["count"] >= MAX_REQUESTS:
            raise HostError(Code.LIMIT, f"more than {MAX_REQUESTS} HTTP requests in one run")
        state["count"] += 1
        remaining = call.run.remaining()
        if remaining <= 0:
            raise HostError(Code.TIMEOUT, "the run's deadline has passed")
        timeout = min(float(spec.get("timeout_ms", DEFAULT_TIMEOUT_MS)) / 1000.0, remaining)
        headers = {str(k): str(v) for k, v in (spec.get("headers") or {}).items()}
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        opener = urllib.request.build_opener(_NoProxy(), _CheckedRedirects(state["allow"], call))
        try:
            try:
                response = opener.open(request, timeout=timeout)
            except urllib.error.HTTPError as err:  # 4xx/5xx are answers, not failures
                response = err
            with response:
                data = response.read(MAX_BODY + 1)
                status = response.status
                resp_headers = {k.lower(): v for k, v in response.headers.items()}
        except HostError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if "timed out" in str(exc):
                raise HostError(Code.TIMEOUT if call.run.remaining() <= 0 else Code.UPSTREAM, f"{url}: {exc}")
            raise HostError(Code.UPSTREAM, f"{url}: {exc}") from None
        if len(data) > MAX_BODY:
            raise HostError(Code.TOO_LARGE, "response body over 8 MiB")
        head = json.dumps({"status": status, "headers": resp_headers}).encode()
        h1, l1 = call.run.put_result(head)
        h2, l2 = call.run.put_result(data)
        call.memory.write(out, struct.pack("<IIII", h1, l1, h2, l2))
        return Code.OK
