"""Runs executed by the platform (here an HTTP-triggered one through the real server) are recorded by the
executor's background writer, on SQLite and PostgreSQL, and replay offline `identical`; a transcript saved
twice for the same attempt replaces the first."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from wasmflow.platform.app import Options
from wasmflow.platform.replay_offline import replay_offline
from wasmflow.platform.transcripts import load_transcript, save, save_many

from platform_support import SECRET, ServerThread, scalar, wait_until


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("pg_url"))


def test_a_platform_run_is_recorded_and_replays_offline(tmp_path: Path, guest_wasm: dict[str, Path],
                                                        database_url: str, make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime = make_runtime(tmp_path, f"""
flows:
  - name: hello
    module: {guest_wasm['hello']}
    on: [{{http: {{methods: [POST]}}}}]
    allow: {{kv: true}}
    config: {{greeting: Howdy}}
""", database_url=database_url)
    with ServerThread(runtime, Options(workers=1, poll_interval=0.05, webhook_secret=SECRET)) as srv:
        response = requests.post(f"{srv.base}/flows/hello", data=b'{"sender": {"login": "ada"}}', timeout=20)
    assert response.status_code == 200, response.text
    run_id = scalar(runtime.db, "SELECT id FROM runs")
    transcript = wait_until(lambda: load_transcript(runtime.db, run_id))
    assert transcript.flow == "hello" and transcript.result["status"] == "ok"
    assert [row["kind"] for row in transcript.activity()] == ["event", "event", "kv", "config"]
    report = replay_offline(runtime, transcript)
    assert report.verdict == "identical", report
    # Saved again for the same attempt (a retry of the store): one row, the newer document.
    doc = dict(transcript.doc, flow="hello", result=dict(transcript.result, status="trap"))
    save(runtime.db, doc)
    save_many(runtime.db, [doc])
    assert scalar(runtime.db, "SELECT count(*) FROM transcripts") == 1
    assert load_transcript(runtime.db, run_id[:8]).result["status"] == "trap"
