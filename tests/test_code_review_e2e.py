"""The code-review bot end to end: signed deliveries to the real server (`/webhooks/github`), the durable
queue and workers, the bot in wasmtime, PyGithub against the GitHub stand-in, and the `openai` client
against the OpenAI-compatible stand-in."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from platform_support import SECRET, ServerThread, deliver, wait_until
from wasmflow.devtools.github_payloads import issue_comment_event, pull_request_event
from wasmflow.devtools.github_standin import GithubStandin
from wasmflow.devtools.openai_standin import OpenAIStandin
from wasmflow.platform.app import Options
from wasmflow.platform.store import get_run, list_runs
from wasmflow.runtime import Runtime

from test_code_review import MARKER, REPO, finding_responder, rust_files

FLOWS = """
state_dir: state
github:
  app_id: {app_id}
  private_key: app.pem
  webhook_secret: {secret}
  api_url: {api}
  min_write_interval: 0
flows:
  - name: code-review
    module: {wasm}
    on:
      - github: {{events: [pull_request, issue_comment.created], repos: ["octo-org/*"]}}
    allow:
      kv: true
      github: {{pull_requests: write, issues: write, contents: read}}
    config: {{max_patch_tokens: 6000, chunk_tokens: 3000}}
    llm:
      chat: {{model: standin-chat, base_url: "{llm}", api_key_secret: WASMFLOW_TEST_LLM_KEY}}
    retry: {{attempts: {attempts}, initial: 0.2s, max: 0.5s, on: [timeout, upstream, error]}}
    limits: {{timeout: 60s}}
"""


class Stack:
    def __init__(self, github: GithubStandin, llm: OpenAIStandin, server: ServerThread) -> None:
        self.github, self.llm, self.server = github, llm, server

    def send(self, event: str, payload: dict[str, Any], delivery: str | None = None) -> dict[str, Any]:
        response = deliver(self.server.base, event, payload, delivery=delivery)
        assert response.status_code == 202, response.text
        return response.json()

    def runs(self) -> list[Any]:
        return list_runs(self.server.platform.runtime.db, flow="code-review")

    def settle(self, count: int, timeout: float = 60) -> list[Any]:
        """Wait until `count` runs exist and none is queued or running; newest first."""
        def done() -> Any:
            runs = self.runs()
            return runs if len(runs) >= count and all(r.state in ("done", "dead") for r in runs) else None
        return wait_until(done, timeout=timeout, interval=0.1)

    def comment(self, number: int = 1) -> dict[str, Any]:
        mine = [c for c in self.github.comments(REPO, number) if MARKER in c["body"]]
        assert len(mine) == 1, [c["body"][:80] for c in mine]
        return mine[0]


def stack(tmp_path: Path, wasm: Path, attempts: int, make_runtime: Callable[..., Runtime]) -> Iterator[Stack]:
    with GithubStandin() as github, OpenAIStandin(finding_responder) as llm:
        github.add_repo(REPO)
        app_dir = tmp_path / "app"
        app_dir.mkdir()
        (app_dir / "app.pem").write_text(github.private_key_pem)
        flows = FLOWS.format(app_id=github.app_id, secret=SECRET, api=github.url, wasm=wasm, llm=llm.base_url,
                             attempts=attempts)
        runtime = make_runtime(app_dir, flows)
        with ServerThread(runtime, Options(workers=2, poll_interval=0.1)) as server:
            yield Stack(github, llm, server)
        runtime.close()


@pytest.fixture()
def e2e(tmp_path: Path, guest_wasm: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        make_runtime: Callable[..., Runtime]) -> Iterator[Stack]:
    monkeypatch.setenv("WASMFLOW_TEST_LLM_KEY", "sk-test")
    yield from stack(tmp_path, guest_wasm["code-review"], attempts=3, make_runtime=make_runtime)


def test_opened_synchronize_command_and_redelivery(e2e: Stack) -> None:
    e2e.github.add_pull(REPO, "Add modules", rust_files(2), body="Adds modules.")
    e2e.send("pull_request", pull_request_event(e2e.github, REPO, 1))
    runs = e2e.settle(1)
    assert runs[0].status == "ok"
    first = e2e.comment()
    assert "Adds new functions" in first["body"] and len(e2e.github.reviews(REPO, 1)) == 1
    calls_per_review = len(e2e.github.api_calls())

    e2e.github.push(REPO, 1, rust_files(3), message="Add a third module")
    sync = e2e.send("pull_request", pull_request_event(e2e.github, REPO, 1, action="synchronize"))
    e2e.settle(2)
    second = e2e.comment()
    assert second["id"] == first["id"] and "Since the last review" in second["body"] and "Add a third module" in second["body"]

    llm_calls = len(e2e.llm.chat_requests())
    command = e2e.github.add_comment(REPO, 1, "/review full")  # `/review` alone: nothing new since the push
    e2e.send("issue_comment", issue_comment_event(e2e.github, REPO, 1, command))
    runs = e2e.settle(3)
    output = json.loads(get_run(e2e.server.platform.runtime.db, runs[0].id).output)
    assert output["action"] == "reviewed" and runs[0].event_name == "issue_comment"
    assert len(e2e.llm.chat_requests()) == llm_calls + 1 and e2e.comment()["id"] == first["id"]

    writes = len(e2e.github.writes())
    again = e2e.send("pull_request", pull_request_event(e2e.github, REPO, 1, action="synchronize"),
                     delivery=sync["delivery"])
    assert again["duplicate"] is True
    time.sleep(0.5)
    assert len(e2e.runs()) == 3 and len(e2e.github.writes()) == writes
    # get the PR, .github/wasmflow.yaml on the base branch, find the comment, placeholder, check for a
    # racing twin, files, review, final edit (this flow has no `checks: write`, so no check run calls)
    assert calls_per_review == 8


def test_llm_down_is_retried_then_the_review_replaces_the_error_note(e2e: Stack) -> None:
    e2e.github.add_pull(REPO, "Add modules", rust_files(1))
    e2e.llm.fail_next(503, times=1)
    e2e.send("pull_request", pull_request_event(e2e.github, REPO, 1))
    runs = e2e.settle(1)
    assert runs[0].status == "ok" and runs[0].attempt == 2
    edits = [r.body["body"] for r in e2e.github.writes() if r.method == "PATCH"]
    assert any("could not finish the review" in body for body in edits)  # attempt 1 left the note
    final = e2e.comment()["body"]
    assert "could not finish" not in final and "Adds new functions" in final


def test_a_3000_line_pr_through_the_server(e2e: Stack) -> None:
    e2e.github.add_pull(REPO, "Huge change", rust_files(60, lines=50))
    e2e.send("pull_request", pull_request_event(e2e.github, REPO, 1))
    runs = e2e.settle(1)
    assert runs[0].status == "ok"
    body = e2e.comment()["body"]
    assert "Not reviewed, over the budget of 6000 tokens" in body
    prompts = [r["body"]["messages"][-1]["content"] for r in e2e.llm.chat_requests()]
    assert sum(len(p) for p in prompts if "Diff" in p) // 4 <= 6000 + 2 * 600


def test_llm_down_on_every_attempt_leaves_the_error_note(tmp_path: Path, guest_wasm: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          make_runtime: Callable[..., Runtime]) -> None:
    monkeypatch.setenv("WASMFLOW_TEST_LLM_KEY", "sk-test")
    for s in stack(tmp_path, guest_wasm["code-review"], attempts=2, make_runtime=make_runtime):
        s.github.add_pull(REPO, "Add modules", rust_files(1))
        s.llm.fail_next(503, times=10)
        s.send("pull_request", pull_request_event(s.github, REPO, 1))
        runs = s.settle(1)
        assert runs[0].state == "dead" and runs[0].attempt == 2
        body = s.comment()["body"]
        assert "could not finish the review" in body and "attempt 2" in body and "### Checks" in body
        assert "⏳" not in body
