"""The console's JSON API and its login, against a real server: every endpoint, auth and CSRF failures."""

from __future__ import annotations

import json
import time

import pytest
import requests

from console_support import TOKEN, console_server, login  # noqa: F401  (fixture)
from platform_support import SECRET, deliver, wait_until

BEARER = {"Authorization": f"Bearer {TOKEN}"}


def run_state(base: str, run_id: str) -> dict:
    return requests.get(f"{base}/api/runs/{run_id}", headers=BEARER, timeout=10).json()


def finished(base: str, run_id: str) -> dict:
    return wait_until(lambda: (lambda r: r if r["state"] in ("done", "dead") else None)(run_state(base, run_id)))


def test_every_protected_path_refuses_missing_and_wrong_credentials(console_server):
    base = console_server.base
    for path in ("/api/runs", "/api/flows", "/api/events", "/api/models", "/api/runs/x", "/api/live/runs",
                 "/api/nothing-here"):
        missing = requests.get(base + path, timeout=10)
        assert missing.status_code == 401, path
        assert missing.json() == {"error": "login required: send Authorization: Bearer <console token>"}
        wrong = requests.get(base + path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}, timeout=10)
        assert wrong.status_code == 403 and TOKEN not in wrong.text, path
    for path in ("/", "/runs", "/events", "/models", "/runs/abc", "/setup", "/setup/anything"):
        page = requests.get(base + path, timeout=10, allow_redirects=False)
        assert page.status_code == 401, path
        assert "/login?next=" in page.text and "<table" not in page.text
    post = requests.post(f"{base}/api/replay-dead", json={}, timeout=10)
    assert post.status_code == 401
    # The public paths stay public: a webhook, an HTTP trigger, health and metrics need no console login.
    assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{base}/metrics", timeout=10).status_code == 200
    assert requests.post(f"{base}/flows/ok", data=b"{}", timeout=10).status_code == 200
    assert deliver(base, "issues", {"action": "opened"}).status_code == 202


def test_login_with_a_wrong_token_gets_403_and_no_cookie(console_server):
    resp = requests.post(f"{console_server.base}/login", data={"token": "nope" * 8}, timeout=10,
                         allow_redirects=False)
    assert resp.status_code == 403 and "not valid" in resp.text
    assert "wasmflow_session" not in resp.cookies
    resp = requests.get(f"{console_server.base}/login", params={"token": TOKEN + "x"}, timeout=10,
                        allow_redirects=False)
    assert resp.status_code == 403


def test_login_sets_an_httponly_samesite_cookie_and_goes_only_to_local_paths(console_server):
    resp = requests.post(f"{console_server.base}/login", data={"token": TOKEN, "next": "https://evil.example/"},
                         timeout=10, allow_redirects=False)
    assert resp.status_code == 303 and resp.headers["Location"] == "/"
    cookie = resp.headers["Set-Cookie"]
    assert "wasmflow_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert TOKEN not in cookie
    resp = requests.get(f"{console_server.base}/login", params={"token": TOKEN, "next": "//evil.example"},
                        timeout=10, allow_redirects=False)
    assert resp.status_code == 303 and resp.headers["Location"] == "/"


def test_state_changing_requests_with_a_cookie_need_the_csrf_token(console_server):
    base = console_server.base
    session, csrf = login(base)
    body = deliver(base, "push", {"ref": "refs/heads/main", "repository": {"full_name": "acme/app"}}).json()
    dead = finished(base, body["runs"][0])
    assert dead["state"] == "dead"
    url = f"{base}/api/runs/{dead['id']}/replay"
    assert session.post(url, timeout=10).status_code == 403
    assert session.post(url, headers={"X-CSRF-Token": csrf[:-2] + "zz"}, timeout=10).status_code == 403
    assert session.post(url, data={"csrf_token": "wrong"}, timeout=10).status_code == 403
    assert run_state(base, dead["id"])["history"] == [
        {k: dead["history"][0][k] for k in ("id", "seq", "state", "status", "created_at")}]  # nothing replayed
    ok = session.post(url, headers={"X-CSRF-Token": csrf}, timeout=10)
    assert ok.status_code == 202, ok.text
    assert len(ok.json()["queued"]) == 1
    # The form field works too (the logout form uses it), and logging out ends the session.
    out = session.post(f"{base}/logout", data={"csrf_token": csrf}, timeout=10, allow_redirects=False)
    assert out.status_code == 303
    assert session.get(f"{base}/api/runs", timeout=10).status_code == 401


def test_runs_list_filters_and_keyset_pages(console_server):
    base = console_server.base
    ids = []
    for i in range(5):
        ids += deliver(base, "issues", {"action": "opened", "repository": {"full_name": f"acme/r{i % 2}"}}).json()["runs"]
    ids += deliver(base, "push", {"repository": {"full_name": "acme/r0"}}).json()["runs"]
    for run_id in ids:
        finished(base, run_id)
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = requests.get(f"{base}/api/runs", params=params, headers=BEARER, timeout=10).json()
        seen += [r["id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))  # every run once, across pages
    created = [run_state(base, i)["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)

    def get(**params):
        return requests.get(f"{base}/api/runs", params=params, headers=BEARER, timeout=10).json()["runs"]

    assert {r["flow"] for r in get(flow="broken")} == {"broken"} and len(get(flow="broken")) == 1
    assert [r["state"] for r in get(state="dead")] == ["dead"]
    assert len(get(repo="acme/r1")) == 2 and all(r["repo"] == "acme/r1" for r in get(repo="acme/r1"))
    assert len(get(status="ok", flow="ok")) == 5
    assert get(trigger="schedule") == []
    assert len(get(since=time.time() - 600)) == 6 and get(until=time.time() - 600) == []
    for bad in ({"state": "bogus"}, {"since": "yesterday"}, {"limit": "0"}, {"cursor": "garbage!"}, {"since": "nan"}):
        resp = requests.get(f"{base}/api/runs", params=bad, headers=BEARER, timeout=10)
        assert resp.status_code == 400 and "error" in resp.json(), bad


def test_run_detail_shows_the_event_with_secrets_redacted(console_server):
    base = console_server.base
    payload = {"action": "opened", "repository": {"full_name": "acme/app"},
               "installation": {"id": 7, "access_token": "ghs_supersecretvalue"}}
    run_id = deliver(base, "issues", payload, delivery="del-42").json()["runs"][0]
    run = finished(base, run_id)
    assert run["state"] == "done" and run["status"] == "ok"
    assert json.loads(run["output"]) == {"ok": True}
    assert run["attempts"][0]["worker"] == console_server.platform.owner
    event = run["event"]
    assert event["delivery_id"] == "del-42" and event["name"] == "issues"
    assert event["headers"]["x-hub-signature-256"] == "[redacted]"
    assert "ghs_supersecretvalue" not in json.dumps(run) and "ghs_supersecretvalue" not in event["payload"]
    assert json.loads(event["payload"])["installation"] == {"id": 7, "access_token": "[redacted]"}
    assert "activity" in run
    assert requests.get(f"{base}/api/runs/{run_id[:8]}", headers=BEARER, timeout=10).json()["id"] == run_id
    assert requests.get(f"{base}/api/runs/nope", headers=BEARER, timeout=10).status_code == 404
    # The page shows the same, redacted: the signature is on no page.
    session, _ = login(base)
    page = session.get(f"{base}/runs/{run_id}", timeout=10).text
    assert "del-42" in page and "[redacted]" in page and "ghs_supersecretvalue" not in page and SECRET not in page


def test_replay_of_a_run_and_a_delivery_and_refusals(console_server):
    base = console_server.base
    run_id = deliver(base, "push", {"repository": {"full_name": "acme/app"}}, delivery="del-push").json()["runs"][0]
    finished(base, run_id)
    resp = requests.post(f"{base}/api/runs/{run_id}/replay", headers=BEARER, timeout=10)
    assert resp.status_code == 202
    (new_id,) = resp.json()["queued"]
    again = finished(base, new_id)
    assert again["replay_of"] == run_id and again["seq"] == 1
    resp = requests.post(f"{base}/api/deliveries/del-push/replay", headers=BEARER, timeout=10)
    assert resp.status_code == 202 and len(resp.json()["queued"]) == 1
    assert requests.post(f"{base}/api/deliveries/nope/replay", headers=BEARER, timeout=10).status_code == 409
    assert requests.post(f"{base}/api/runs/nope/replay", headers=BEARER, timeout=10).status_code == 404


def test_replay_dead_replays_each_dead_run_matching_the_filter_once(console_server):
    base = console_server.base
    dead = [deliver(base, "push", {"repository": {"full_name": f"acme/{n}"}}).json()["runs"][0] for n in ("a", "b", "a")]
    ok = deliver(base, "issues", {"repository": {"full_name": "acme/a"}}).json()["runs"][0]
    for run_id in [*dead, ok]:
        finished(base, run_id)
    dry = requests.post(f"{base}/api/replay-dead?dry_run=1", json={"repo": "acme/a"}, headers=BEARER, timeout=10)
    assert dry.status_code == 200 and dry.json()["matched"] == 2 and dry.json()["queued"] == []
    resp = requests.post(f"{base}/api/replay-dead", json={"repo": "acme/a"}, headers=BEARER, timeout=10)
    assert resp.status_code == 202 and len(resp.json()["queued"]) == 2 and resp.json()["failed"] == []
    replayed = {run_state(base, i)["replay_of"] for i in resp.json()["queued"]}
    assert replayed == {dead[0], dead[2]}
    for run_id in resp.json()["queued"]:
        finished(base, run_id)
    # The originals now have a later replay: a second bulk replay takes only the replays (dead again).
    second = requests.post(f"{base}/api/replay-dead?dry_run=1", json={"repo": "acme/a"}, headers=BEARER, timeout=10)
    assert second.json()["matched"] == 2
    assert requests.post(f"{base}/api/replay-dead", data=b"[1]", headers={**BEARER, "Content-Type": "application/json"},
                         timeout=10).status_code == 400
    assert requests.post(f"{base}/api/replay-dead", json={"since": "x"}, headers=BEARER, timeout=10).status_code == 400


def test_cancel_a_queued_and_a_running_run(console_server):
    base = console_server.base
    # One run slot, and the dispatcher claims one run ahead: two spinning runs keep a third queued.
    spinning, ahead = (deliver(base, "workflow_run", {"action": "requested"}).json()["runs"][0] for _ in range(2))
    wait_until(lambda: run_state(base, spinning)["state"] == run_state(base, ahead)["state"] == "running")
    queued = deliver(base, "issues", {"action": "opened"}).json()["runs"][0]
    time.sleep(0.3)  # a few dispatcher polls: it would have claimed the run by now if it had room
    assert run_state(base, queued)["state"] == "queued"
    resp = requests.post(f"{base}/api/runs/{queued}/cancel", headers=BEARER, timeout=10)
    assert resp.status_code == 202 and resp.json()["outcome"] == "cancelled"
    assert run_state(base, queued)["status"] == "cancelled"
    resp = requests.post(f"{base}/api/runs/{spinning}/cancel", headers=BEARER, timeout=10)
    assert resp.status_code == 202 and resp.json()["outcome"] == "cancelling"
    stopped = finished(base, spinning)
    assert stopped["status"] == "cancelled" and stopped["cancelled_by"] == "api"
    requests.post(f"{base}/api/runs/{ahead}/cancel", headers=BEARER, timeout=10)
    assert finished(base, ahead)["status"] == "cancelled"
    again = requests.post(f"{base}/api/runs/{queued}/cancel", headers=BEARER, timeout=10)
    assert again.status_code == 409 and again.json()["outcome"] == "finished"
    assert requests.post(f"{base}/api/runs/nope/cancel", headers=BEARER, timeout=10).status_code == 404


def test_events_flows_and_models(console_server):
    base = console_server.base
    deliver(base, "issues", {"action": "opened", "repository": {"full_name": "acme/app"}}, delivery="dup-1")
    deliver(base, "issues", {"action": "opened", "repository": {"full_name": "acme/app"}}, delivery="dup-1")
    deliver(base, "star", {"action": "created"}, delivery="ign-1")
    events = requests.get(f"{base}/api/events", headers=BEARER, timeout=10).json()
    by_delivery = {e["delivery_id"]: e for e in events["events"]}
    assert set(by_delivery) == {"dup-1", "ign-1"}
    assert by_delivery["ign-1"]["status"] == "ignored" and "no flow takes star" in by_delivery["ign-1"]["note"]
    assert [r["flow"] for r in by_delivery["dup-1"]["runs"]] == ["ok"]
    assert events["received"]["duplicate"] == 1 and events["received"]["ignored"] == 1
    ignored = requests.get(f"{base}/api/events", params={"status": "ignored"}, headers=BEARER, timeout=10).json()
    assert [e["delivery_id"] for e in ignored["events"]] == ["ign-1"]
    assert requests.get(f"{base}/api/events", params={"status": "x"}, headers=BEARER, timeout=10).status_code == 400
    flows = {f["name"]: f for f in requests.get(f"{base}/api/flows", headers=BEARER, timeout=10).json()["flows"]}
    assert set(flows) == {"ok", "broken", "spin"}
    assert flows["ok"]["runs_24h"] == 1 and flows["ok"]["last_status"] == "ok" or flows["ok"]["last_state"] == "queued"
    assert len(flows["ok"]["digest"]) == 64 and flows["ok"]["engine"] == "wasmtime"
    assert "http: POST /flows/ok" in flows["ok"]["triggers"]
    models = requests.get(f"{base}/api/models", headers=BEARER, timeout=10).json()
    assert models["models"] == {} and models["configured"] == []
    assert models["llm_tokens_24h"] == 0  # these guests call no model


@pytest.mark.parametrize("path", ["/", "/runs", "/events", "/models", "/runs?state=dead", "/events?status=ignored"])
def test_pages_render_for_a_logged_in_operator(console_server, path):
    session, csrf = login(console_server.base)
    resp = session.get(console_server.base + path, timeout=10)
    assert resp.status_code == 200 and csrf in resp.text
    assert "Content-Security-Policy" in resp.headers and resp.headers["X-Frame-Options"] == "DENY"
    assert TOKEN not in resp.text


def test_hostile_text_from_events_and_guests_is_shown_as_text(console_server):
    base = console_server.base
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    resp = deliver(base, "issues", {"action": "opened", "repository": {"full_name": evil}, "title": evil})
    assert resp.status_code == 202, resp.text
    run_id = resp.json()["runs"][0]
    finished(base, run_id)
    session, _ = login(base)
    for path in ("/runs", f"/runs/{run_id}", "/events", f"/runs?repo={requests.utils.quote(evil)}"):
        page = session.get(base + path, timeout=10)
        assert page.status_code == 200, path
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        assert "&lt;script&gt;" in page.text, path  # shown, escaped


def test_odd_paths_and_ids_get_clean_errors(console_server):
    base = console_server.base
    for path in ("/static/../auth.py", "/static/%2e%2e/auth.py", "/static/nothing.css"):
        resp = requests.get(base + path, timeout=10)
        assert resp.status_code in (401, 403, 404) and "def " not in resp.text, path
    assert requests.get(f"{base}/static/console.css", timeout=10).status_code == 200  # public, no login
    long_id = "a" * 5000
    assert requests.get(f"{base}/api/runs/{long_id}", headers=BEARER, timeout=10).status_code == 404
    assert requests.get(f"{base}/api/runs/%25%25%25%25%25%25", headers=BEARER, timeout=10).status_code == 404
    resp = requests.post(f"{base}/api/runs/{long_id}/cancel", headers=BEARER, timeout=10)
    assert resp.status_code == 404 and "Traceback" not in resp.text
    session, _ = login(base)
    assert session.get(f"{base}/runs/{long_id}", timeout=10).status_code == 404
    assert session.get(f"{base}/runs?since=soon", timeout=10).status_code == 400
    huge = requests.get(f"{base}/api/runs", params={"flow": "x" * 100_000}, headers=BEARER, timeout=10)
    assert huge.status_code in (200, 400, 414, 431)


def test_models_page_reads_the_wasi_nn_registry(tmp_path, make_runtime):
    from optional_support import need_module

    need_module("onnxruntime", "ONNX Runtime (pip install -e '.[nn]')")
    from console_support import flows_yaml
    from platform_support import ServerThread
    from wasmflow.platform.app import Options
    from wasmflow.wasi_nn.testmodels import write_tiny_onnx

    model = write_tiny_onnx(tmp_path / "models" / "tiny.onnx")
    text = f"models:\n  tiny: {{backend: onnx, path: {model}, target: cpu}}\n" + flows_yaml(tmp_path / "wasm")
    runtime = make_runtime(tmp_path / "app", text)
    with ServerThread(runtime, Options(workers=1, poll_interval=0.05, console_token=TOKEN)) as srv:
        body = requests.get(f"{srv.base}/api/models", headers=BEARER, timeout=10).json()
        assert body["configured"] == ["tiny"]
        stats = body["models"]["tiny"]
        assert stats["backend"] == "onnx" and {"busy", "waiting", "loaded"} <= set(stats)
        session, _ = login(srv.base)
        page = session.get(f"{srv.base}/models", timeout=10).text
        assert 'data-model="tiny"' in page and "waiting" in page
