"""`wasmflow runs | logs | events | replay | up | worker` on a store a real server filled."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from wasmflow.cli import main
from wasmflow.flows.loader import load_flows
from wasmflow.platform.app import Options
from wasmflow.runtime import Runtime

from platform_support import SECRET, TRAP_WAT, ServerThread, deliver, scalar, wait_until, write_wat

FLOWS = """
flows:
  - name: hello
    module: {hello}
    allow: {{kv: true}}
    on:
      - github: {{events: [push]}}
      - http: {{methods: [POST]}}
  - name: broken
    module: {trap}
    on:
      - github: {{events: [push]}}
"""


@pytest.fixture
def filled(tmp_path: Path, guest_wasm, monkeypatch):
    """A flows.yaml whose default store (.wasmflow/ beside it) holds a done run, a dead run and an HTTP run."""
    monkeypatch.delenv("WASMFLOW_DATABASE_URL", raising=False)
    flows_path = tmp_path / "flows.yaml"
    flows_path.write_text(FLOWS.format(hello=guest_wasm["hello"], trap=write_wat(tmp_path / "trap.wasm", TRAP_WAT)))
    loaded = load_flows(flows_path)
    runtime = Runtime(loaded.file, loaded.base_dir)
    server = ServerThread(runtime, Options(workers=2, poll_interval=0.05, webhook_secret=SECRET))
    with server:
        assert deliver(server.base, "push", {"repository": {"full_name": "acme/app"}, "sender": {"login": "ann"}},
                       delivery="dlv-cli").status_code == 202
        assert requests.post(f"{server.base}/flows/hello", json={"name": "web"}).status_code == 200
        wait_until(lambda: scalar(runtime.db, "SELECT count(*) FROM runs WHERE state IN ('done', 'dead')") == 3)
        yield flows_path, runtime, server
    runtime.close()


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_runs_table_and_filters(filled):
    flows_path, runtime, _ = filled
    out = invoke("runs", "--flows", str(flows_path))
    assert out.count("hello") == 2 and "broken" in out and "dead" in out and "trap" in out
    dead_only = invoke("runs", "--flows", str(flows_path), "--status", "dead")
    assert "broken" in dead_only and "hello" not in dead_only
    assert "http" in invoke("runs", "--flows", str(flows_path), "--flow", "hello", "--limit", "5")


def test_logs_shows_attempts_guest_logs_and_output(filled):
    flows_path, runtime, _ = filled
    run_id = scalar(runtime.db, "SELECT r.id FROM runs r JOIN events e ON e.id = r.event_id "
                                "WHERE r.flow = 'hello' AND e.delivery_id = 'dlv-cli'")
    out = invoke("logs", "--flows", str(flows_path), run_id[:8])
    assert run_id in out and "delivery dlv-cli" in out
    assert "Hello, ann!" in out  # the guest's log line
    assert '"who": "ann"' in out  # its output, pretty-printed
    missing = CliRunner().invoke(main, ["logs", "--flows", str(flows_path), "no-such-run"])
    assert missing.exit_code == 1 and "no run" in missing.output


def test_events_lists_deliveries_and_http_requests(filled):
    flows_path, _, _ = filled
    out = invoke("events", "--flows", str(flows_path))
    assert "dlv-cli" in out and "github" in out and "http" in out
    assert "dlv-cli" not in invoke("events", "--flows", str(flows_path), "--source", "http")


def test_replay_a_delivery_queues_its_flows_again_and_they_run(filled):
    flows_path, runtime, _ = filled
    out = invoke("replay", "--flows", str(flows_path), "dlv-cli")
    assert out.count("queued run") == 2
    wait_until(lambda: scalar(runtime.db, "SELECT count(*) FROM runs WHERE seq = 1 AND state IN ('done', 'dead')") == 2)
    assert scalar(runtime.db, "SELECT state FROM runs WHERE seq = 1 AND flow = 'hello'") == "done"
    unknown = CliRunner().invoke(main, ["replay", "--flows", str(flows_path), "never-seen"])
    assert unknown.exit_code == 1 and "no run or delivery" in unknown.output


def test_a_second_up_on_the_same_sqlite_store_is_refused(filled):
    flows_path, _, _ = filled
    result = CliRunner().invoke(main, ["up", "--flows", str(flows_path), "--port", "0"])
    assert result.exit_code == 2
    assert "another wasmflow process serves" in result.output


def test_worker_needs_postgresql(filled):
    flows_path, _, _ = filled
    result = CliRunner().invoke(main, ["worker", "--flows", str(flows_path)])
    assert result.exit_code == 2 and "PostgreSQL" in result.output
