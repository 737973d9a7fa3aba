"""`wasmflow run` as a person uses it: a real subprocess, a flows.yaml on disk, built guests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WASMFLOW = [sys.executable, "-m", "wasmflow.cli"]


@pytest.fixture
def project(tmp_path: Path, guest_wasm) -> Path:
    (tmp_path / "flows.yaml").write_text(f"""
flows:
  - name: hello
    module: {guest_wasm['hello']}
    allow: {{kv: true}}
    config: {{greeting: Hi}}
  - name: spin
    module: {guest_wasm['hostile-loop']}
    limits: {{timeout: 300ms}}
  - name: broken
    module: {tmp_path / 'missing.wasm'}
""")
    (tmp_path / "event.json").write_text(json.dumps({"action": "opened", "sender": {"login": "octocat"}}))
    return tmp_path


def wasmflow(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*WASMFLOW, *args], cwd=project, capture_output=True, text=True, timeout=120)


def test_run_prints_logs_output_and_status(project):
    proc = wasmflow(project, "run", "hello", "--event", "event.json", "--event-name", "pull_request")
    assert proc.returncode == 0, proc.stderr
    assert "Hi, octocat! event pull_request" in proc.stdout
    assert '"count": 1' in proc.stdout  # output pretty-printed
    status_line = [line for line in proc.stdout.splitlines() if " run " in line and "engine" in line][-1]
    assert status_line.startswith("ok") and "engine wasmtime" in status_line and "ms" in status_line


def test_run_reports_timeout_with_exit_code_1(project):
    proc = wasmflow(project, "run", "spin")
    assert proc.returncode == 1
    assert "timeout" in proc.stdout and "deadline of 0.3s passed" in proc.stdout


def test_missing_module_is_invalid_and_names_the_flow(project):
    proc = wasmflow(project, "run", "broken")
    assert proc.returncode == 1
    assert "invalid" in proc.stdout and "flow 'broken'" in proc.stdout


def test_unknown_flow_and_bad_event_are_usage_errors(project):
    proc = wasmflow(project, "run", "nope")
    assert proc.returncode == 2 and "no flow named 'nope'" in proc.stderr and "hello" in proc.stderr
    (project / "bad.json").write_text("{not json")
    proc = wasmflow(project, "run", "hello", "--event", "bad.json")
    assert proc.returncode == 2 and "is not JSON" in proc.stderr


def test_malformed_flows_yaml_names_file_line_and_field(project):
    (project / "flows.yaml").write_text("flows:\n  - name: x\n    module: m.wasm\n    limits: {timout: 3s}\n")
    proc = wasmflow(project, "run", "x")
    assert proc.returncode == 2
    assert "flows.yaml:4" in proc.stderr and "timout" in proc.stderr and "timeout" in proc.stderr
