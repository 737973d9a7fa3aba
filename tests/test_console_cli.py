"""The console from the command line: `up`'s login link and its refusal off loopback, `replay --dead`."""

from __future__ import annotations

import re
from pathlib import Path

import requests
from click.testing import CliRunner

from console_support import TOKEN, console_server, flows_yaml  # noqa: F401  (fixture)
from platform_support import WasmflowProcess, deliver, free_port, scalar, wait_until
from wasmflow.cli import main


def test_up_refuses_a_non_loopback_address_without_a_token(tmp_path: Path):
    (tmp_path / "flows.yaml").write_text(flows_yaml(tmp_path / "wasm"))
    proc = WasmflowProcess(tmp_path, ["up", "--host", "0.0.0.0", "--port", str(free_port())])
    assert proc.wait(timeout=60) == 2
    log = proc.log()
    assert "WASMFLOW_CONSOLE_TOKEN" in log and "serve on 127.0.0.1" in log and "Traceback" not in log


def test_up_prints_a_one_time_login_link_that_logs_in_once(tmp_path: Path):
    (tmp_path / "flows.yaml").write_text(flows_yaml(tmp_path / "wasm"))
    port = free_port()
    proc = WasmflowProcess(tmp_path, ["up", "--port", str(port)])
    try:
        proc.wait_healthy(port)
        proc.wait_log("one-time login link")
        link = re.search(r"(http://127\.0\.0\.1:\d+/login\?token=[\w-]+)", proc.log()).group(1)
        session = requests.Session()
        first = session.get(link, timeout=10)
        assert first.status_code == 200 and first.url.endswith(f":{port}/")  # logged in: the Flows page
        assert "broken" in first.text
        again = requests.get(link, timeout=10, allow_redirects=False)
        assert again.status_code == 403  # spent
        token = link.split("token=")[1]
        bearer = requests.get(f"http://127.0.0.1:{port}/api/runs", headers={"Authorization": f"Bearer {token}"},
                              timeout=10)
        assert bearer.status_code == 403  # the one-time token is no API token
    finally:
        assert proc.stop() == 0


def test_up_with_a_configured_token_prints_the_link_without_it(tmp_path: Path):
    text = flows_yaml(tmp_path / "wasm") + "console:\n  token: ${WASMFLOW_CONSOLE_TOKEN}\n"
    (tmp_path / "flows.yaml").write_text(text)
    port = free_port()
    import os

    os.environ["WASMFLOW_CONSOLE_TOKEN"] = TOKEN
    try:
        proc = WasmflowProcess(tmp_path, ["up", "--port", str(port), "--host", "0.0.0.0"])
    finally:
        del os.environ["WASMFLOW_CONSOLE_TOKEN"]
    try:
        proc.wait_healthy(port)
        proc.wait_log("log in with console.token")
        assert TOKEN not in proc.log()
        resp = requests.get(f"http://127.0.0.1:{port}/api/flows", headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=10)
        assert resp.status_code == 200 and len(resp.json()["flows"]) == 3
    finally:
        assert proc.stop() == 0


def test_replay_dead_from_the_cli(console_server):
    base = console_server.base
    runs = [deliver(base, "push", {"repository": {"full_name": "acme/x"}}).json()["runs"][0] for _ in range(2)]
    db = console_server.platform.db
    wait_until(lambda: scalar(db, "SELECT count(*) FROM runs WHERE state = 'dead'") == 2)
    url = str(db.url.render_as_string(hide_password=False))
    dry = CliRunner().invoke(main, ["replay", "--dead", "--flow", "broken", "--since", "1h", "--dry-run",
                                    "--database-url", url])
    assert dry.exit_code == 0 and "2 dead run(s) match" in dry.output
    done = CliRunner().invoke(main, ["replay", "--dead", "--flow", "broken", "--database-url", url])
    assert done.exit_code == 0, done.output
    assert "2 replay(s) queued" in done.output
    replays = scalar(db, "SELECT count(*) FROM runs WHERE replay_of IN (:a, :b)", a=runs[0], b=runs[1])
    assert replays == 2
    none = CliRunner().invoke(main, ["replay", "--dead", "--flow", "ok", "--database-url", url])
    assert none.exit_code == 0 and "0 dead run(s) matched" in none.output
    bad = CliRunner().invoke(main, ["replay", "--dead", "--since", "last tuesday", "--database-url", url])
    assert bad.exit_code == 2 and "--since takes a period" in bad.output
    wrong = CliRunner().invoke(main, ["replay", "--status", "trap", "--database-url", url])
    assert wrong.exit_code == 2 and "go with --dead" in wrong.output
