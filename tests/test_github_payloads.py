"""The payload builders keep the shape of GitHub's documented examples (tests/fixtures/github), and the
bot handles the documented payloads themselves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wasmflow.devtools.github_payloads import delivery_headers, issue_comment_event, issues_event, pull_request_event, sign
from wasmflow.devtools.github_standin import GithubStandin, added_file
from wasmflow.flows.model import Allow, Flow, FlowsFile
from wasmflow.host_functions.spec import Event
from wasmflow.runtime import Runtime

FIXTURES = Path(__file__).parent / "fixtures" / "github"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def missing_keys(example: Any, built: Any, path: str = "") -> list[str]:
    """Key paths of the documented example that the built payload lacks (lists compared by first item)."""
    if isinstance(example, dict):
        if not isinstance(built, dict):
            return [path or "."]
        out = []
        for key, value in example.items():
            if key not in built:
                out.append(f"{path}.{key}")
            else:
                out += missing_keys(value, built[key], f"{path}.{key}")
        return out
    if isinstance(example, list) and example and isinstance(built, list) and built:
        return missing_keys(example[0], built[0], path + "[0]")
    return []


def test_builders_have_every_documented_field() -> None:
    with GithubStandin() as gh:
        gh.add_pull("Codertocat/Hello-World", "Update the README", [added_file("README.md", ["hi"])])
        issue = gh.add_issue("Codertocat/Hello-World", "Spelling error", "two t's", labels=["bug"])
        comment = gh.add_comment("Codertocat/Hello-World", issue.number, "You are right")
        built = {
            "pull_request.opened.json": pull_request_event(gh, "Codertocat/Hello-World", 1),
            "issue_comment.created.json": issue_comment_event(gh, "Codertocat/Hello-World", issue.number, comment),
            "issues.opened.json": issues_event(gh, "Codertocat/Hello-World", issue.number),
        }
    for name, payload in built.items():
        assert missing_keys(load(name), payload) == [], name


def test_signature_matches_githubs_test_vector() -> None:
    assert sign("It's a Secret to Everybody", b"Hello, World!") == \
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    headers = delivery_headers("issues", b"{}", "s", delivery="abc")
    assert headers["x-github-delivery"] == "abc" and headers["x-hub-signature-256"].startswith("sha256=")


@pytest.mark.parametrize("event,fixture,reason", [
    ("issue_comment", "issue_comment.created.json", "comment does not start with the trigger phrase"),
    ("issues", "issues.opened.json", "event issues is not handled"),
])
def test_the_bot_skips_documented_payloads_cleanly(tmp_path: Path, guest_wasm: dict[str, Path], event: str,
                                                   fixture: str, reason: str) -> None:
    flows = FlowsFile(flows=[Flow(name="code-review", module=str(guest_wasm["code-review"]), allow=Allow(kv=True))],
                      state_dir=str(tmp_path / "state"))
    runtime = Runtime(flows, tmp_path)
    try:
        body = (FIXTURES / fixture).read_bytes()
        result = runtime.run("code-review", Event(event, body, delivery_headers(event, body, None), "d-1", "github"))
        assert result.ok, (result.status, result.error, result.stderr)
        assert json.loads(result.output) == {"action": "skipped", "reason": reason}
    finally:
        runtime.close()


def test_a_command_on_a_plain_issue_is_skipped(tmp_path: Path, guest_wasm: dict[str, Path]) -> None:
    payload = load("issue_comment.created.json")
    payload["comment"]["body"] = "/review"
    flows = FlowsFile(flows=[Flow(name="code-review", module=str(guest_wasm["code-review"]), allow=Allow(kv=True))],
                      state_dir=str(tmp_path / "state"))
    runtime = Runtime(flows, tmp_path)
    try:
        body = json.dumps(payload).encode()
        result = runtime.run("code-review", Event("issue_comment", body, {}, "d-2", "github"))
        assert json.loads(result.output)["reason"] == "comment is on an issue, not a pull request"
    finally:
        runtime.close()
