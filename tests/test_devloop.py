"""`wasmflow dev`: a project made by `wasmflow new`, served, edited, broken and fixed while it serves.

Real parts throughout: the crate is compiled by cargo, served by the aiohttp server of `wasmflow up` on
127.0.0.1 and asked over HTTP. One test walks the whole loop so cargo's dependencies compile once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from optional_support import need_toolchain

from wasmflow.platform.dev import Changes, classify
from wasmflow.platform.ingress import sign
from wasmflow.platform.store import list_runs
from wasmflow.storage import default_url, open_database

SECRET = b"dev-loop-test-secret"


def _wait(what: str, check: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; dev's output:\n{log.read_text()}")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_classify_keeps_sources_and_flows_only(tmp_path: Path) -> None:
    flows = tmp_path / "flows.yaml"
    paths = [tmp_path / "agents/a/src/main.rs", tmp_path / "agents/a/Cargo.toml", flows,
             tmp_path / "target/wasm32-wasi/release/a.d", tmp_path / "target/debug/build/x/out/gen.rs",
             tmp_path / ".wasmflow/db.sqlite", tmp_path / "agents/a/README.md", Path("/elsewhere/x.rs")]
    changes = classify([str(p) for p in paths], flows, [tmp_path])
    assert changes.flows
    assert changes.crates == {(tmp_path / "agents/a/src/main.rs").resolve(), (tmp_path / "agents/a/Cargo.toml").resolve()}
    assert not Changes()


def test_dev_rebuilds_reloads_and_keeps_the_last_good_version(tmp_path: Path) -> None:
    need_toolchain()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WASMFLOW_")}
    env.update(NO_COLOR="1", COLUMNS="200", GITHUB_WEBHOOK_SECRET=SECRET.decode())
    wasmflow = [sys.executable, "-m", "wasmflow.cli"]
    subprocess.run([*wasmflow, "new", "hello"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    source = tmp_path / "agents" / "hello" / "src" / "main.rs"
    original = source.read_text()
    assert 'format!("{}, {}!", greeting, who)' in original

    log = tmp_path / "dev.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*wasmflow, "dev", "--port", "0", "--debounce", "200"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait("the first build and the server", lambda: "serving hello on http://" in log.read_text(), 300, log)
        port = re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text()).group(1)
        url = f"http://127.0.0.1:{port}/flows/hello"
        assert _get(url)["message"] == "Hello, world!"

        def answers(expected: str) -> Callable[[], bool]:
            def check() -> bool:
                try:
                    return _get(url)["message"] == expected
                except OSError as exc:  # refused or reset: dev must hold its socket through restarts
                    pytest.fail(f"{url} failed while dev serves: {exc}\n{log.read_text()}")
            return check

        # edit: a burst of saves is one rebuild, and the next request answers with the new code
        rebuilds = log.read_text().count("rebuilding")
        for n in range(3):  # 100 ms apart: less than --debounce 200
            source.write_text(original.replace('"{}, {}!"', f'"{{}}, {{}}! (v{n})"'))
            time.sleep(0.1)
        _wait("the new module", answers("Hello, world! (v2)"), 180, log)
        assert log.read_text().count("rebuilding") == rebuilds + 1, log.read_text()
        assert "reloaded hello" in log.read_text()

        # break it: the compiler's error is printed, the last good version keeps answering
        source.write_text(original.replace('"{}, {}!", greeting, who', '"{}, {}! (v3)", greeting who'))
        _wait("the build failure", lambda: "still serving the last good version" in log.read_text(), 180, log)
        text = log.read_text()
        assert re.search(r"error.*\n.*agents/hello/src/main\.rs:\d+", text), text
        assert _get(url)["message"] == "Hello, world! (v2)"

        # fix it: the new code answers
        source.write_text(original.replace('"{}, {}!"', '"{}, {}! (v3)"'))
        _wait("the fixed module", answers("Hello, world! (v3)"), 180, log)

        # flows.yaml that no longer validates: the validator's error, still serving
        flows = tmp_path / "flows.yaml"
        good = flows.read_text()
        flows.write_text(good.replace("limits: {timeout: 5s", "limits: {timeot: 5s"))
        _wait("the validation error", lambda: "flows.yaml does not validate" in log.read_text(), 60, log)
        assert "timeot" in log.read_text() and "did you mean" in log.read_text(), log.read_text()
        assert _get(url)["message"] == "Hello, world! (v3)"
        # and one that validates: the server restarts on the same port with the new configuration
        flows.write_text(good.replace("greeting: Hello", "greeting: Howdy").replace("timeout: 5s", "timeout: 60s"))
        _wait("the new flows.yaml", answers("Howdy, world! (v3)"), 120, log)

        # a run in flight finishes on the module it started with; the next run gets the rebuilt one
        slow = original.replace("fn run() -> wasmflow::Result<()> {", """fn run() -> wasmflow::Result<()> {
    if event::json().map(|b| b["slow"].as_bool() == Some(true)).unwrap_or(false) {
        std::thread::sleep(std::time::Duration::from_secs(12));
    }""")
        source.write_text(slow.replace('"{}, {}!"', '"{}, {}! (v4)"'))
        _wait("the slow-capable module", answers("Howdy, world! (v4)"), 180, log)
        in_flight: dict = {}

        def slow_request() -> None:
            request = urllib.request.Request(url, data=b'{"slow": true}', method="POST")
            with urllib.request.urlopen(request, timeout=120) as response:
                in_flight["answer"] = json.loads(response.read())["message"]
                in_flight["at"] = time.monotonic()

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(1.0)  # the slow run has started on v4
        source.write_text(slow.replace('"{}, {}!"', '"{}, {}! (v5)"'))
        _wait("the module rebuilt during the slow run", answers("Howdy, world! (v5)"), 180, log)
        switched = time.monotonic()
        thread.join(120)
        assert in_flight.get("answer") == "Howdy, world! (v4)", (in_flight, log.read_text())
        assert switched < in_flight["at"], "the new module answered only after the slow run ended"

        # queued runs survive a restart: 6 slow webhook runs on 4 run slots, flows.yaml changed meanwhile
        webhooks = good.replace("greeting: Hello", "greeting: Howdy").replace("timeout: 5s", "timeout: 60s") \
            .replace("      - http: {methods: [GET, POST]}\n",
                     "      - http: {methods: [GET, POST]}\n      - github: {events: [issues.opened]}\n")
        restarts = log.read_text().count("serving hello on")
        flows.write_text(webhooks)
        _wait("the webhook trigger", lambda: log.read_text().count("serving hello on") > restarts, 120, log)
        body = json.dumps({"action": "opened", "slow": True, "issue": {"number": 1},
                           "repository": {"full_name": "octo-org/hello-world"}}).encode()
        for n in range(6):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/github", data=body, method="POST",
                                             headers={"X-GitHub-Event": "issues", "X-GitHub-Delivery": f"d-{n}",
                                                      "X-Hub-Signature-256": sign(SECRET, body),
                                                      "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 202
        time.sleep(2.0)  # four runs in flight, two queued
        flows.write_text(webhooks.replace("greeting: Howdy", "greeting: Hi"))
        _wait("the restart after the runs in flight", answers("Hi, world! (v5)"), 180, log)

        def all_done() -> bool:
            db = open_database(default_url(tmp_path / ".wasmflow"))
            try:
                runs = [r for r in list_runs(db, flow="hello", limit=500) if r.trigger != "http"]
            finally:
                db.dispose()
            return len(runs) == 6 and all(r.state == "done" and r.status == "ok" for r in runs)

        _wait("the six webhook runs, queued ones included", all_done, 120, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()

    # no first build, no serving (same project: cargo's dependencies are already compiled)
    source.write_text(original.replace("fn main() {", "fn main() { let x: u32 = \"no\";"))
    proc2 = subprocess.run([*wasmflow, "dev", "--port", "0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert proc2.returncode == 1, proc2.stdout + proc2.stderr
    assert "mismatched types" in proc2.stderr and "nothing is served" in proc2.stderr, proc2.stderr
    assert "serving hello on http://" not in proc2.stderr
