"""The review bot's second generation end to end: signed deliveries to the real server, the queue and
workers, the bot in wasmtime, PyGithub against the GitHub stand-in (check runs, collaborator
permission, `.github/wasmflow.yaml` per branch, PR body edits), and the `openai` client against an
OpenAI-compatible stand-in scripted to return chosen findings, so grounding is tested exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from platform_support import SECRET, ServerThread, deliver, wait_until
from wasmflow.devtools.github_payloads import issue_comment_event, pull_request_event
from wasmflow.devtools.github_standin import GithubStandin, added_file
from wasmflow.devtools.openai_standin import OpenAIStandin
from wasmflow.platform.app import Options
from wasmflow.platform.store import get_run, list_runs
from wasmflow.runtime import Runtime

REPO = "octo-org/shop"
MARKER = "<!-- wasmflow:code-review -->"
CART = [
    "pub fn total(items: &[u64]) -> u64 {",
    "    let mut sum = 0;",
    "    for i in 0..items.len() - 1 {",
    "        sum += items[i];",
    "    }",
    "    sum",
    "}",
]

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
      github: {{pull_requests: write, issues: write, contents: read, checks: write}}
    config: {{max_patch_tokens: 6000, chunk_tokens: 3000, severity_threshold: low}}
    llm:
      chat: {{model: standin-chat, base_url: "{llm}", api_key_secret: WASMFLOW_TEST_LLM_KEY}}
    retry: {{attempts: 1}}
    limits: {{timeout: 60s}}
{extra}"""

OFF_BY_ONE = {"file": "src/cart.rs", "start_line": 3, "end_line": 3, "severity": "high", "category": "bug",
              "code": "for i in 0..items.len() - 1 {", "problem": "Off by one: the last item is never added.",
              "replacement": "    for i in 0..items.len() {"}
UNGROUNDED = [
    {"file": "src/cart.rs", "start_line": 1, "end_line": 1, "severity": "medium", "category": "bug",
     "code": "a shopping cart in the US state of California", "problem": "The cart should be in California."},
    {"file": "src/checkout.rs", "start_line": 4, "end_line": 4, "severity": "high", "category": "bug",
     "code": "let x = 1;", "problem": "This file is not even in the pull request."},
]


class Scripted:
    """The OpenAI-compatible stand-in's answers, by what the bot asks: review chunks get `findings`,
    `/ask` gets `answer`, `/describe` gets `describe`."""

    def __init__(self) -> None:
        self.findings: list[dict[str, Any]] = []
        self.summary = "Adds a total function that sums the cart items."
        self.answer = "The loop in src/cart.rs line 3 stops one item early."
        self.describe: dict[str, Any] = {"title": "Fix the cart total", "description": "Adds `total` for the cart.",
                                         "labels": ["bug"]}

    def __call__(self, messages: list[dict[str, Any]], request: dict[str, Any]) -> str:
        system, user = messages[0]["content"], messages[-1]["content"]
        if "answer a question" in system:
            return self.answer
        if "write the description" in system:
            return json.dumps(self.describe)
        if "Diff" in user:
            return json.dumps({"summary": self.summary, "findings": self.findings})
        return "Merged summary."


class Stack:
    def __init__(self, github: GithubStandin, llm: OpenAIStandin, script: Scripted, server: ServerThread) -> None:
        self.github, self.llm, self.script, self.server = github, llm, script, server

    def send(self, event: str, payload: dict[str, Any]) -> None:
        response = deliver(self.server.base, event, payload)
        assert response.status_code == 202, response.text

    def settle(self, count: int) -> list[Any]:
        def done() -> Any:
            runs = list_runs(self.server.platform.runtime.db, flow="code-review")
            return runs if len(runs) >= count and all(r.state in ("done", "dead") for r in runs) else None
        return wait_until(done, timeout=60, interval=0.1)

    def output(self, run: Any) -> dict[str, Any]:
        row = get_run(self.server.platform.runtime.db, run.id)
        assert row.output, (row.status, row.error)
        return json.loads(row.output)

    def opened(self, files: list[Any] | None = None, count: int = 1, **kw: Any) -> dict[str, Any]:
        pr = self.github.add_pull(REPO, "Cart total", files or [added_file("src/cart.rs", CART)], **kw)
        self.send("pull_request", pull_request_event(self.github, REPO, pr.number))
        return self.output(self.settle(count)[0])

    def command(self, text: str, count: int, user: str = "octocat", number: int = 1) -> dict[str, Any]:
        comment = self.github.add_comment(REPO, number, text, user=user)
        self.send("issue_comment", issue_comment_event(self.github, REPO, number, comment))
        return self.output(self.settle(count)[0])

    def summary(self, number: int = 1) -> str:
        mine = [c for c in self.github.comments(REPO, number) if MARKER in c["body"]]
        assert len(mine) == 1, [c["body"][:80] for c in mine]
        return str(mine[0]["body"])

    def replies(self, number: int = 1) -> list[str]:
        return [c["body"] for c in self.github.comments(REPO, number)
                if c["user"]["type"] == "Bot" and MARKER not in c["body"]]

    def inline(self, number: int = 1) -> list[dict[str, Any]]:
        return [c for r in self.github.reviews(REPO, number) for c in r["_comments"]]


@pytest.fixture()
def bot(tmp_path: Path, guest_wasm: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        make_runtime: Callable[..., Runtime]) -> Iterator[Stack]:
    yield from stack(tmp_path, guest_wasm, monkeypatch, make_runtime, "")


def stack(tmp_path: Path, guest_wasm: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
          make_runtime: Callable[..., Runtime], extra: str) -> Iterator[Stack]:
    monkeypatch.setenv("WASMFLOW_TEST_LLM_KEY", "sk-test")
    script = Scripted()
    with GithubStandin() as github, OpenAIStandin(script) as llm:
        github.add_repo(REPO)
        app = tmp_path / "app"
        app.mkdir()
        (app / "app.pem").write_text(github.private_key_pem)
        runtime = make_runtime(app, FLOWS.format(app_id=github.app_id, secret=SECRET, api=github.url,
                                                 wasm=guest_wasm["code-review"], llm=llm.base_url,
                                                 extra=extra))
        with ServerThread(runtime, Options(workers=1, poll_interval=0.1)) as server:
            yield Stack(github, llm, script, server)


def test_a_grounded_finding_becomes_a_suggestion_and_the_check_completes(bot: Stack) -> None:
    bot.script.findings = [OFF_BY_ONE]
    out = bot.opened()
    assert out["action"] == "reviewed" and out["findings"] == 1 and out["suggestions"] == 1, out
    [comment] = bot.inline()
    assert (comment["path"], comment["line"]) == ("src/cart.rs", 3)
    assert "```suggestion\n    for i in 0..items.len() {\n```" in comment["body"] and "Off by one" in comment["body"]
    [check] = bot.github.check_runs(REPO)
    assert check["head_sha"] == bot.github.repos[REPO].pulls[1].head_sha
    assert check["_history"] == [("in_progress", None), ("completed", "neutral")]  # a high finding: not a green tick
    assert check["output"]["title"] == "1 finding(s): 1 high, 0 medium, 0 low"
    assert "src/cart.rs:3" in check["output"]["summary"]
    body = bot.summary()
    assert "suggested change inline" in body and "model finding" not in body
    assert "settings: the flow's config (no `.github/wasmflow.yaml` on `main`)" in body


def test_ungrounded_findings_are_dropped_and_counted(bot: Stack) -> None:
    bot.script.findings = UNGROUNDED + [OFF_BY_ONE, dict(OFF_BY_ONE)]
    out = bot.opened()
    assert out["findings"] == 1 and out["dropped"]["ungrounded"] == 2 and out["dropped"]["duplicate"] == 1, out
    assert len(bot.inline()) == 1
    body = bot.summary()
    assert ("3 model findings dropped: 1 not about changed code, 1 quoted code not on the lines named, 1 duplicate"
            in body)
    assert "California" not in body and "checkout.rs" not in body


def test_nothing_usable_gives_an_honest_summary(bot: Stack) -> None:
    bot.script.findings = UNGROUNDED
    out = bot.opened()
    assert out["findings"] == 0 and bot.inline() == []
    body = bot.summary()
    assert "**No model findings**: nothing the model proposed was about the changed code." in body
    assert "### Checks" in body and "2 model findings dropped" in body
    assert bot.github.check_runs(REPO)[0]["conclusion"] == "success"


def test_a_summary_about_something_else_is_left_out(bot: Stack) -> None:
    bot.script.summary = "The state of California is known for its beaches and sunny weather."
    out = bot.opened()
    assert out["summaries_dropped"] == 1
    body = bot.summary()
    assert "California" not in body and "did not describe this change, so it is left out" in body


def test_a_skipped_pr_gets_a_neutral_check_with_the_reason(bot: Stack) -> None:
    out = bot.opened(draft=True)
    assert out["action"] == "skipped" and "draft" in out["reason"]
    [check] = bot.github.check_runs(REPO)
    assert check["conclusion"] == "neutral" and check["output"]["title"].startswith("Skipped: draft pull request")
    assert "/review" in check["output"]["summary"]
    assert bot.llm.chat_requests() == [] and bot.github.comments(REPO, 1) == []


def test_pause_resume_help_and_unknown_commands(bot: Stack) -> None:
    bot.script.findings = [OFF_BY_ONE]
    bot.opened()
    assert bot.command("/pause", 2)["command"] == "pause"
    head = bot.github.push(REPO, 1, [added_file("src/cart.rs", CART + ["// more"])])
    bot.send("pull_request", pull_request_event(bot.github, REPO, 1, action="synchronize"))
    out = bot.output(bot.settle(3)[0])
    assert "paused (by @octocat" in out["reason"]
    assert bot.github.check_runs(REPO, head)[0]["conclusion"] == "neutral"
    bot.command("/resume", 4)
    assert bot.command("/help", 5)["command"] == "help"
    unknown = bot.command("/frobnicate", 6)
    assert unknown["unknown"] == "frobnicate"
    replies = bot.replies()
    assert "paused (by @octocat)" in replies[0] and "back on" in replies[1]
    assert "| `/ask QUESTION` |" in replies[2] and replies[3].startswith("I don't know `/frobnicate`.") and "| `/help` |" in replies[3]


def test_a_non_collaborators_review_is_refused(bot: Stack) -> None:
    bot.script.findings = [OFF_BY_ONE]
    bot.opened()
    calls = len(bot.llm.chat_requests())
    out = bot.command("/review full", 2, user="mallory")
    assert out["action"] == "refused" and out["user"] == "mallory"
    assert len(bot.llm.chat_requests()) == calls
    assert "only available to people with write access" in bot.replies()[-1]
    bot.github.set_permission(REPO, "mallory", "write")
    assert bot.command("/review full", 3, user="mallory")["action"] == "reviewed"
    assert len(bot.llm.chat_requests()) == calls + 1


def test_ask_answers_from_the_diff(bot: Stack) -> None:
    bot.opened()
    out = bot.command("/ask does the loop cover every item?", 2)
    assert out["command"] == "ask"
    reply = bot.replies()[-1]
    assert reply.startswith("> does the loop cover every item?") and "stops one item early" in reply
    asked = bot.llm.chat_requests()[-1]["body"]["messages"][-1]["content"]
    assert "for i in 0..items.len() - 1 {" in asked and "Question: does the loop cover every item?" in asked


def test_describe_edits_only_its_section_and_adds_labels(bot: Stack) -> None:
    bot.opened(body="Fixes #12.\n\nPlease look at the loop.")
    bot.command("/describe", 2)
    pr = bot.github.repos[REPO].pulls[1]
    assert pr.body.startswith("Fixes #12.\n\nPlease look at the loop.\n\n<!-- wasmflow:describe:start -->")
    assert "Adds `total` for the cart." in pr.body and pr.body.endswith("<!-- wasmflow:describe:end -->")
    assert bot.github.repos[REPO].issues[1].labels == ["bug"]
    assert "**Suggested title:** Fix the cart total" in bot.replies()[-1] and pr.title == "Cart total"
    # Someone edits the body around the section; a second /describe replaces the section only.
    pr.body = "Fixes #12 and #13.\n\n" + pr.body.split("\n\n", 2)[2] + "\n\nThanks!"
    before = pr.body
    bot.script.describe = {"title": "Fix the cart total", "description": "Second take.", "labels": ["not-a-label"]}
    bot.command("/describe", 3)
    assert re.sub(r"start -->.*<!-- wasmflow:describe:end", "", pr.body, flags=re.S) == \
        re.sub(r"start -->.*<!-- wasmflow:describe:end", "", before, flags=re.S)
    assert "Second take." in pr.body and "Adds `total`" not in pr.body and pr.body.endswith("Thanks!")
    assert bot.github.repos[REPO].issues[1].labels == ["bug"]  # a label outside the allowed list is not added


def test_repo_config_comes_from_the_base_branch_only(bot: Stack) -> None:
    bot.github.set_file(REPO, "main", ".github/wasmflow.yaml", "severity_threshold: high\nmax_findings: 1\n")
    bot.github.set_file(REPO, "feature", ".github/wasmflow.yaml", "severity_threshold: low\nmax_findings: 9\n")
    medium = dict(OFF_BY_ONE, severity="medium")
    bot.script.findings = [medium]
    out = bot.opened()
    assert out["findings"] == 0 and out["dropped"]["below_threshold"] == 1, out
    assert out["settings"] == "`.github/wasmflow.yaml` on `main`"
    assert "settings: `.github/wasmflow.yaml` on `main`" in bot.summary()
    contents = [r for r in bot.github.api_calls() if "/contents/" in r.path]
    assert contents and all("ref=main" in r.query for r in contents)


def test_a_bad_repo_config_is_reported_once_with_line_numbers_and_reviews_go_on(bot: Stack) -> None:
    bot.github.set_file(REPO, "main", ".github/wasmflow.yaml", "language: French\nmax_findigns: 3\nauto_review: maybe\n")
    bot.script.findings = [OFF_BY_ONE]
    out = bot.opened()
    assert out["action"] == "reviewed" and out["findings"] == 1
    notes = [c for c in bot.replies() if "could not use `.github/wasmflow.yaml`" in c]
    assert len(notes) == 1 and "- line 2: unknown key \"max_findigns\"" in notes[0]
    assert "- line 3: auto_review: expected true or false" in notes[0]
    assert "has 2 problem(s)" in bot.summary()
    bot.command("/review full", 2)
    assert len([c for c in bot.replies() if "could not use" in c]) == 1  # the same file is reported once


def test_a_failed_run_fails_the_check_and_replaces_the_placeholder(bot: Stack) -> None:
    bot.llm.fail_next(503, times=5)
    pr = bot.github.add_pull(REPO, "Cart total", [added_file("src/cart.rs", CART)])
    bot.send("pull_request", pull_request_event(bot.github, REPO, pr.number))
    run = bot.settle(1)[0]
    assert run.state == "dead"
    [check] = bot.github.check_runs(REPO)
    assert check["conclusion"] == "failure" and "could not finish the review" in check["output"]["summary"]
    body = bot.summary()
    assert "could not finish the review" in body and "⏳" not in body


def test_an_exhausted_model_budget_gives_a_neutral_check_and_the_deterministic_checks(
        tmp_path: Path, guest_wasm: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        make_runtime: Callable[..., Runtime]) -> None:
    budget = '    budget: {llm_tokens: 50, per: 1d, key: "{repo}"}\n'
    for s in stack(tmp_path, guest_wasm, monkeypatch, make_runtime, budget):
        s.script.findings = [OFF_BY_ONE]
        assert s.opened()["findings"] == 1  # the first review spends the budget (its prompt alone is over 50 tokens)
        calls = len(s.llm.chat_requests())
        out = s.opened(count=2)
        assert out["action"] == "reviewed" and out["budget_exhausted"] and "budget exhausted" in out["budget_exhausted"]
        assert len(s.llm.chat_requests()) == calls  # refused by the host: the endpoint never saw a request
        check = s.github.check_runs(REPO, s.github.repos[REPO].pulls[2].head_sha)[0]
        assert check["conclusion"] == "neutral" and check["output"]["title"] == "Skipped: the model budget is exhausted"
        body = s.summary(2)
        assert "No model review: the flow's model budget is exhausted" in body and "### Checks" in body
