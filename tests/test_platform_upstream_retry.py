"""A guest that fails because a service beyond it failed is retried as `upstream`, end to end.

The real server, a signed delivery, a real guest whose allowed outbound call finds nothing listening:
the host answers UPSTREAM, the guest gives up, and the worker files the attempt as `upstream` (retried
by default) rather than as a bug in the guest (`trap`, not retried by default).
"""

from __future__ import annotations

from pathlib import Path

from platform_support import SECRET, ServerThread, deliver, scalar, wait_until
from wasmflow.platform.app import Options


def test_failed_outbound_call_is_retried_as_upstream_until_dead(tmp_path: Path, guest_wasm, make_runtime) -> None:
    runtime = make_runtime(tmp_path, f"""
flows:
  - name: fetch
    module: {guest_wasm['hostile-http-denied']}
    on: [{{github: {{events: [ping]}}}}]
    allow: {{http: ["http://127.0.0.1:9"]}}
    config: {{url: "http://127.0.0.1:9/"}}
    retry: {{attempts: 2, initial: 100ms, max: 200ms}}
""")
    with ServerThread(runtime, Options(workers=1, poll_interval=0.05, webhook_secret=SECRET)) as srv:
        response = deliver(srv.base, "ping", {"zen": "Keep it logically awesome."})
        assert response.status_code == 202
        wait_until(lambda: scalar(runtime.db, "SELECT count(*) FROM runs WHERE state = 'dead'") == 1)
    row = scalar(runtime.db, "SELECT status || ':' || attempt FROM runs")
    assert row == "upstream:2"
    assert "after upstream failure" in scalar(runtime.db, "SELECT error FROM runs")
    assert scalar(runtime.db, "SELECT count(*) FROM attempts") == 2
