"""Webhook ingress, HTTP triggers, health and metrics, against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from wasmflow.platform.app import Options
from wasmflow.platform.ingress import sign, verify_signature
from wasmflow.platform.store import list_events, runs_for_event

from platform_support import OK_WAT, SECRET, TRAP_WAT, ServerThread, deliver, scalar, signed, wait_until, write_wat


def test_signature_matches_githubs_test_vector():
    secret, body = b"It's a Secret to Everybody", b"Hello, World!"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sign(secret, body) == expected
    assert verify_signature(secret, body, expected)
    assert not verify_signature(secret, body + b" ", expected)
    assert not verify_signature(secret, body, expected[:-1] + "f")
    assert not verify_signature(secret, body, None)
    assert not verify_signature(secret, body, "sha1=" + expected[7:])


FLOWS = """
flows:
  - name: hello
    module: {hello}
    allow: {{kv: true}}
    on:
      - github: {{events: ["*"]}}
      - http: {{methods: [GET, POST]}}
  - name: pr-review
    module: {ok}
    on:
      - github: {{events: [pull_request.opened, pull_request.synchronize], repos: ["acme/*"]}}
  - name: broken
    module: {trap}
    retry: {{attempts: 1}}
    on:
      - http: {{methods: [POST]}}
"""


@pytest.fixture
def server(tmp_path: Path, guest_wasm, make_runtime):
    flows = FLOWS.format(hello=guest_wasm["hello"], ok=write_wat(tmp_path / "ok.wasm", OK_WAT),
                         trap=write_wat(tmp_path / "trap.wasm", TRAP_WAT))
    runtime = make_runtime(tmp_path / "app", flows)
    with ServerThread(runtime, Options(workers=2, poll_interval=0.1, webhook_secret=SECRET, max_body=64 * 1024)) as srv:
        yield srv
    runtime.close()


def count_events(srv: ServerThread) -> int:
    return scalar(srv.platform.db, "SELECT count(*) FROM events")


def test_signed_delivery_is_acknowledged_stored_and_run_by_each_matching_flow(server):
    payload = {"action": "opened", "repository": {"full_name": "acme/app"}, "sender": {"login": "octocat"}}
    resp = deliver(server.base, "pull_request", payload, delivery="d-1")
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["duplicate"] is False and len(body["runs"]) == 2
    db = server.platform.db

    def done():
        rows = [r for r in runs_for_event(db, body["event"]) if r.state == "done"]
        return rows if len(rows) == 2 else None

    runs = wait_until(done)
    assert sorted(r.flow for r in runs) == ["hello", "pr-review"]
    hello = next(r for r in runs if r.flow == "hello")
    assert json.loads(hello.output)["who"] == "octocat"
    assert hello.idempotency_key == "d-1"
    assert any("octocat" in message for _, _, message in json.loads(hello.logs))


def test_repo_glob_and_action_decide_which_flows_run(server):
    other_repo = deliver(server.base, "pull_request", {"action": "opened", "repository": {"full_name": "other/app"}})
    other_action = deliver(server.base, "pull_request", {"action": "closed", "repository": {"full_name": "acme/app"}})
    assert other_repo.status_code == other_action.status_code == 202
    # only `hello` (every event) takes them; pr-review wants acme/* and opened/synchronize
    assert len(other_repo.json()["runs"]) == 1 and len(other_action.json()["runs"]) == 1


def test_redelivery_is_acknowledged_but_not_run_twice(server):
    payload = {"repository": {"full_name": "acme/app"}}
    first = deliver(server.base, "push", payload, delivery="same-id")
    again = deliver(server.base, "push", payload, delivery="same-id")
    assert first.status_code == again.status_code == 202
    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True
    assert again.json()["event"] == first.json()["event"]
    assert scalar(server.platform.db, "SELECT count(*) FROM runs WHERE event_id = :e", e=first.json()["event"]) == 1


def test_bad_or_missing_signature_is_401_and_nothing_is_stored(server):
    body = json.dumps({"zen": "hi"}).encode()
    headers = {"X-GitHub-Event": "ping", "X-GitHub-Delivery": "x1", "Content-Type": "application/json"}
    missing = requests.post(f"{server.base}/webhooks/github", data=body, headers=headers)
    wrong = requests.post(f"{server.base}/webhooks/github", data=body,
                          headers={**headers, "X-Hub-Signature-256": signed(body, "not-the-secret")})
    tampered = requests.post(f"{server.base}/webhooks/github", data=body + b" ",
                             headers={**headers, "X-Hub-Signature-256": signed(body)})
    assert [missing.status_code, wrong.status_code, tampered.status_code] == [401, 401, 401]
    assert "Traceback" not in missing.text and missing.json()["error"]
    assert count_events(server) == 0


def test_malformed_bodies_and_headers_are_400(server):
    not_json = deliver(server.base, "push", b"{not json")
    not_object = deliver(server.base, "push", b"[1, 2]")
    no_event = requests.post(f"{server.base}/webhooks/github", data=b"{}",
                             headers={"X-Hub-Signature-256": signed(b"{}"), "X-GitHub-Delivery": "x"})
    no_delivery = requests.post(f"{server.base}/webhooks/github", data=b"{}",
                                headers={"X-Hub-Signature-256": signed(b"{}"), "X-GitHub-Event": "push"})
    assert [r.status_code for r in (not_json, not_object, no_event, no_delivery)] == [400, 400, 400, 400]
    assert not_json.json()["error"] == "body is not JSON"
    assert count_events(server) == 0


def test_oversized_body_is_413_with_or_without_content_length(server):
    big = b'{"x": "' + b"a" * (70 * 1024) + b'"}'
    resp = deliver(server.base, "push", big)
    assert resp.status_code == 413

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    chunked = requests.post(f"{server.base}/webhooks/github", data=chunks(),
                            headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": "big",
                                     "X-Hub-Signature-256": signed(big)})
    assert chunked.status_code == 413
    assert count_events(server) == 0


def test_unknown_event_is_202_recorded_and_ignored(tmp_path, guest_wasm, make_runtime):
    flows = f"""
flows:
  - name: pr
    module: {guest_wasm["hello"]}
    allow: {{kv: true}}
    on: [{{github: {{events: [pull_request.opened]}}}}]
"""
    runtime = make_runtime(tmp_path / "app", flows)
    with ServerThread(runtime, Options(workers=1, webhook_secret=SECRET)) as srv:
        resp = deliver(srv.base, "watch", {"action": "started", "repository": {"full_name": "a/b"}}, delivery="w1")
        assert resp.status_code == 202
        assert resp.json()["ignored"] is True and resp.json()["runs"] == []
        events = list_events(srv.platform.db)
        assert [(e.delivery_id, e.status, e.runs_created) for e in events] == [("w1", "ignored", 0)]
        assert "watch.started" in events[0].note
        assert scalar(srv.platform.db, "SELECT count(*) FROM runs") == 0
    runtime.close()


def test_http_trigger_returns_the_guests_response(server):
    resp = requests.post(f"{server.base}/flows/hello/some/sub/path?x=1", json={"name": "amy"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["who"] == "amy" and resp.json()["event"] == "http"
    run_id = resp.headers["X-Wasmflow-Run"]
    with server.platform.db.connect() as conn:
        row = conn.execute(sa.text("SELECT state, status, trigger FROM runs WHERE id = :id"), {"id": run_id}).first()
    assert tuple(row) == ("done", "ok", "http")


def test_http_trigger_failure_is_500_with_run_id_and_no_traceback(server):
    resp = requests.post(f"{server.base}/flows/broken", data=b"x")
    assert resp.status_code == 500
    body = resp.json()
    assert body["status"] == "trap" and len(body["run_id"]) == 16
    assert "Traceback" not in resp.text
    assert scalar(server.platform.db, "SELECT state FROM runs WHERE id = :id", id=body["run_id"]) == "dead"


def test_http_trigger_unknown_flow_and_wrong_method(server):
    assert requests.get(f"{server.base}/flows/nope").status_code == 404
    assert requests.get(f"{server.base}/flows/pr-review").status_code == 404  # no http trigger
    wrong = requests.get(f"{server.base}/flows/broken")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"


def test_healthz_and_metrics(server):
    assert requests.get(f"{server.base}/healthz").json() == {"status": "ok"}
    deliver(server.base, "push", {"repository": {"full_name": "acme/app"}})
    deliver(server.base, "push", {}, secret="wrong")
    wait_until(lambda: scalar(server.platform.db, "SELECT count(*) FROM runs WHERE state = 'done'") == 1)
    text = requests.get(f"{server.base}/metrics").text
    assert 'wasmflow_events_received_total{outcome="accepted",source="github"} 1.0' in text
    assert 'wasmflow_events_received_total{outcome="bad_signature",source="github"} 1.0' in text
    assert 'wasmflow_runs_total{flow="hello",status="ok"} 1.0' in text
    assert 'wasmflow_run_duration_seconds_count{flow="hello"} 1.0' in text
    assert 'wasmflow_queue_depth{state="queued"} 0.0' in text
    assert "wasmflow_lease_expiries_total 0.0" in text


def test_server_stays_responsive_while_guests_run(tmp_path, make_runtime):
    """Runs execute off the event loop: /healthz answers while every run slot is busy with a long guest."""
    from platform_support import LOOP_WAT

    flows = f"""
flows:
  - name: slow
    module: {write_wat(tmp_path / "loop.wasm", LOOP_WAT)}
    limits: {{timeout: 2s}}
    retry: {{attempts: 1}}
    on: [{{github: {{events: [push]}}}}]
"""
    runtime = make_runtime(tmp_path / "app", flows)
    with ServerThread(runtime, Options(workers=2, poll_interval=0.05, webhook_secret=SECRET, grace_seconds=5)) as srv:
        for _ in range(2):
            assert deliver(srv.base, "push", {}).status_code == 202
        wait_until(lambda: srv.platform.dispatcher.in_flight == 2)
        for _ in range(5):
            resp = requests.get(f"{srv.base}/healthz", timeout=0.5)
            assert resp.status_code == 200
        wait_until(lambda: scalar(srv.platform.db, "SELECT count(*) FROM runs WHERE state = 'dead'") == 2)
        assert scalar(srv.platform.db, "SELECT max(status) FROM runs") == "timeout"
    runtime.close()


def test_extra_route_hooks_mount_the_openai_api_beside_ingress(tmp_path, make_runtime):
    from wasmflow.platform.app import Platform, default_route_hooks

    runtime = make_runtime(tmp_path / "app", "flows: []\n")
    platform = Platform(runtime, Options(workers=1))
    app = platform.create_app(default_route_hooks())
    paths = {r.resource.canonical for r in app.router.routes()}
    assert {"/webhooks/github", "/healthz", "/metrics", "/v1/models", "/v1/chat/completions"} <= paths
    platform.stop()
    runtime.close()


def test_every_answered_delivery_leaves_the_claim_loop_free_to_run(server):
    """The ingress marks each delivery it answers (platform/ack_first.py), errors included, so the claim
    loop, which waits while a delivery is in progress, is never left waiting for one that ended."""
    body = json.dumps({"zen": "hi"}).encode()
    headers = {"X-GitHub-Event": "ping", "X-GitHub-Delivery": "x2", "Content-Type": "application/json"}
    assert requests.post(f"{server.base}/webhooks/github", data=body, headers=headers).status_code == 401
    assert requests.post(f"{server.base}/webhooks/github", data=b"[" * 100, headers={
        **headers, "X-Hub-Signature-256": signed(b"[" * 100)}).status_code == 400
    resp = deliver(server.base, "pull_request", {"action": "opened", "repository": {"full_name": "acme/app"}})
    assert resp.status_code == 202
    acks = server.platform.ack_first
    wait_until(lambda: not acks.busy())
    assert acks._answering == 0
    event = resp.json()["event"]
    assert wait_until(lambda: all(r.state == "done" for r in runs_for_event(server.platform.db, event)) or None)
