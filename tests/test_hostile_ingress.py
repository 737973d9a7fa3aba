"""Hostile webhook senders, HTTP callers and HTTP-triggered guests against a real server on loopback.

Issue 9, class 11: a deeply nested JSON body, a body shorter than its Content-Length, a client dripping
its request a byte at a time, a guest answering with a 1xx status or a body on a 204, and an HTTP run
that outlives its lease. Each must end in a clear answer (400, 408, a well-framed response), the server
must keep serving everyone else, and the run's record must say what the client was told.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import sqlalchemy as sa

from platform_support import OK_WAT, SECRET, ServerThread, deliver, scalar, signed, wait_until, write_wat
from wasmflow.platform.app import Options
from wasmflow.platform.ingress import MAX_JSON_DEPTH, final_status

STATUS_WAT = """(module
 (import "wasmflow" "set_response_status" (func $status (param i32) (result i32)))
 (import "wasmflow" "set_response_body" (func $body (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 0) "refused")
 (data (i32.const 16) "accepted")
 (func (export "_start")
   (if (i32.eqz (call $status (i32.const {status})))
     (then (drop (call $body (i32.const 16) (i32.const 8))))
     (else (drop (call $body (i32.const 0) (i32.const 7)))))))"""

# Busy for `ns` nanoseconds of wall-clock time (the WASI monotonic clock), then output {"ok":true}.
SLOW_WAT = """(module
 (import "wasi_snapshot_preview1" "clock_time_get" (func $now (param i32 i64 i32) (result i32)))
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 64) "{{\\"ok\\":true}}")
 (func (export "_start") (local $end i64)
   (drop (call $now (i32.const 1) (i64.const 0) (i32.const 0)))
   (local.set $end (i64.add (i64.load (i32.const 0)) (i64.const {ns})))
   (loop $l
     (drop (call $now (i32.const 1) (i64.const 0) (i32.const 0)))
     (br_if $l (i64.lt_u (i64.load (i32.const 0)) (local.get $end))))
   (drop (call $out (i32.const 64) (i32.const 11)))))"""


def flows_yaml(tmp_path: Path) -> str:
    def module(name: str, text: str) -> Path:
        return write_wat(tmp_path / f"{name}.wasm", text)

    return f"""
flows:
  - name: ok
    module: {module("ok", OK_WAT)}
    on:
      - github: {{events: ["*"]}}
      - http: {{methods: [GET, POST]}}
  - name: informational
    module: {module("s101", STATUS_WAT.format(status=101))}
    on: [{{http: {{methods: [GET]}}}}]
  - name: continue
    module: {module("s100", STATUS_WAT.format(status=100))}
    on: [{{http: {{methods: [GET]}}}}]
  - name: no-content
    module: {module("s204", STATUS_WAT.format(status=204))}
    on: [{{http: {{methods: [GET]}}}}]
  - name: not-modified
    module: {module("s304", STATUS_WAT.format(status=304))}
    on: [{{http: {{methods: [GET]}}}}]
"""


@pytest.fixture
def server(tmp_path: Path, make_runtime) -> Iterator[ServerThread]:
    runtime = make_runtime(tmp_path / "app", flows_yaml(tmp_path))
    options = Options(workers=2, poll_interval=0.1, webhook_secret=SECRET, max_body=1024 * 1024,
                      header_timeout=1.0, body_timeout=1.0)
    with ServerThread(runtime, options) as srv:
        yield srv
    runtime.close()


def count_events(srv: ServerThread) -> int:
    return scalar(srv.platform.db, "SELECT count(*) FROM events")


# -- (a) nesting -------------------------------------------------------------------------------------

def nested(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


def test_deeply_nested_webhook_json_is_400_saying_why(server: ServerThread) -> None:
    resp = deliver(server.base, "push", nested(100_000))
    assert resp.status_code == 400, resp.text
    assert "nested deeper than" in resp.json()["error"] and "Traceback" not in resp.text
    form = b"payload=" + nested(100_000)
    as_form = requests.post(f"{server.base}/webhooks/github", data=form, timeout=10,
                            headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": "f-1",
                                     "X-Hub-Signature-256": signed(form),
                                     "Content-Type": "application/x-www-form-urlencoded"})
    assert as_form.status_code == 400 and "nested deeper than" in as_form.json()["error"]
    just_over = deliver(server.base, "push", nested(MAX_JSON_DEPTH))  # the object adds one level
    assert just_over.status_code == 400
    assert count_events(server) == 0
    # Brackets inside strings are text, not nesting; a payload at the limit is taken.
    text = json.dumps({"s": "[" * 100_000, "deep": json.loads(b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1))})
    assert deliver(server.base, "push", text.encode()).status_code == 202
    assert requests.get(f"{server.base}/healthz", timeout=5).status_code == 200


def test_the_depth_check_counts_nesting_not_brackets() -> None:
    """`json_too_deep` skips its scan when a body has no more openings than the limit: at the limit
    either way, one past it found, brackets in strings never counted as nesting."""
    from wasmflow.platform.ingress import json_too_deep

    def deep(n: int) -> bytes:
        return b"[" * n + b"]" * n

    assert not json_too_deep(deep(MAX_JSON_DEPTH)) and json_too_deep(deep(MAX_JSON_DEPTH + 1))
    assert not json_too_deep(json.dumps(["[" * 500, "{" * 500]).encode())  # 1,000 openings, depth 1
    assert json_too_deep(b'{"a": "[{", "b": ' + deep(MAX_JSON_DEPTH) + b"}")  # 65 deep, text with brackets


# -- (b) slow and short clients ----------------------------------------------------------------------

def raw(server: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=6)
    return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"the server held the connection over {limit} s (got {data[:80]!r})") from None
        except ConnectionResetError:  # closed while the client still had bytes in flight: the kernel resets
            return data, time.monotonic() - started
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closes(server: ServerThread) -> None:
    for path in ("/webhooks/github", "/flows/ok"):
        sock = raw(server)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "X-GitHub-Event: push\r\nX-GitHub-Delivery: short\r\nContent-Length: 1000\r\n\r\n{\"a\": 1".encode())
        data, took = read_until_closed(sock, limit=15)
        sock.close()
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b"within 1" in data and took < 13
    assert count_events(server) == 0


def test_a_slow_drip_client_is_cut_off_while_others_are_served(server: ServerThread) -> None:
    idle = raw(server)  # connects and never sends a byte
    drip = raw(server)
    stop = threading.Event()

    def dripper() -> None:
        try:
            drip.sendall(b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set():
                drip.sendall(b"X-Drip: a\r\n")
                time.sleep(0.2)
        except OSError:
            pass  # the server closed it: what is asserted below

    thread = threading.Thread(target=dripper, daemon=True)
    thread.start()
    started = time.monotonic()
    for _ in range(3):  # everyone else is served meanwhile
        assert requests.get(f"{server.base}/healthz", timeout=2).status_code == 200
    _, took_drip = read_until_closed(drip, limit=8)
    _, took_idle = read_until_closed(idle, limit=8)
    stop.set()
    thread.join(5)
    assert time.monotonic() - started < 8 and took_drip < 8 and took_idle < 8
    drip.close()
    idle.close()
    assert requests.get(f"{server.base}/healthz", timeout=2).status_code == 200


# -- (c) statuses a guest may not answer with --------------------------------------------------------

def read_response(fp: Any) -> tuple[int, bytes]:
    """One HTTP/1.1 response from a buffered stream: its status and its body (framed by Content-Length;
    none on 1xx, 204 and 304, as RFC 9112 says). The next response starts right after it."""
    status = int(fp.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := fp.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "transfer-encoding" not in headers, "the server answered chunked; expected Content-Length framing"
    if status < 200 or status in (204, 304):
        assert headers.get("content-length", "0") == "0", f"{status} with a body"
        return status, b""
    return status, fp.read(int(headers["content-length"]))


def pipelined(server: ServerThread, paths: list[str]) -> list[tuple[int, bytes]]:
    """Send every request at once on one connection; read the answers in order."""
    sock = raw(server)
    sock.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
    fp = sock.makefile("rb")
    answers = [read_response(fp) for _ in paths]
    sock.close()
    return answers


def test_a_guest_cannot_answer_with_an_informational_status(server: ServerThread) -> None:
    answers = pipelined(server, ["/flows/informational", "/flows/ok", "/flows/continue", "/flows/ok"])
    assert answers == [(200, b"refused"), (200, b'{"ok":true}'), (200, b"refused"), (200, b'{"ok":true}')]


def test_a_body_on_204_or_304_does_not_confuse_the_connection(server: ServerThread) -> None:
    answers = pipelined(server, ["/flows/no-content", "/flows/ok", "/flows/not-modified", "/flows/ok"])
    assert answers == [(204, b""), (200, b'{"ok":true}'), (304, b""), (200, b'{"ok":true}')]


def test_final_status_refuses_anything_outside_200_to_599() -> None:
    assert [final_status(s) for s in (None, 200, 204, 404, 599)] == [200, 200, 204, 404, 599]
    for bad in (0, 100, 101, 199, 600, -1, 1 << 40):
        assert final_status(bad) is None


# -- (d) an HTTP run outliving its lease -------------------------------------------------------------

def test_http_runs_longer_than_their_lease_are_recorded_as_answered(tmp_path: Path, make_runtime) -> None:
    """Eight one-second runs through two run slots under a 1.5 s lease: the last ones wait their turn
    past `timeout + lease` (3.5 s), and recovery must never take them back (before the fix: `dead/lost`).

    The lease leaves the heartbeat (every lease / 3) a second of slack: under a 0.5 s lease it was seen
    to miss late in the full suite only (each half of the files before it passes alone; the cause, in a
    process holding hundreds of earlier tests' objects, is not pinned down)."""
    flows = f"""
flows:
  - name: slow
    module: {write_wat(tmp_path / "slow.wasm", SLOW_WAT.format(ns=1_000_000_000))}
    limits: {{timeout: 2s}}
    on: [{{http: {{methods: [POST]}}}}]
"""
    runtime = make_runtime(tmp_path / "app", flows)
    options = Options(workers=2, poll_interval=0.1, lease_seconds=1.5, webhook_secret=SECRET)
    with ServerThread(runtime, options) as srv:
        results: list[requests.Response] = []
        lock = threading.Lock()

        def call() -> None:
            resp = requests.post(f"{srv.base}/flows/slow", data=b"x", timeout=60)
            with lock:
                results.append(resp)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
        ids = [r.headers["X-Wasmflow-Run"] for r in results]
        db = srv.platform.db
        rows = {(scalar(db, "SELECT state FROM runs WHERE id = :i", i=i), scalar(db, "SELECT status FROM runs WHERE id = :i", i=i))
                for i in ids}
        assert rows == {("done", "ok")}
        assert scalar(db, "SELECT count(*) FROM attempts WHERE status = 'lost'") == 0
        assert "wasmflow_lease_expiries_total 0.0" in requests.get(f"{srv.base}/metrics", timeout=5).text
    runtime.close()


# -- (f) text a column cannot hold -------------------------------------------------------------------

@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_payload_text_a_column_cannot_hold_is_stored_replaced_not_refused(database: str, tmp_path: Path,
                                                                          make_runtime, request) -> None:
    """A signed payload's action and repository (and the concurrency key made of them) may hold a NUL, an
    unpaired surrogate or more characters than the column: PostgreSQL refused them, so the delivery was
    answered 503 at every redelivery. Now it is stored with U+FFFD in their place and cut to the column,
    the same on both databases, and its run completes."""
    url = None if database == "sqlite" else request.getfixturevalue("pg_url")
    flows = f"""
flows:
  - name: keyed
    module: {write_wat(tmp_path / "ok.wasm", OK_WAT)}
    on: [{{github: {{events: [pull_request]}}}}]
    concurrency: {{key: "{{repo}}:{{action}}", limit: 1}}
"""
    runtime = make_runtime(tmp_path / "app", flows, database_url=url)
    options = Options(workers=2, poll_interval=0.1, webhook_secret=SECRET)
    # payload, then the stored action, repository and concurrency key (rendered from the payload's text)
    payloads = {
        "nul": ({"action": "op\x00ened", "repository": {"full_name": "acme/a\x00b"}}, "op\ufffdened",
                "acme/a\ufffdb", "acme/a\ufffdb:op\ufffdened"),
        "surrogate": ({"action": "op\ud800ened", "repository": {"full_name": "acme/\udfff"}}, "op\ufffdened",
                      "acme/\ufffd", "acme/\ufffd:op\ufffdened"),
        "long": ({"action": "o" * 300, "repository": {"full_name": "acme/" + "r" * 400}}, "o" * 128,
                 ("acme/" + "r" * 400)[:256], ("acme/" + "r" * 400)[:320]),
    }
    with ServerThread(runtime, options) as srv:
        for name, (payload, *_) in payloads.items():
            resp = deliver(srv.base, "pull_request", payload, delivery=f"text-{name}")
            assert resp.status_code == 202, (name, resp.text)
            assert deliver(srv.base, "pull_request", payload, delivery=f"text-{name}").json()["duplicate"] is True

        def all_done() -> bool:
            return scalar(srv.platform.db, "SELECT count(*) FROM runs WHERE state = 'done'") == len(payloads)

        wait_until(all_done, timeout=30, interval=0.05)
        for name, (_, action, repo, key) in payloads.items():
            with srv.platform.db.connect() as conn:
                row = conn.execute(sa.text("SELECT e.action, e.repo, r.status, r.concurrency_key FROM events e "
                                           "JOIN runs r ON r.event_id = e.id WHERE e.delivery_id = :d"),
                                   {"d": f"text-{name}"}).one()
            assert (row.action, row.repo, row.status) == (action, repo, "ok"), name
            assert row.concurrency_key == key, name
