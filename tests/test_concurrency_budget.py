"""Token budgets per key: tokens spent are summed from the store, and once a key's budget is spent the
LLM host function refuses with "budget exhausted". A real WAT guest calls `llm_chat` through the real
`openai` client against the OpenAI stand-in (OpenAI's API is beyond a test machine's network)."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from wasmflow.devtools.openai_standin import OpenAIStandin
from wasmflow.platform.metrics import Metrics
from wasmflow.platform.queue import Queue
from wasmflow.platform.store import NewEvent, NewRun, record_event
from wasmflow.platform.worker import Dispatcher

from platform_support import wait_until, write_wat

REQUEST = b'{"messages":[{"role":"user","content":"review this"}]}'

# Two llm_chat calls; the output is their codes as digits ("02": the second was refused). When both
# were refused the guest traps, so the run ends `denied` (it failed after a refusal).
_ESCAPED = REQUEST.decode().replace('"', '\\"')
CHAT_TWICE_WAT = f"""(module
 (import "wasmflow" "llm_chat" (func $chat (param i32 i32 i32) (result i32)))
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 0) "{_ESCAPED}")
 (func (export "_start") (local $a i32) (local $b i32)
  (local.set $a (call $chat (i32.const 0) (i32.const {len(REQUEST)}) (i32.const 2000)))
  (local.set $b (call $chat (i32.const 0) (i32.const {len(REQUEST)}) (i32.const 2000)))
  (i32.store8 (i32.const 1000) (i32.add (local.get $a) (i32.const 48)))
  (i32.store8 (i32.const 1001) (i32.add (local.get $b) (i32.const 48)))
  (drop (call $out (i32.const 1000) (i32.const 2)))
  (if (i32.and (i32.ne (local.get $a) (i32.const 0)) (i32.ne (local.get $b) (i32.const 0))) (then unreachable))))"""

FLOWS = """
flows:
  - name: review
    module: {module}
    on: [{{github: {{events: [pull_request]}}}}]
    retry: {{attempts: 1}}
    llm: {{chat: {{model: standin-chat, base_url: "{base}", api_key_secret: LLM_KEY}}}}
    budget: {{llm_tokens: 40, per: 1d, key: "{{repo}}"}}
"""


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_url")


def test_budget_is_summed_per_key_and_refuses_llm_calls_once_spent(tmp_path, make_runtime, database_url,
                                                                     monkeypatch):
    monkeypatch.setenv("LLM_KEY", "sk-test")
    module = write_wat(tmp_path / "chat.wasm", CHAT_TWICE_WAT)
    with OpenAIStandin(lambda messages, req: "x" * 200) as standin:  # 50 completion tokens an answer
        runtime = make_runtime(tmp_path, FLOWS.format(module=module, base=standin.base_url),
                               database_url=database_url)
        metrics = Metrics()
        d = Dispatcher(runtime, Queue(runtime.db, "w"), metrics, concurrency=1, poll_interval=0.05)
        d.start()
        try:
            ids = []
            for repo in ("acme/api", "acme/api", "acme/web"):
                body = json.dumps({"action": "opened", "pull_request": {"number": 1},
                                   "repository": {"full_name": repo}}).encode()
                with runtime.db.begin() as conn:
                    ids += record_event(conn, NewEvent(source="github", name="pull_request", headers={}, body=body,
                                                       status="accepted",
                                                       runs=[NewRun(flow="review", trigger="github")])).run_ids
                wait_until(lambda: _row(runtime.db, ids[-1]).state in ("done", "dead"), timeout=30)
        finally:
            d.stop(grace=5)
        calls = len(standin.chat_requests())
    first, second, other = (_row(runtime.db, i) for i in ids)
    # the first run's first call spent 52 of 40 tokens (2 prompt + 50 completion, as the stand-in counts):
    # its second call is refused, and the guest goes on
    assert (first.status, bytes(first.output)) == ("ok", b"02")
    assert first.llm_tokens == 52 and first.budget_key == "acme/api"
    # the next run of the key finds the budget spent in the store: both calls refused, the guest fails
    assert (second.status, bytes(second.output or b"")) == ("denied", b"22")
    assert "budget exhausted: 40 LLM tokens per 1d for key 'acme/api'" in second.error
    assert second.llm_tokens == 0
    # another key has its own budget
    assert (other.status, bytes(other.output)) == ("ok", b"02")
    assert calls == 2  # refused calls never reached the endpoint
    assert 'wasmflow_runs_denied_total{flow="review",reason="budget"} 1.0' in metrics.render().decode()


def _row(db: sa.Engine, run_id: str) -> sa.Row:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM runs WHERE id = :i"), {"i": run_id}).first()
