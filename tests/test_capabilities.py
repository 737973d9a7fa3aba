"""The `wasmflow` capabilities as guests see them: outbound HTTP, key-value, config and secrets.

Real guests built from guest-examples/, a real HTTP server on 127.0.0.1, real SQLite.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from guest_support import write_wat
from wasmflow.engine import Status
from wasmflow.flows.model import Flow, FlowsFile
from wasmflow.host_functions.spec import Event
from wasmflow.runtime import Runtime


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []
    redirect_to = ""

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        body = b"hello from loopback"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def runtime_for(tmp_path: Path, make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    """`runtime_for(*flows)`: a Runtime over these flows in tmp_path, closed at teardown."""
    return lambda *flows: make_runtime(tmp_path, FlowsFile(flows=list(flows), state_dir=str(tmp_path / "state")))


def http_flow(wasm: Path, url: str, allow: list[str]) -> Flow:
    return Flow(name="fetch", module=str(wasm), config={"url": url}, allow={"http": allow}, limits={"timeout": "5s"})


def test_allowed_origin_is_fetched(guest_wasm, server, tmp_path, runtime_for):
    rt = runtime_for(http_flow(guest_wasm["hostile-http-denied"], server + "/hi", ["http://127.0.0.1:*"]))
    result = rt.run("fetch", Event("manual"))
    assert result.status is Status.OK, (result.error, result.stderr)
    assert b"status 200: hello from loopback" in result.stdout
    assert _Handler.hits == ["/hi"]


def test_origin_not_allowed_is_denied_and_never_contacted(guest_wasm, server, tmp_path, runtime_for):
    rt = runtime_for(http_flow(guest_wasm["hostile-http-denied"], server + "/hi", ["https://api.github.com"]))
    result = rt.run("fetch", Event("manual"))
    assert result.status is Status.DENIED
    assert "not in allow.http" in result.error
    assert _Handler.hits == []


def test_redirect_to_an_origin_not_allowed_is_denied(guest_wasm, server, tmp_path, runtime_for):
    port = server.rsplit(":", 1)[1]
    _Handler.redirect_to = f"http://localhost:{port}/secret"  # same server, other origin
    rt = runtime_for(http_flow(guest_wasm["hostile-http-denied"], server + "/redirect", [server]))
    result = rt.run("fetch", Event("manual"))
    assert result.status is Status.DENIED
    assert "redirect" in result.error
    assert _Handler.hits == ["/redirect"]


def test_unreachable_host_is_an_upstream_error_not_a_crash(guest_wasm, tmp_path, runtime_for):
    rt = runtime_for(http_flow(guest_wasm["hostile-http-denied"], "http://127.0.0.1:9/", ["http://127.0.0.1:9"]))
    result = rt.run("fetch", Event("manual"))
    assert result.status is Status.TRAP  # the guest's expect() panics on Upstream
    assert result.upstream_failures and "127.0.0.1:9" in result.upstream_failures[0]
    assert b"HTTP request: " in result.stderr and b"Upstream" in result.stderr  # the request's expect() saw Upstream


def hello(wasm: Path, name: str = "hello", kv: bool = True) -> Flow:
    return Flow(name=name, module=str(wasm), allow={"kv": kv}, config={"greeting": "Howdy"})


def test_kv_is_scoped_per_flow_and_survives_a_restart(guest_wasm, tmp_path, runtime_for):
    flows = [hello(guest_wasm["hello"], "a"), hello(guest_wasm["hello"], "b")]
    rt = runtime_for(*flows)
    counts = [rt.run(name, Event("ping")).output for name in ("a", "a", "b")]
    rt.close()
    assert [b'"count":1', b'"count":2', b'"count":1'] == [c[c.index(b'"count"'):c.index(b'"count"') + 9] for c in counts]
    rt = runtime_for(*flows)  # a new process would see the same store
    assert b'"count":3' in rt.run("a", Event("ping")).output
    rt.close()


def test_kv_without_allow_is_denied(guest_wasm, tmp_path, runtime_for):
    rt = runtime_for(hello(guest_wasm["hello"], kv=False))
    result = rt.run("hello", Event("ping"))
    assert result.status is Status.DENIED
    assert "allow.kv" in result.error


def test_config_reaches_the_guest(guest_wasm, tmp_path, runtime_for):
    rt = runtime_for(hello(guest_wasm["hello"]))
    result = rt.run("hello", Event("ping", b'{"sender": {"login": "octocat"}}'))
    assert result.ok
    assert b'"greeting":"Howdy"' in result.output and b'"who":"octocat"' in result.output
    assert any("Howdy, octocat!" in message for _, _, message in result.logs)


SECRET_WAT = """(module
 (import "wasmflow" "secret_get" (func $get (param i32 i32 i32) (result i32)))
 (import "wasmflow" "result_read" (func $read (param i32 i32 i32) (result i32)))
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 0) "%s")
 (func (export "_start") (local $code i32)
   (local.set $code (call $get (i32.const 0) (i32.const %d) (i32.const 64)))
   (if (i32.eqz (local.get $code))
     (then
       (drop (call $read (i32.load (i32.const 64)) (i32.const 128) (i32.load (i32.const 68))))
       (drop (call $out (i32.const 128) (i32.load (i32.const 68)))))
     (else
       (i32.store8 (i32.const 128) (i32.add (i32.const 48) (local.get $code)))
       (drop (call $out (i32.const 128) (i32.const 1)))))))"""


@pytest.mark.parametrize("name, declared, expected", [
    ("WF_TEST_TOKEN", True, b"s3cret"),   # declared and set: the value
    ("WF_TEST_TOKEN", False, b"2"),       # not declared: DENIED
    ("WF_TEST_UNSET", True, b"1"),        # declared, not set: NOT_FOUND
])
def test_secrets_only_when_declared(tmp_path, monkeypatch, name, declared, expected, runtime_for):
    monkeypatch.setenv("WF_TEST_TOKEN", "s3cret")
    path = write_wat(tmp_path / "secret.wasm", SECRET_WAT % (name, len(name)))
    flow = Flow(name="s", module=str(path), secrets=[name] if declared else [])
    rt = runtime_for(flow)
    result = rt.run("s", Event("manual"))
    assert result.ok and result.output == expected
    assert bool(result.denials) is (expected == b"2")
