"""The GitHub App in the host: tokens, scope and permission checks, pagination, rate limits.

The stand-in speaks GitHub's wire format; the first tests drive it with PyGithub's own high-level
objects, so the stand-in is checked against the real client before the host is tested against it.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import pytest
from github import Auth, Github, GithubIntegration

from wasmflow.devtools.github_payloads import pull_request_event
from wasmflow.devtools.github_standin import FileChange, GithubStandin, added_file
from wasmflow.flows.model import Allow, Flow
from wasmflow.host_functions.github import GithubApp, GithubCapability, classify, parse_links, rate_limit_wait
from wasmflow.host_functions.spec import Call, Code, Event, HostError, RunContext
from guest_support import Memory

REPO = "octo-org/hello-world"


@pytest.fixture()
def standin() -> Any:
    with GithubStandin() as s:
        s.add_repo(REPO)
        yield s


def many_files(n: int) -> list[FileChange]:
    return [added_file(f"src/mod{i}.rs", [f"pub fn f{i}() -> u32 {{ {i} }}"]) for i in range(n)]


def test_standin_speaks_github_to_pygithub(standin: GithubStandin) -> None:
    pr = standin.add_pull(REPO, "Add modules", many_files(250), body="adds things")
    integration = GithubIntegration(auth=Auth.AppAuth(standin.app_id, standin.private_key_pem), base_url=standin.url)
    token = integration.get_access_token(standin.installation_id)
    assert token.token.startswith("ghs_") and token.expires_at.timestamp() > time.time() + 3000
    gh = Github(auth=Auth.Token(token.token), base_url=standin.url, per_page=100)
    repo = gh.get_repo(REPO)
    pull = repo.get_pull(pr.number)
    assert pull.head.sha == pr.head_sha and pull.changed_files == 250 and pull.title == "Add modules"
    files = list(pull.get_files())  # three pages, followed through the Link headers
    assert [f.filename for f in files] == [f"src/mod{i}.rs" for i in range(250)]
    page_requests = [r for r in standin.requests if r.path.endswith("/files")]
    assert len(page_requests) == 3
    comment = pull.create_issue_comment("first")
    comment.edit("edited")
    assert [c.body for c in pull.get_issue_comments()] == ["edited"]
    review = pull.create_review(body="r", event="COMMENT",
                                comments=[{"path": "src/mod3.rs", "line": 1, "body": "nit"}])
    assert review.state == "COMMENTED"
    with pytest.raises(Exception) as err:  # line outside the diff: GitHub answers 422
        pull.create_review(body="r", event="COMMENT", comments=[{"path": "src/mod3.rs", "line": 40, "body": "x"}])
    assert "422" in str(err.value)
    issue = repo.get_issue(pr.number)
    issue.add_to_labels("needs-review")
    assert [label.name for label in repo.get_issue(pr.number).labels] == ["needs-review"]
    found = gh.search_issues(f"repo:{REPO} modules")
    assert found.totalCount == 1


def test_standin_rejects_a_jwt_signed_by_another_key(standin: GithubStandin) -> None:
    from wasmflow.devtools.github_standin import generate_app_key

    other, _ = generate_app_key()
    integration = GithubIntegration(auth=Auth.AppAuth(standin.app_id, other), base_url=standin.url)
    with pytest.raises(Exception) as err:
        integration.get_access_token(standin.installation_id)
    assert "401" in str(err.value)


def test_installation_token_is_cached_and_refreshed_after_a_401(standin: GithubStandin) -> None:
    standin.add_pull(REPO, "t", many_files(1))
    app = GithubApp(standin.app_id, standin.private_key_pem, api_url=standin.url, min_write_interval=0)
    first = app.request(standin.installation_id, "GET", f"/repos/{REPO}/pulls/1", accept="application/vnd.github+json")
    second = app.request(standin.installation_id, "GET", f"/repos/{REPO}/pulls/1", accept="application/vnd.github+json")
    assert first.status == second.status == 200 and app.token_fetches == 1
    standin.revoke_tokens()
    third = app.request(standin.installation_id, "GET", f"/repos/{REPO}/pulls/1", accept="application/vnd.github+json")
    assert third.status == 200 and app.token_fetches == 2
    assert [r.status for r in standin.requests if r.path.endswith("/pulls/1")] == [200, 200, 401, 200]


def test_scope_and_permission_classification() -> None:
    repos = [REPO]
    assert classify("GET", f"/repos/{REPO}/pulls/1/files", {}, repos).permission == "pull_requests"
    assert classify("POST", f"/repos/{REPO}/issues/1/comments", {}, repos).level == "write"
    assert classify("GET", f"/repos/{REPO}/compare/a...b", {}, repos).permission == "contents"
    assert classify("GET", "/search/issues", {"q": [f"repo:{REPO} crash"]}, repos).permission == "issues"
    for method, path, query in [
        ("GET", "/repos/other/repo/pulls/1", {}),
        ("GET", f"/repos/{REPO}/../../other/repo", {}),
        ("GET", f"/repos/{REPO}/hooks", {}),
        ("DELETE", f"/repos/{REPO}", {}),
        ("GET", "/search/issues", {"q": ["org:octo-org crash"]}),
        ("GET", "/search/issues", {"q": [f"repo:{REPO} repo:other/x"]}),
        ("GET", "/user", {}),
        ("GET", f"/repos/{REPO}%2F..%2Fx/pulls", {}),
    ]:
        with pytest.raises(ValueError):
            classify(method, path, query, repos)


def test_rate_limit_waits() -> None:
    assert rate_limit_wait(200, {}, "", 0) is None
    assert rate_limit_wait(403, {"retry-after": "7"}, "", 0) == 7.0
    reset = str(int(time.time()) + 30)
    assert 29 <= rate_limit_wait(403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}, "", 0) <= 32
    assert rate_limit_wait(403, {}, '{"message": "You have exceeded a secondary rate limit"}', 1) == 120.0
    assert rate_limit_wait(403, {}, '{"message": "Resource not accessible by integration"}', 0) is None
    assert parse_links('<http://x/a?page=2>; rel="next", <http://x/a?page=5>; rel="last"')["next"] == "http://x/a?page=2"


# -- the host functions, called as a guest would ------------------------------------------------------

def make_run(standin: GithubStandin, allow: dict[str, str], number: int = 1, timeout: float = 30,
             trigger: str = "github") -> tuple[RunContext, Memory]:
    payload = pull_request_event(standin, REPO, number)
    flow = Flow(name="review", module="x.wasm", allow=Allow(github=allow))
    event = Event("pull_request", json.dumps(payload).encode(), {"x-github-event": "pull_request"}, "d-1", trigger)
    run = RunContext(flow=flow, event=event, run_id="r1", deadline=time.monotonic() + timeout)
    return run, Memory()


def gh_call(cap: GithubCapability, run: RunContext, mem: Memory, req: dict[str, Any], body: Any = None) -> tuple[dict[str, Any], bytes]:
    rp, rl = mem.put(json.dumps(req).encode())
    bp, bl = mem.put(json.dumps(body).encode()) if body is not None else (0, 0)
    out = mem.top
    mem.top += 16
    code = cap.github_request(Call(mem, run), rp, rl, bp, bl, out)
    assert code == Code.OK
    h1, l1, h2, l2 = struct.unpack("<IIII", mem.read(out, 16))
    return json.loads(run.take_result(h1, l1)), run.take_result(h2, l2)


def capability(standin: GithubStandin) -> GithubCapability:
    return GithubCapability(GithubApp(standin.app_id, standin.private_key_pem, api_url=standin.url,
                                      min_write_interval=0, sleep=time.sleep))


def test_github_request_paginates_and_serves_diffs(standin: GithubStandin) -> None:
    standin.add_pull(REPO, "big", many_files(230))
    cap = capability(standin)
    run, mem = make_run(standin, {"pull_requests": "read"})
    cap.open_run(run)
    head, body = gh_call(cap, run, mem, {"path": "/repos/{repo}/pulls/1/files", "paginate": True})
    files = json.loads(body)
    assert head["status"] == 200 and head["pages"] == 3 and len(files) == 230 and files[-1]["filename"] == "src/mod229.rs"
    head, body = gh_call(cap, run, mem, {"path": f"/repos/{REPO}/pulls/1", "accept": "diff"})
    assert body.startswith(b"diff --git a/src/mod0.rs b/src/mod0.rs") and head["status"] == 200
    assert run.state["github"].calls == 4
    cap.close_run(run)
    assert "4 GitHub API calls" in run.logs[-1][2]


def test_github_request_refuses_what_the_flow_did_not_declare(standin: GithubStandin) -> None:
    standin.add_pull(REPO, "p", many_files(1))
    cap = capability(standin)
    run, mem = make_run(standin, {"pull_requests": "read"})
    cap.open_run(run)
    calls_before = len(standin.requests)
    for req, body in [
        ({"path": f"/repos/{REPO}/issues/1/comments", "method": "POST"}, {"body": "hi"}),  # no issues: write
        ({"path": f"/repos/{REPO}/pulls/1/reviews", "method": "POST"}, {"body": "hi"}),  # read only
        ({"path": "/repos/someone/else/pulls/1"}, None),  # another repository
    ]:
        rp, rl = mem.put(json.dumps(req).encode())
        bp, bl = mem.put(json.dumps(body).encode()) if body else (0, 0)
        with pytest.raises(HostError) as err:
            cap.github_request(Call(mem, run), rp, rl, bp, bl, 60000)
        assert err.value.code == Code.DENIED
    assert len(run.denials) == 3 and "issues: write" in run.denials[0]
    assert len(standin.requests) == calls_before  # nothing reached GitHub


def test_github_request_waits_out_a_short_secondary_limit_and_gives_up_on_a_long_one(standin: GithubStandin) -> None:
    standin.add_pull(REPO, "p", many_files(1))
    cap = capability(standin)
    run, mem = make_run(standin, {"pull_requests": "read", "issues": "write"})
    cap.open_run(run)
    standin.fail_next(r"/issues/1/comments$", 403, headers={"Retry-After": "1"},
                      message="You have exceeded a secondary rate limit")
    started = time.monotonic()
    head, body = gh_call(cap, run, mem, {"path": "/repos/{repo}/issues/1/comments", "method": "POST"}, {"body": "hello"})
    assert head["status"] == 201 and json.loads(body)["body"] == "hello"
    assert time.monotonic() - started >= 1.0 and run.state["github"].waited == 1.0
    standin.fail_next(r"/issues/1/comments$", 429, headers={"Retry-After": "600"})
    rp, rl = mem.put(json.dumps({"path": "/repos/{repo}/issues/1/comments"}).encode())
    with pytest.raises(HostError) as err:
        cap.github_request(Call(mem, run), rp, rl, 0, 0, 60000)
    assert err.value.code == Code.UPSTREAM and "rate limit" in err.value.message


def test_github_info_names_the_repository_and_bot(standin: GithubStandin) -> None:
    standin.add_pull(REPO, "p", many_files(1))
    cap = capability(standin)
    run, mem = make_run(standin, {"pull_requests": "read"})
    cap.open_run(run)
    out = 60000
    assert cap.github_info(Call(mem, run), out) == Code.OK
    h, n = struct.unpack("<II", mem.read(out, 8))
    info = json.loads(run.take_result(h, n))
    assert info["repository"] == REPO and info["installation_id"] == standin.installation_id
    assert info["bot_login"] == "wasmflow-review[bot]"


def test_an_http_trigger_cannot_forge_a_github_event(standin: GithubStandin) -> None:
    """The body of an HTTP-triggered run comes from anyone: even with GitHub's headers and payload shape,
    it names no repository the host will act on."""
    standin.add_pull(REPO, "p", many_files(1))
    cap = capability(standin)
    run, mem = make_run(standin, {"pull_requests": "write"}, trigger="http")
    cap.open_run(run)
    rp, rl = mem.put(json.dumps({"path": f"/repos/{REPO}/pulls/1"}).encode())
    with pytest.raises(HostError) as err:
        cap.github_request(Call(mem, run), rp, rl, 0, 0, 60000)
    assert err.value.code == Code.DENIED and not standin.api_calls()


def test_tokens_are_renewed_shortly_before_they_expire(standin: GithubStandin) -> None:
    standin.add_pull(REPO, "t", many_files(1))
    standin.token_ttl = 200  # inside the 5-minute renewal margin: each call must mint a fresh token
    app = GithubApp(standin.app_id, standin.private_key_pem, api_url=standin.url, min_write_interval=0)
    for _ in range(2):
        assert app.request(standin.installation_id, "GET", f"/repos/{REPO}/pulls/1",
                           accept="application/vnd.github+json").status == 200
    assert app.token_fetches == 2


def test_extra_repositories_come_only_from_the_flow() -> None:
    assert classify("GET", "/repos/octo-org/other/issues", {}, [REPO, "octo-org/*"]).repo == "octo-org/other"
    with pytest.raises(ValueError):
        classify("GET", "/repos/evil/other/issues", {}, [REPO, "octo-org/*"])


def test_an_exhausted_primary_limit_is_waited_out_before_the_next_request(standin: GithubStandin) -> None:
    standin.add_pull(REPO, "t", many_files(1))
    slept: list[float] = []
    app = GithubApp(standin.app_id, standin.private_key_pem, api_url=standin.url, min_write_interval=0,
                    sleep=slept.append)
    reset = int(time.time()) + 5
    standin.fail_next(r"/pulls/1$", 200, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})
    app.request(standin.installation_id, "GET", f"/repos/{REPO}/pulls/1", accept="application/vnd.github+json",
                deadline=time.monotonic() + 30)
    app.request(standin.installation_id, "GET", f"/repos/{REPO}/pulls/1", accept="application/vnd.github+json",
                deadline=time.monotonic() + 30)
    assert len(slept) == 1 and 4 <= slept[0] <= 7
    # The same exhausted limit with a deadline too close to wait for: UPSTREAM, and no request is sent.
    standin.fail_next(r"/pulls/1$", 200, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 50)})
    app.request(standin.installation_id, "GET", f"/repos/{REPO}/pulls/1", accept="application/vnd.github+json")
    sent = len(standin.requests)
    with pytest.raises(HostError) as err:
        app.request(standin.installation_id, "GET", f"/repos/{REPO}/pulls/1", accept="application/vnd.github+json",
                    deadline=time.monotonic() + 10)
    assert err.value.code == Code.UPSTREAM and len(standin.requests) == sent
