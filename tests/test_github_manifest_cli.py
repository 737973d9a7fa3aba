"""`wasmflow github register` on a headless machine: the printed table and URL, the temporary callback
server, and `--code` to finish the exchange, as real subprocesses against the GitHub stand-in."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from github_manifest_support import EXPECTED_EVENTS, load, parse, text_of, write_flows
from wasmflow.devtools.github_standin import GithubStandin
from wasmflow.flows.github_credentials import credentials_dir
from wasmflow.platform import github_manifest as gm

WASMFLOW = str(Path(sys.executable).with_name("wasmflow"))
PUBLIC = "https://review.example.org"


@pytest.fixture
def standin() -> Iterator[GithubStandin]:
    with GithubStandin() as server:
        yield server


def _env(standin: GithubStandin) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "WASMFLOW_"))}
    return {**env, "GITHUB_API_URL": standin.url, "COLUMNS": "120"}


def _read_until(proc: subprocess.Popen, prefix: str, deadline: float) -> tuple[str, list[str]]:
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line[len(prefix):].strip(), seen
    raise AssertionError(f"no {prefix!r} line; output so far: {''.join(seen)}")


def test_register_serves_a_page_and_a_callback_then_stores_the_app(standin: GithubStandin, tmp_path: Path) -> None:
    flows = write_flows(tmp_path)
    proc = subprocess.Popen([WASMFLOW, "github", "register", "--public-url", PUBLIC, "--flows", str(flows),
                             "--wait", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(standin))
    try:
        url, before = _read_until(proc, "open: ", time.monotonic() + 60)
        summary = "".join(before)
        assert "The GitHub App to create" in summary and PUBLIC + "/webhooks/github" in summary
        assert all(event in summary for event in EXPECTED_EVENTS) and "pull_requests: write" in summary
        page = requests.get(url, timeout=10)
        form = parse(page.text).forms["manifest-form"]
        manifest = json.loads(form["fields"]["manifest"])
        assert manifest["redirect_url"] == url.rstrip("/") + "/callback"  # back to this command, not to `up`
        assert manifest["hook_attributes"]["url"] == PUBLIC + "/webhooks/github"
        forged = requests.get(url.rstrip("/") + "/callback", params={"code": "abc", "state": "forged"}, timeout=10)
        assert forged.status_code == 400 and "not started here" in text_of(forged.text)
        done = requests.post(form["action"], data={"manifest": form["fields"]["manifest"]}, timeout=30)
        assert done.status_code == 200, done.text  # the stand-in redirected the "browser" to the command
        install = parse(done.text).links["install-link"]
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    app = standin.registered_apps[-1]
    assert f"install: {install}" in out and install.endswith(f"/apps/{app['slug']}/installations/new")
    assert app["pem"] not in out + err and app["webhook_secret"] not in out + err
    directory = credentials_dir(tmp_path / "state")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())
    github = load(flows, {"GITHUB_API_URL": standin.url}).file.github
    assert github is not None and github.app_id == app["id"] and github.webhook_secret == app["webhook_secret"]


def test_register_with_code_finishes_the_exchange_once(standin: GithubStandin, tmp_path: Path) -> None:
    flows = write_flows(tmp_path)
    manifest = gm.plan(load(flows, {}).file, PUBLIC).manifest()
    resp = requests.post(standin.url + "/settings/apps/new?state=s", data={"manifest": json.dumps(manifest)},
                         allow_redirects=False, timeout=10)
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    command = [WASMFLOW, "github", "register", "--code", code, "--flows", str(flows)]
    first = subprocess.run(command, capture_output=True, text=True, env=_env(standin), timeout=120)
    assert first.returncode == 0, first.stderr
    app = standin.registered_apps[-1]
    assert "GitHub App registered" in first.stdout and str(app["id"]) in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, env=_env(standin), timeout=120)
    assert again.returncode == 1
    assert "used already or it expired" in again.stderr and "Traceback" not in again.stderr
    assert load(flows, {}).file.github.app_id == app["id"]  # type: ignore[union-attr]


def test_register_without_a_public_url_says_what_to_pass(standin: GithubStandin, tmp_path: Path) -> None:
    flows = write_flows(tmp_path)
    result = subprocess.run([WASMFLOW, "github", "register", "--flows", str(flows), "--wait", "5"],
                            capture_output=True, text=True, env=_env(standin), timeout=120)
    assert result.returncode == 1
    assert "--public-url" in result.stderr and "WASMFLOW_PUBLIC_URL" in result.stderr
    assert "Traceback" not in result.stderr
    bad = subprocess.run([WASMFLOW, "github", "register", "--flows", str(flows), "--code", "../x"],
                         capture_output=True, text=True, env=_env(standin), timeout=120)
    assert bad.returncode == 1 and "no valid code" in bad.stderr
    assert not credentials_dir(tmp_path / "state").exists()


def test_up_serves_setup_with_its_public_url(tmp_path: Path) -> None:
    from platform_support import WasmflowProcess, free_port

    from github_manifest_support import FLOWS_YAML, TOKEN

    write_flows(tmp_path, FLOWS_YAML + "console: {token: " + TOKEN + "}\n")
    port = free_port()
    proc = WasmflowProcess(tmp_path, ["up", "--port", str(port), "--workers", "1", "--public-url", PUBLIC])
    try:
        base = proc.wait_healthy(port)
        page = requests.get(f"{base}/setup", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert page.status_code == 200, proc.log()
        manifest = json.loads(parse(page.text).forms["manifest-form"]["fields"]["manifest"])
        assert manifest["hook_attributes"]["url"] == PUBLIC + "/webhooks/github"
        assert manifest["redirect_url"] == PUBLIC + "/setup/callback"
        assert manifest["default_events"] == EXPECTED_EVENTS
        assert requests.get(f"{base}/setup", timeout=10, allow_redirects=False).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=60)
