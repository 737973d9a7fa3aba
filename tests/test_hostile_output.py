"""Hostile guest output (class 7): response headers, logs, output and bodies are capped per run, what was
cut is marked, counted in metrics, and the host stays small whatever the guest pushes.

Each guest ignores the codes it gets and keeps pushing, the worst case for the host; it reports the
first non-zero code it saw as its output, so the test sees what the call answered.
"""

from __future__ import annotations

import re

import pytest
import requests

from hostile_support import HOSTILE_DIR, PeakRss, assert_no_leak, engine_name, planted_secret, run_flow  # noqa: F401
from platform_support import ServerThread, scalar, wait_until, write_wat
from wasmflow.engine import Status
from wasmflow.flows.model import Limits
from wasmflow.host_functions.spec import Code
from wasmflow.platform.app import Options
from wasmflow.platform.store import encode_logs

DEFAULTS = Limits()
MARKER = re.compile(r"^\[wasmflow: (\d+) log lines / (\d+) bytes dropped\]$")


def digit(code: Code) -> bytes:
    return str(int(code)).encode()


def test_a_million_response_headers_are_capped(engine_name, planted_secret, tmp_path):
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, "out_headers.wat", limits={"timeout": "60s"})
    assert result.status is Status.OK, result.error
    assert result.output == digit(Code.LIMIT)
    assert len(result.response_headers) == DEFAULTS.response_headers
    assert result.truncated.get("response_headers", 0) >= 1
    assert rss.grew_mib < 100, f"host grew {rss.grew_mib:.0f} MiB"
    assert_no_leak(result, planted_secret)


def test_huge_header_values_are_refused_without_copying(engine_name, planted_secret, tmp_path):
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, "out_header_huge.wat", limits={"timeout": "30s", "memory": "40MiB"})
    assert result.status is Status.OK, result.error
    assert result.output == digit(Code.TOO_LARGE)
    assert result.response_headers == []
    assert result.truncated["response_headers"] == 8
    assert rss.grew_mib < 100, f"host grew {rss.grew_mib:.0f} MiB"
    assert_no_leak(result, planted_secret)


def test_header_limits_are_settable(tmp_path):
    result = run_flow("wasmtime", tmp_path, "out_headers.wat",
                      limits={"timeout": "60s", "response_headers": 3, "response_header_bytes": "1MiB"})
    assert len(result.response_headers) == 3 and result.output == digit(Code.LIMIT)
    result = run_flow("wasmtime", tmp_path, "out_headers.wat", limits={"timeout": "60s", "response_header_bytes": 630})
    assert len(result.response_headers) == 10 and result.output == digit(Code.TOO_LARGE)  # 63 bytes each


@pytest.mark.parametrize("guest, line_bytes", [("out_logs_many.wat", 17), ("out_logs_long.wat", 20480)],
                         ids=["many-short-lines", "long-lines"])
def test_log_floods_are_capped_and_marked(engine_name, planted_secret, tmp_path, guest, line_bytes):
    with PeakRss() as rss:
        result = run_flow(engine_name, tmp_path, guest, limits={"timeout": "60s"})
    assert result.status is Status.OK, result.error
    assert result.output == digit(Code.LIMIT)
    guest_lines = [m for _, _, m in result.logs if not MARKER.match(m)]
    assert len(guest_lines) <= DEFAULTS.log_lines
    assert sum(len(m.encode()) for m in guest_lines) <= DEFAULTS.log_bytes
    stored = len(encode_logs(result.logs).encode())
    assert stored < DEFAULTS.log_bytes + 64 * DEFAULTS.log_lines + 4096, f"{stored} bytes would be stored"
    markers = [MARKER.match(m) for _, _, m in result.logs if MARKER.match(m)]
    assert len(markers) == 1
    dropped_lines, dropped_bytes = map(int, markers[0].groups())
    assert dropped_lines == 100_000 - len(guest_lines)
    assert dropped_bytes == dropped_lines * line_bytes
    if line_bytes > 16 * 1024:
        assert all(m.endswith("bytes cut]") and len(m) < 16 * 1024 + 40 for m in guest_lines)
    assert result.truncated["logs"] >= dropped_lines
    assert rss.grew_mib < 100, f"host grew {rss.grew_mib:.0f} MiB"
    assert_no_leak(result, planted_secret)


def test_log_limits_are_settable(tmp_path):
    result = run_flow("wasmtime", tmp_path, "out_logs_many.wat", limits={"log_lines": 5})
    assert [m for _, _, m in result.logs] == ["flood line, again"] * 5 + ["[wasmflow: 99995 log lines / 1699915 bytes dropped]"]
    result = run_flow("wasmtime", tmp_path, "out_logs_many.wat", limits={"log_bytes": "170B"})
    assert len(result.logs) == 11 and result.logs[-1][2].startswith("[wasmflow: 99990 log lines")


def test_output_and_response_body_over_their_caps_are_too_large(engine_name, tmp_path):
    result = run_flow(engine_name, tmp_path, "out_bodies.wat", limits={"memory": "64MiB"})
    assert result.status is Status.OK, result.error
    assert result.output == digit(Code.TOO_LARGE) * 2
    assert result.response_body is None
    assert result.truncated == {"output": 1, "response_body": 1}
    result = run_flow(engine_name, tmp_path, "out_bodies.wat",
                      limits={"memory": "64MiB", "output": "4MiB", "response_body": "16MiB"})
    assert result.output == b"00" and len(result.response_body or b"") == 9 * 1024 * 1024


def test_cut_output_is_stored_bounded_and_counted_in_metrics(tmp_path, make_runtime):
    """Through the platform: the stored log is bounded, and /metrics counts the run whose logs were cut."""
    wasm = write_wat(tmp_path / "logs.wasm", (HOSTILE_DIR / "out_logs_long.wat").read_text())
    runtime = make_runtime(tmp_path, f"""
flows:
  - name: flood
    module: {wasm}
    on: [http]
    limits: {{timeout: 60s, log_bytes: 64KiB}}
""")
    try:
        with ServerThread(runtime, Options(workers=1, poll_interval=0.05)) as server:
            assert requests.post(f"{server.base}/flows/flood", json={}, timeout=60).status_code == 200
            wait_until(lambda: scalar(runtime.db, "SELECT count(*) FROM runs WHERE state = 'done'") == 1, timeout=60)
            metrics = requests.get(f"{server.base}/metrics", timeout=10).text
        stored = scalar(runtime.db, "SELECT length(logs) FROM runs")
        assert stored < 64 * 1024 + 8192, f"{stored} bytes of logs stored"
        assert "log lines /" in scalar(runtime.db, "SELECT logs FROM runs")
        assert 'wasmflow_guest_output_truncated_total{flow="flood",kind="logs"} 1.0' in metrics
    finally:
        runtime.close()
