"""The code-review bot (guest-examples/code-review) run by the real runtime against the GitHub stand-in
and an OpenAI-compatible stand-in, through the real PyGithub and openai clients.

These go through `Runtime.run` (engine, host functions, kv in SQLite); the end-to-end tests through the
HTTP ingress and the queue are in test_code_review_e2e.py.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from wasmflow.devtools.github_payloads import delivery_headers, encode, issue_comment_event, pull_request_event
from wasmflow.devtools.github_standin import FileChange, GithubStandin, added_file
from wasmflow.devtools.openai_standin import OpenAIStandin
from wasmflow.flows.model import Allow, Flow, FlowsFile, GithubApp, Limits, LlmEndpoint, LlmSettings
from wasmflow.host_functions.spec import Event
from wasmflow.runtime import Runtime
from optional_support import need_model

REPO = "octo-org/hello-world"
MARKER = "<!-- wasmflow:code-review -->"
KEY_ENV = "WASMFLOW_TEST_LLM_KEY"


def finding_responder(messages: list[dict[str, Any]], request: dict[str, Any]) -> str:
    """A deterministic reviewer: one grounded finding (quoting the code) on the first added line of the first file it is shown."""
    user = messages[-1]["content"]
    if "Diff" not in user:
        return "Merged summary: the change adds modules; potential issues first."
    file_match = re.search(r"^### (\S+) \(", user, re.M)
    line_match = re.search(r"^\s*(\d+) \+(.*)$", user, re.M)
    findings = []
    if file_match and line_match:
        line = int(line_match.group(1))
        findings.append({"file": file_match.group(1), "start_line": line, "end_line": line, "severity": "medium",
                         "category": "bug", "code": line_match.group(2).strip(),
                         "problem": "This returns a constant; was a computation intended?"})
    shown = file_match.group(1) if file_match else "the diff"
    return json.dumps({"summary": f"Adds new functions in {shown}. The main risk is untested behaviour.",
                       "findings": findings})


class Env:
    def __init__(self, tmp: Path, wasm: Path, github: GithubStandin, llm: OpenAIStandin, engine: str | None = None,
                 **config: Any) -> None:
        self.github, self.llm = github, llm
        flow = Flow(
            name="code-review", module=str(wasm),
            allow=Allow(kv=True, github={"pull_requests": "write", "issues": "write", "contents": "read"}),
            config={"max_patch_tokens": 6000, "chunk_tokens": 3000, **config},
            llm=LlmSettings(chat=LlmEndpoint(model="standin-chat", base_url=llm.base_url, api_key_secret=KEY_ENV)),
            limits=Limits(timeout=60, memory=256 * 1024 * 1024),
        )
        flows = FlowsFile(
            github=GithubApp(app_id=github.app_id, private_key=github.private_key_pem, webhook_secret="s3cret",
                             api_url=github.url, min_write_interval=0),
            flows=[flow], state_dir=str(tmp / "state"))
        self.runtime = Runtime(flows, tmp, engine_override=engine)

    def deliver(self, event: str, payload: dict[str, Any], delivery: str | None = None, attempt: int = 1) -> Any:
        body = encode(payload)
        headers = delivery_headers(event, body, "s3cret", delivery)
        result = self.runtime.run("code-review", Event(event, body, headers, headers["x-github-delivery"], "github"),
                                  attempt=attempt)
        result.delivery = headers["x-github-delivery"]
        return result

    def bot_comments(self, number: int = 1) -> list[dict[str, Any]]:
        return [c for c in self.github.comments(REPO, number) if MARKER in c["body"]]


@pytest.fixture(params=["wasmtime", "wasmedge"])
def env(request: pytest.FixtureRequest, tmp_path: Path, guest_wasm: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """The bot on each engine: the GitHub and LLM host functions are defined once for both."""
    from engine_support import skip_without

    skip_without(request.param)
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with GithubStandin() as github, OpenAIStandin(finding_responder) as llm:
        github.add_repo(REPO)
        e = Env(tmp_path, guest_wasm["code-review"], github, llm, engine=request.param)
        yield e
        e.runtime.close()


def output(result: Any) -> dict[str, Any]:
    assert result.output is not None, f"no output; status {result.status}: {result.error} {result.stderr!r} {result.logs}"
    return json.loads(result.output)


def rust_files(n: int, lines: int = 3, prefix: str = "src/mod") -> list[FileChange]:
    return [added_file(f"{prefix}{i}.rs", [f"pub fn f{i}_{j}() -> u32 {{ {j} }}" for j in range(lines)]) for i in range(n)]


def test_opened_posts_one_comment_and_one_review(env: Env) -> None:
    files = rust_files(2) + [FileChange("Cargo.lock", "@@ -1 +1 @@\n-a\n+b"), FileChange("old.rs", None, "removed")]
    env.github.add_pull(REPO, "Add modules", files, body="Adds two modules.")
    result = env.deliver("pull_request", pull_request_event(env.github, REPO, 1))
    out = output(result)
    assert result.ok and out["action"] == "reviewed" and out["inline_comments"] == 1
    comments = env.bot_comments()
    assert len(comments) == 1
    body = comments[0]["body"]
    assert comments[0]["_edits"] == 1  # placeholder first, then replaced by the review
    assert "Adds new functions" in body and "### Checks" in body
    assert "`old.rs`" in body and "`Cargo.lock`" in body  # deleted and ignored files are named
    assert "source changed without test changes" in body
    reviews = env.github.reviews(REPO, 1)
    assert len(reviews) == 1 and reviews[0]["_comments"][0]["path"] in ("src/mod0.rs", "src/mod1.rs")
    assert env.llm.chat_requests()[0]["auth"] == "Bearer sk-test"  # the key went to the endpoint, not the guest
    writes = [(w.method, w.path.rsplit("/", 1)[-1]) for w in env.github.writes()]
    assert writes == [("POST", "comments"), ("POST", "reviews"), ("PATCH", str(comments[0]["id"]))]
    assert any("GitHub API calls" in line for _, _, line in result.logs)


def test_synchronize_updates_the_same_comment_and_redelivery_changes_nothing(env: Env) -> None:
    env.github.add_pull(REPO, "Add modules", rust_files(2))
    first = env.deliver("pull_request", pull_request_event(env.github, REPO, 1))
    assert output(first)["action"] == "reviewed"
    comment_id = env.bot_comments()[0]["id"]
    env.github.push(REPO, 1, rust_files(2) + rust_files(1, prefix="src/new"), message="Add a new module")
    second = env.deliver("pull_request", pull_request_event(env.github, REPO, 1, action="synchronize"))
    out = output(second)
    assert out["action"] == "reviewed" and out["comment_id"] == comment_id
    comments = env.bot_comments()
    assert len(comments) == 1 and comments[0]["id"] == comment_id
    assert "Since the last review" in comments[0]["body"] and "Add a new module" in comments[0]["body"]
    assert "`src/new0.rs`" in comments[0]["body"]
    # The model's finding is again on src/mod0.rs, unchanged since the last review: no second inline
    # comment (and so no second review) repeats it.
    assert "src/mod0.rs:1" in comments[0]["body"] and len(env.github.reviews(REPO, 1)) == 1

    writes_before = len(env.github.writes())
    again = env.deliver("pull_request", pull_request_event(env.github, REPO, 1, action="synchronize"),
                        delivery=second.delivery)
    assert output(again)["reason"] == "delivery already handled"
    assert len(env.github.writes()) == writes_before
    # A different delivery for the same head (e.g. reopened) is also a no-op.
    reopened = env.deliver("pull_request", pull_request_event(env.github, REPO, 1, action="reopened"))
    assert output(reopened)["reason"] == "this head commit was already reviewed"
    assert len(env.github.writes()) == writes_before


def test_review_command_re_reviews_and_other_comments_do_not(env: Env) -> None:
    env.github.add_pull(REPO, "Add modules", rust_files(1))
    env.deliver("pull_request", pull_request_event(env.github, REPO, 1))
    calls_before = len(env.llm.chat_requests())
    # Nothing pushed since that review: `/review` says so without a model call; `/review full` reviews again.
    command = env.github.add_comment(REPO, 1, "/Review please", user="octocat")
    out = output(env.deliver("issue_comment", issue_comment_event(env.github, REPO, 1, command)))
    assert out["reason"] == "nothing new since the last review" and len(env.llm.chat_requests()) == calls_before
    assert any(c["body"].startswith("Nothing new since the last review") for c in env.github.comments(REPO, 1))
    full = env.github.add_comment(REPO, 1, "/review FULL", user="octocat")
    out = output(env.deliver("issue_comment", issue_comment_event(env.github, REPO, 1, full)))
    assert out["action"] == "reviewed" and len(env.llm.chat_requests()) == calls_before + 1
    acked = [c for c in env.github.comments(REPO, 1) if c["id"] == command["id"]][0]
    assert acked["reactions"]["eyes"] == 1
    assert len(env.bot_comments()) == 1
    # Not a command, the bot's own comment, and a command on a plain issue: all skipped cleanly.
    chatter = env.github.add_comment(REPO, 1, "looks good to me")
    own = env.github.add_comment(REPO, 1, "/review", user="wasmflow-review[bot]", user_type="Bot")
    issue = env.github.add_issue(REPO, "A bug", "it crashes")
    on_issue = env.github.add_comment(REPO, issue.number, "/review")
    writes_before = len(env.github.writes())
    reasons = [output(env.deliver("issue_comment", issue_comment_event(env.github, REPO, n, c)))["reason"]
               for n, c in [(1, chatter), (1, own), (issue.number, on_issue)]]
    assert reasons == ["comment does not start with the trigger phrase", "comment written by a bot (never a trigger)",
                       "comment is on an issue, not a pull request"]
    assert len(env.github.writes()) == writes_before


def test_drafts_bot_prs_and_opted_out_prs_are_skipped(env: Env) -> None:
    env.github.add_pull(REPO, "WIP", rust_files(1), draft=True)
    env.github.add_pull(REPO, "Bump deps", rust_files(1), user="dependabot[bot]", user_type="Bot")
    env.github.add_pull(REPO, "[skip review] vendored update", rust_files(1))
    assert "draft" in output(env.deliver("pull_request", pull_request_event(env.github, REPO, 1)))["reason"]
    assert "bot" in output(env.deliver("pull_request", pull_request_event(env.github, REPO, 2)))["reason"]
    assert "skip_title_prefixes" in output(env.deliver("pull_request", pull_request_event(env.github, REPO, 3)))["reason"]
    assert env.github.writes() == []
    # ready_for_review is when a draft gets its review.
    env.github.repos[REPO].pulls[1].draft = False
    assert output(env.deliver("pull_request", pull_request_event(env.github, REPO, 1, action="ready_for_review")))["action"] == "reviewed"


def test_llm_down_leaves_an_error_note_then_a_retry_replaces_it(env: Env) -> None:
    env.github.add_pull(REPO, "Add modules", rust_files(1) + [added_file("src/keys.rs", ['const K: &str = "AKIAIOSFODNN7EXAMPLE";'])])
    env.llm.fail_next(503, times=1)
    payload = pull_request_event(env.github, REPO, 1)
    failed = env.deliver("pull_request", payload)
    assert str(failed.status) == "error"  # exit 1: transient, so the platform retries
    note = env.bot_comments()[0]["body"]
    assert "could not finish the review" in note and "attempt 1" in note
    assert "possible" in note and "AKIA" in note  # the deterministic checks survive the LLM failure
    retried = env.deliver("pull_request", payload, delivery=failed.delivery, attempt=2)
    assert output(retried)["action"] == "reviewed"
    comments = env.bot_comments()
    assert len(comments) == 1 and "could not finish" not in comments[0]["body"]
    secret_comments = [c for r in env.github.reviews(REPO, 1) for c in r["_comments"] if "secret" in c["body"]]
    assert secret_comments and secret_comments[0]["path"] == "src/keys.rs"


def test_a_3000_line_pr_stays_in_budget_and_names_what_was_left_out(env: Env) -> None:
    # 60 files x 50 added lines = 3,000 changed lines, far over a 6,000-token budget.
    env.github.add_pull(REPO, "Huge change", rust_files(60, lines=50))
    out = output(env.deliver("pull_request", pull_request_event(env.github, REPO, 1)))
    assert out["tokens"] <= 6000 and out["files_reviewed"] < 60
    assert len(out["left_out"]) + out["files_reviewed"] == 60
    prompts = [r["body"]["messages"][-1]["content"] for r in env.llm.chat_requests() if "Diff" in r["body"]["messages"][-1]["content"]]
    assert len(prompts) == out["chunks"] >= 2  # several calls, then a merge call
    assert all(len(p) // 4 <= 3000 + 600 for p in prompts)
    body = env.bot_comments()[0]["body"]
    left_out = out["left_out"]
    assert f"Not reviewed, over the budget of 6000 tokens** ({len(left_out)} file(s))" in body
    named, rest = left_out[:25], left_out[25:]  # the comment names 25, then counts the rest
    assert all(f"`{path} (~" in body for path in named)
    assert not any(f"`{path} (~" in body for path in rest)
    assert (f"and {len(rest)} more" in body) is bool(rest)
    assert "Merged summary" in body


def test_github_failure_is_reported_in_place_of_the_placeholder(env: Env) -> None:
    env.github.add_pull(REPO, "Add modules", rust_files(1))
    env.github.fail_next(r"/pulls/1/files$", 502, times=1, message="Server Error")
    result = env.deliver("pull_request", pull_request_event(env.github, REPO, 1))
    assert str(result.status) == "error"
    body = env.bot_comments()[0]["body"]
    assert "GitHub answered 502" in body and "⏳" not in body


GEMMA = Path(__file__).resolve().parents[1] / ".wasmflow" / "models" / "gemma-3-270m-q4_k_m.gguf"


@pytest.mark.slow
def test_review_with_the_local_gemma_model(tmp_path: Path, guest_wasm: dict[str, Path]) -> None:
    """The same bot with the model run in-process over the WASI-NN registry: the answer is held to the
    schema by a grammar, so even a 270M base model yields a summary in place and valid inline lines."""
    need_model(GEMMA, "gemma")
    from wasmflow.flows.model import ModelSpec

    with GithubStandin() as github:
        github.add_repo(REPO)
        github.add_pull(REPO, "Cart totals", rust_files(12, lines=12))  # about 1,500 diff tokens
        flow = Flow(
            name="code-review", module=str(guest_wasm["code-review"]),
            allow=Allow(kv=True, models=["review"], github={"pull_requests": "write", "issues": "write"}),
            config={"answer_tokens": 200}, llm=LlmSettings(chat=LlmEndpoint(model="review")),
            limits=Limits(timeout=600))
        flows = FlowsFile(
            models={"review": ModelSpec(backend="ggml", path=str(GEMMA), options={"ctx-size": 4096})},
            github=GithubApp(app_id=github.app_id, private_key=github.private_key_pem, webhook_secret="s",
                             api_url=github.url, min_write_interval=0),
            flows=[flow], state_dir=str(tmp_path / "state"))
        runtime = Runtime(flows, tmp_path)
        try:
            body = encode(pull_request_event(github, REPO, 1))
            started = time.monotonic()
            result = runtime.run("code-review", Event("pull_request", body, {}, "d-gemma", "github"))
            wall = time.monotonic() - started
            out = output(result)
            assert result.ok and out["action"] == "reviewed" and out["llm_calls"] >= 1
            comment = [c for c in github.comments(REPO, 1) if MARKER in c["body"]][0]["body"]
            assert "### Summary" in comment and "### Checks" in comment and "⏳" not in comment
            print(f"\nlocal Gemma review: {wall:.1f} s wall, {out['llm_ms'] / 1000:.1f} s in the model, "
                  f"{out['tokens']} diff tokens, {len(github.api_calls())} GitHub API calls")
        finally:
            runtime.close()


def test_a_racing_twin_run_leaves_one_comment_and_a_superseded_delivery_does_nothing(env: Env) -> None:
    env.github.add_pull(REPO, "Add modules", rust_files(1))
    payload = pull_request_event(env.github, REPO, 1)
    # Another run for the same PR posts its placeholder just before this one does.
    twin: dict[str, Any] = {}
    env.github.before_next("POST", r"/issues/1/comments$", lambda: twin.update(env.github.add_comment(
        REPO, 1, f"⏳ reviewing…\n{MARKER}", user="wasmflow-review[bot]", user_type="Bot")))
    out = output(env.deliver("pull_request", payload))
    comments = env.bot_comments()
    assert out["action"] == "reviewed" and len(comments) == 1
    assert comments[0]["id"] == twin["id"] == out["comment_id"] and "Adds new functions" in comments[0]["body"]
    assert [w.method for w in env.github.writes()].count("DELETE") == 1

    # A delivery that was queued behind a newer push: the newer head is the one to review.
    env.github.push(REPO, 1, rust_files(2))
    writes = len(env.github.writes())
    stale = output(env.deliver("pull_request", payload))
    assert stale["reason"] == "superseded by a newer push" and len(env.github.writes()) == writes


def test_a_config_value_of_the_wrong_type_fails_the_run_naming_it(tmp_path: Path, guest_wasm: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's typed getters (`config::get_u64`, `get_bool`): a bad value is said, not silently defaulted."""
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with GithubStandin() as github, OpenAIStandin(finding_responder) as llm:
        github.add_repo(REPO)
        github.add_pull(REPO, "Add modules", rust_files(1))
        for key, value, expected in [("max_calls", "many", "a whole number (0 or more)"), ("review_drafts", "perhaps", "true or false")]:
            env = Env(tmp_path / key, guest_wasm["code-review"], github, llm, **{key: value})
            try:
                out = output(env.deliver("pull_request", pull_request_event(github, REPO, 1)))
            finally:
                env.runtime.close()
            assert out["action"] == "failed" and out["transient"] is False, out
            assert f'config.{key}: expected {expected}, got "{value}"' in out["error"], out
        assert github.writes() == []  # nothing was posted
        assert llm.chat_requests() == []
