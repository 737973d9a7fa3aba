"""The one-click GitHub App (the manifest flow), end to end over HTTP against the GitHub stand-in.

/setup computes the manifest from flows.yaml, the stand-in plays GitHub's form and conversion endpoint,
the callback stores the credentials owner-only, and flows.yaml then loads them with no hand editing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from aiohttp import web

from github_manifest_support import (EXPECTED_EVENTS, EXPECTED_PERMISSIONS, TOKEN, SetupServer, load, parse,
                                     text_of, write_flows)
from wasmflow.devtools.github_standin import GithubStandin
from wasmflow.loopback import LoopbackServer
from wasmflow.flows.github_credentials import (KEY_FILE, CredentialsError, credentials_dir, load_app)
from wasmflow.flows.loader import FlowsError
from wasmflow.host_functions.github import GithubApp, load_private_key
from wasmflow.platform import github_manifest as gm

PUBLIC = "https://wasmflow.example.com"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def standin() -> Iterator[GithubStandin]:
    with GithubStandin() as server:
        yield server


@pytest.fixture
def flows_path(tmp_path: Path) -> Path:
    return write_flows(tmp_path)


@pytest.fixture
def setup_server(flows_path: Path, standin: GithubStandin) -> Iterator[SetupServer]:
    loaded = load(flows_path, {"GITHUB_API_URL": standin.url})
    with SetupServer(loaded, standin.url, public_url=PUBLIC) as server:
        yield server


def _setup_page(server: SetupServer, query: str = "") -> tuple[str, dict]:
    resp = requests.get(f"{server.url}/setup{query}", headers=AUTH, timeout=10)
    assert resp.status_code == 200, resp.text
    form = parse(resp.text).forms["manifest-form"]
    return resp.text, form


def _post_to_github(form: dict) -> dict[str, str]:
    """The browser's part: post the manifest form to GitHub, read where GitHub sends it back."""
    resp = requests.post(form["action"], data={"manifest": form["fields"]["manifest"]}, allow_redirects=False,
                         timeout=10)
    assert resp.status_code == 302, resp.text
    location = resp.headers["Location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    return {"location": location, **query}


def _callback(server: SetupServer, code: str, state: str) -> requests.Response:
    return requests.get(f"{server.url}/setup/callback", params={"code": code, "state": state}, headers=AUTH,
                        timeout=30)


# -- computing the manifest ---------------------------------------------------------------------------


def test_the_manifest_is_computed_from_the_flows(flows_path: Path) -> None:
    plan = gm.plan(load(flows_path, {}).file, PUBLIC + "/", org="octo-org")
    assert plan.events == EXPECTED_EVENTS
    assert plan.permissions == EXPECTED_PERMISSIONS
    assert plan.flows == ["hello", "code-review", "nightly"]  # local-only uses no GitHub
    assert plan.webhook_url == PUBLIC + "/webhooks/github"
    assert plan.redirect_url == PUBLIC + "/setup/callback"
    manifest = plan.manifest()
    assert manifest["hook_attributes"] == {"url": PUBLIC + "/webhooks/github", "active": True}
    assert manifest["default_events"] == EXPECTED_EVENTS and manifest["public"] is False
    assert len(manifest["name"]) <= 34 and "wasmflow.example.com" in manifest["name"]
    assert gm.form_action("https://github.com", "s1", plan.org) == \
        "https://github.com/organizations/octo-org/settings/apps/new?state=s1"
    assert gm.form_action("https://github.com", "s1") == "https://github.com/settings/apps/new?state=s1"


def test_notes_name_what_github_cannot_do(tmp_path: Path) -> None:
    text = ("flows:\n  - name: all\n    module: a.wasm\n    on:\n      - github: {events: ['*', sponsorship]}\n")
    plan = gm.plan(load(write_flows(tmp_path, text), {}).file, "http://127.0.0.1:8080")
    joined = " ".join(plan.notes)
    assert "every event (*)" in joined
    assert "sponsorship" in joined  # no known permission: the operator is told what to do
    assert "loopback" in joined  # GitHub cannot deliver to 127.0.0.1
    assert plan.events == ["sponsorship"] and plan.permissions == {}


@pytest.mark.parametrize("api, web", [
    ("https://api.github.com", "https://github.com"),
    ("https://ghe.example.com/api/v3", "https://ghe.example.com"),
    ("https://api.octocorp.ghe.com", "https://octocorp.ghe.com"),
    ("http://127.0.0.1:9999", "http://127.0.0.1:9999"),
])
def test_github_enterprise_web_address_follows_the_api_url(api: str, web: str) -> None:
    assert gm.web_base_url(api) == web
    assert gm.web_base_url(api, "https://elsewhere.example/") == "https://elsewhere.example"


@pytest.mark.parametrize("url", ["", "ftp://x", "https://", "https://h/?q=1", "https://u:p@h", "javascript:alert(1)",
                                 "https://h/#frag"])
def test_a_bad_public_url_gets_a_clear_error(url: str, flows_path: Path) -> None:
    with pytest.raises(gm.ManifestError, match="WASMFLOW_PUBLIC_URL"):
        gm.plan(load(flows_path, {}).file, url)


@pytest.mark.parametrize("org", ["-bad", "a/b", "x" * 40, "org?state=1"])
def test_a_bad_organization_is_refused(org: str, flows_path: Path) -> None:
    with pytest.raises(gm.ManifestError, match="organization"):
        gm.plan(load(flows_path, {}).file, PUBLIC, org=org)


def test_states_are_good_once() -> None:
    states = gm.PendingStates(ttl=60)
    first, second = states.issue(), states.issue()
    assert first != second
    assert states.take(first) and not states.take(first)
    assert not states.take("made-up") and not states.take(None) and not states.take("")
    expired = gm.PendingStates(ttl=0.0)
    assert not expired.take(expired.issue())


# -- the whole flow against the stand-in --------------------------------------------------------------


def test_setup_registers_the_app_and_flows_yaml_picks_it_up(setup_server: SetupServer, standin: GithubStandin,
                                                           flows_path: Path, tmp_path: Path) -> None:
    page, form = _setup_page(setup_server)
    manifest = json.loads(form["fields"]["manifest"])
    assert manifest["default_events"] == EXPECTED_EVENTS
    assert manifest["default_permissions"] == EXPECTED_PERMISSIONS
    assert manifest["hook_attributes"]["url"] == PUBLIC + "/webhooks/github"
    assert form["action"].startswith(standin.url + "/settings/apps/new?state=")
    shown = text_of(page)
    assert all(event in shown for event in EXPECTED_EVENTS) and "pull_requests" in shown

    back = _post_to_github(form)
    assert back["location"].startswith(PUBLIC + "/setup/callback?")  # GitHub returns to the manifest's URL
    assert back["state"] == parse_qs(urlsplit(form["action"]).query)["state"][0]
    done = _callback(setup_server, back["code"], back["state"])
    assert done.status_code == 200, done.text
    app = standin.registered_apps[-1]
    assert parse(done.text).links["install-link"] == f"{standin.url}/apps/{app['slug']}/installations/new"
    assert requests.get(parse(done.text).links["install-link"], timeout=10).status_code == 200
    assert app["pem"] not in done.text and app["webhook_secret"] not in done.text
    assert app["client_secret"] not in done.text

    directory = credentials_dir(tmp_path / "state")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["app.json", "client-secret", "private-key.pem", "webhook-secret"]
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    loaded = load(flows_path, {"GITHUB_API_URL": standin.url})
    github = loaded.file.github
    assert github is not None and github.app_id == app["id"]
    assert github.webhook_secret == app["webhook_secret"]
    assert load_private_key(github.private_key, loaded.base_dir).strip() == app["pem"].strip()
    # The stored key really is the App's: GitHub (the stand-in) accepts its JWT for an installation token.
    client = GithubApp(github.app_id, load_private_key(github.private_key, loaded.base_dir), api_url=github.api_url)
    assert client.installation_token(standin.installation_id).startswith("ghs_")


def test_a_code_used_twice_shows_a_clear_error_page(setup_server: SetupServer, standin: GithubStandin) -> None:
    _, form = _setup_page(setup_server)
    back = _post_to_github(form)
    assert _callback(setup_server, back["code"], back["state"]).status_code == 200
    _, again = _setup_page(setup_server)  # a fresh state, the old code: only GitHub can refuse it now
    state = parse_qs(urlsplit(again["action"]).query)["state"][0]
    resp = _callback(setup_server, back["code"], state)
    assert resp.status_code == 400
    assert "used already or it expired" in text_of(resp.text)
    assert "Traceback" not in resp.text
    conversions = [r for r in standin.requests if r.path.endswith("/conversions")]
    assert [r.status for r in conversions] == [201, 404]  # GitHub's answer for a spent code


def test_an_expired_code_is_refused(setup_server: SetupServer, standin: GithubStandin, tmp_path: Path) -> None:
    _, form = _setup_page(setup_server)
    back = _post_to_github(form)
    standin.expire_manifest_codes()
    resp = _callback(setup_server, back["code"], back["state"])
    assert resp.status_code == 400 and "expired" in text_of(resp.text)
    assert not credentials_dir(tmp_path / "state").exists()


def test_a_wrong_state_is_refused_before_github_is_asked(setup_server: SetupServer, standin: GithubStandin,
                                                        tmp_path: Path) -> None:
    _, form = _setup_page(setup_server)
    back = _post_to_github(form)
    for state in ("forged-state", ""):
        resp = _callback(setup_server, back["code"], state)
        assert resp.status_code == 400
        assert "not started here" in text_of(resp.text)
    assert not [r for r in standin.requests if r.path.endswith("/conversions")]
    assert not credentials_dir(tmp_path / "state").exists()
    # The right state still works afterwards: a forged callback did not spend it.
    assert _callback(setup_server, back["code"], back["state"]).status_code == 200


def test_setup_needs_the_console_login(setup_server: SetupServer) -> None:
    for path in ("/setup", "/setup/callback?code=x&state=y"):
        assert requests.get(setup_server.url + path, timeout=10, allow_redirects=False).status_code == 401
        wrong = requests.get(setup_server.url + path, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 403 and "github" not in wrong.text.lower()


def test_the_organization_form_and_the_stand_in_org_endpoint(setup_server: SetupServer,
                                                            standin: GithubStandin) -> None:
    _, form = _setup_page(setup_server, "?org=octo-org")
    assert "/organizations/octo-org/settings/apps/new?state=" in form["action"]
    back = _post_to_github(form)
    assert _callback(setup_server, back["code"], back["state"]).status_code == 200
    assert standin.registered_apps[-1]["owner"] == {"login": "octo-org", "id": standin.registered_apps[-1]["id"] + 7,
                                                    "type": "Organization"}
    bad = requests.get(f"{setup_server.url}/setup", params={"org": "<script>"}, headers=AUTH, timeout=10)
    assert bad.status_code == 200 and "not a GitHub organization name" in text_of(bad.text)
    assert "<script>" not in bad.text and "manifest-form" not in bad.text


# -- GitHub's side, as the stand-in plays it ----------------------------------------------------------


def test_the_stand_in_refuses_manifests_github_would_refuse(standin: GithubStandin) -> None:
    good = {"name": "x", "url": PUBLIC, "redirect_url": PUBLIC + "/cb", "hook_attributes": {"url": PUBLIC + "/h"},
            "default_events": ["pull_request"], "default_permissions": {"pull_requests": "read"}}
    cases = [({**good, "default_permissions": {}}, "Default events unsupported: pull_request"),
             ({**good, "name": "n" * 35}, "too long"), ({**good, "redirect_url": "nowhere"}, "Redirect URL"),
             ({**good, "default_permissions": {"issues": "admin"}}, "read or write")]
    for manifest, message in cases:
        resp = requests.post(standin.url + "/settings/apps/new", data={"manifest": json.dumps(manifest)},
                             allow_redirects=False, timeout=10)
        assert resp.status_code == 422 and message in resp.text, manifest
    assert requests.post(standin.url + "/settings/apps/new", data={"manifest": "{"}, timeout=10).status_code == 422
    ok = requests.post(standin.url + "/settings/apps/new?state=s", data={"manifest": json.dumps(good)},
                       allow_redirects=False, timeout=10)
    assert ok.status_code == 302 and ok.headers["Location"].startswith(PUBLIC + "/cb?code=")
    unknown = requests.post(standin.url + "/app-manifests/feedface/conversions", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["message"] == "Not Found"


def test_exchange_errors_are_clear(standin: GithubStandin, tmp_path: Path) -> None:
    for code in ("../../app", "a b", "", "x" * 200):
        with pytest.raises(gm.ManifestError, match="no valid code"):
            asyncio.run(gm.exchange(standin.url, code))
    assert not [r for r in standin.requests if "conversions" in r.path]
    with pytest.raises(gm.ManifestError, match="cannot reach GitHub's API"):
        asyncio.run(gm.exchange("http://127.0.0.1:9", "abc123", timeout=5))
    with pytest.raises(gm.ManifestError, match="used already or it expired"):
        asyncio.run(gm.register(tmp_path, standin.url, standin.url, "abc123"))
    assert not credentials_dir(tmp_path).exists()


# -- the stored credentials and flows.yaml ------------------------------------------------------------


def _register_directly(standin: GithubStandin, state_dir: Path) -> dict:
    manifest = gm.plan(load(write_flows(state_dir.parent), {}).file, PUBLIC).manifest()
    resp = requests.post(standin.url + "/settings/apps/new", data={"manifest": json.dumps(manifest)},
                         allow_redirects=False, timeout=10)
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    asyncio.run(gm.register(state_dir, standin.url, standin.url, code))
    return standin.registered_apps[-1]


def test_explicit_values_in_flows_yaml_win(standin: GithubStandin, tmp_path: Path) -> None:
    app = _register_directly(standin, tmp_path / "state")
    pem = tmp_path / "mine.pem"
    pem.write_text("-----BEGIN RSA PRIVATE KEY-----\nx\n-----END RSA PRIVATE KEY-----\n")
    env = {"GITHUB_APP_ID": "99", "GITHUB_WEBHOOK_SECRET": "mine", "GITHUB_APP_PRIVATE_KEY": str(pem),
           "GITHUB_API_URL": "https://ghe.example.com/api/v3"}
    github = load(tmp_path / "flows.yaml", env).file.github
    assert github is not None
    assert (str(github.app_id), github.webhook_secret, github.private_key, github.api_url) == \
        ("99", "mine", str(pem), "https://ghe.example.com/api/v3")
    only_secret = load(tmp_path / "flows.yaml", {"GITHUB_WEBHOOK_SECRET": "mine"}).file.github
    assert only_secret is not None and only_secret.webhook_secret == "mine" and only_secret.app_id == app["id"]
    assert only_secret.api_url == standin.url  # the stored App's API, flows.yaml left the default


def test_no_github_section_at_all_is_filled_from_the_store(standin: GithubStandin, tmp_path: Path) -> None:
    app = _register_directly(standin, tmp_path / "state")
    path = write_flows(tmp_path, "state_dir: state\nflows: []\n")
    github = load(path, {}).file.github
    assert github is not None and github.app_id == app["id"] and github.api_url == standin.url


def test_credentials_others_can_read_are_refused(standin: GithubStandin, tmp_path: Path) -> None:
    _register_directly(standin, tmp_path / "state")
    key = credentials_dir(tmp_path / "state") / KEY_FILE
    os.chmod(key, 0o644)
    with pytest.raises(FlowsError, match="chmod 600") as info:
        load(tmp_path / "flows.yaml", {})
    assert "BEGIN" not in str(info.value)
    os.chmod(key, 0o600)
    os.chmod(key.parent, 0o755)
    with pytest.raises(CredentialsError, match="chmod 700"):
        load_app(tmp_path / "state")
    os.chmod(key.parent, 0o700)
    assert load_app(tmp_path / "state") is not None


def test_broken_or_linked_credentials_get_a_clear_error(standin: GithubStandin, tmp_path: Path) -> None:
    _register_directly(standin, tmp_path / "state")
    directory = credentials_dir(tmp_path / "state")
    meta = directory / "app.json"
    meta.write_text("{not json")
    with pytest.raises(FlowsError, match="run it again"):
        load(tmp_path / "flows.yaml", {})
    meta.unlink()
    secret = tmp_path / "elsewhere"
    secret.write_text("{}")
    os.chmod(secret, 0o600)
    meta.symlink_to(secret)
    with pytest.raises(CredentialsError, match="link"):
        load_app(tmp_path / "state")


def test_registering_again_keeps_the_first_app(standin: GithubStandin, tmp_path: Path) -> None:
    first = _register_directly(standin, tmp_path / "state")
    second = _register_directly(standin, tmp_path / "state")
    assert first["id"] != second["id"]
    stored = load_app(tmp_path / "state")
    assert stored is not None and stored.app_id == second["id"]
    kept = [p for p in (tmp_path / "state").iterdir() if p.name.startswith("github-app.replaced-")]
    assert len(kept) == 1 and json.loads((kept[0] / "app.json").read_text())["app_id"] == first["id"]


class _HostileApi(LoopbackServer):
    """An API URL that answers the conversion with whatever the test says (a misconfigured or hostile host)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__()
        self.status, self.body = status, body

    def app(self) -> web.Application:
        app = web.Application()

        async def answer(_: web.Request) -> web.Response:
            return web.Response(status=self.status, body=self.body, content_type="application/json")

        app.router.add_post("/app-manifests/{code}/conversions", answer)
        return app


GOOD_ANSWER = {"id": 7, "slug": "s", "pem": "-----BEGIN RSA PRIVATE KEY-----\nx\n-----END RSA PRIVATE KEY-----",
               "webhook_secret": "w", "client_id": "c", "client_secret": "cs", "html_url": "https://github.com/apps/s"}


@pytest.mark.parametrize("status, body, message", [
    (201, {**GOOD_ANSWER, "html_url": "javascript:alert(1)"}, "not http"),
    (201, {**GOOD_ANSWER, "pem": "not a key"}, "not a PEM"),
    (201, {**GOOD_ANSWER, "id": True}, "no App id"),
    (201, {k: v for k, v in GOOD_ANSWER.items() if k != "webhook_secret"}, "no webhook_secret"),
    (201, b"[" * 200_000, "answered 201"),
    (201, b"x" * (gm.MAX_ANSWER + 10), "answered 201"),
    (500, {"message": "\x1b[2Jboom"}, "answered 500"),
    (422, {"message": "Validation Failed"}, "refused to create the App (Validation Failed)"),
])
def test_an_unusable_conversion_answer_stores_nothing(status: int, body: object, message: str,
                                                      tmp_path: Path) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with _HostileApi(status, raw) as api:
        with pytest.raises(gm.ManifestError, match=re.escape(message)):
            asyncio.run(gm.register(tmp_path, api.url, api.url, "abc123"))
    assert not credentials_dir(tmp_path).exists()
    with _HostileApi(201, json.dumps(GOOD_ANSWER).encode()) as api:  # the same server, a usable answer
        assert asyncio.run(gm.register(tmp_path, api.url, api.url, "abc123")).app_id == 7


def test_the_registrar_reads_github_enterprise_from_flows_yaml(tmp_path: Path) -> None:
    text = ("github: {app_id: 0, private_key: '', webhook_secret: '', api_url: 'https://ghe.example.com/api/v3'}\n"
            "flows: []\n")
    loaded = load(write_flows(tmp_path, text), {})
    registrar = gm.Registrar(loaded.file, loaded.state_dir, public_url=PUBLIC)
    assert (registrar.api_url, registrar.web_url) == ("https://ghe.example.com/api/v3", "https://ghe.example.com")
    assert registrar.form_action("s").startswith("https://ghe.example.com/settings/apps/new?state=")
    custom = write_flows(tmp_path, text.replace("}\n", ", web_url: 'https://web.example.com/'}\n", 1))
    assert gm.Registrar(load(custom, {}).file, tmp_path).web_url == "https://web.example.com"
    with pytest.raises(gm.ManifestError, match="--public-url"):
        gm.Registrar(loaded.file, loaded.state_dir).plan()


@pytest.mark.parametrize("state_dir", ['"a\\0b"', "x" * 5000, "flows.yaml/below-a-file"])
def test_a_state_dir_no_directory_can_have_holds_no_app(state_dir: str, tmp_path: Path) -> None:
    loaded = load(write_flows(tmp_path, f"state_dir: {state_dir}\nflows: []\n"), {})
    assert loaded.file.github is None


def test_a_linked_credentials_directory_is_refused(standin: GithubStandin, tmp_path: Path) -> None:
    _register_directly(standin, tmp_path / "real")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "github-app").symlink_to(tmp_path / "real" / "github-app")
    with pytest.raises(FlowsError, match="not a directory"):
        load(tmp_path / "flows.yaml", {})
