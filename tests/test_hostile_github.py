"""Hostile guests against the GitHub capability: paths and searches that try to leave the event's repository.

Issue 9, class 12 (and class 13 for `github_request`): the host checks a guest's path against the
event's repository and the flow's `allow.github`, then sends exactly what it checked; a search is limited
to the event's repository whatever its qualifiers say. Each bypass is driven through the real capability
against the GitHub stand-in, and must be refused (DENIED; the run `denied`) with nothing sent for another
repository. Malformed arguments are the guest's error: INVALID with a message, never INTERNAL.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs

import pytest

from hostile_support import assert_no_leak, engine_name, planted_secret, run_flow  # noqa: F401 (fixtures)
from wasmflow.devtools.github_payloads import pull_request_event
from wasmflow.devtools.github_standin import GithubStandin, added_file
from wasmflow.engine import Status
from wasmflow.flows.model import Allow, Flow
from wasmflow.host_functions.github import GithubApp, GithubCapability, classify, normalise_path, search_query
from wasmflow.host_functions.spec import Call, Code, Event, HostError, RunContext
from guest_support import Memory

REPO = "octo-org/hello-world"
OTHER = "evil-org/secrets"
ALLOW = {"pull_requests": "read", "issues": "read", "contents": "read"}


@pytest.fixture()
def standin() -> Iterator[GithubStandin]:
    with GithubStandin() as s:
        s.add_repo(REPO)
        s.add_pull(REPO, "crash on start", [added_file("src/a.rs", ["fn a() {}"])])
        s.add_repo(OTHER)
        s.add_issue(OTHER, "crash: the secret roadmap", body="private")
        s.add_repo("evil-org/other")
        yield s


def repos_reached(standin: GithubStandin) -> set[str]:
    """Every repository the stand-in was asked about (searches as GitHub would scope them)."""
    reached: set[str] = set()
    for r in standin.api_calls():
        match = re.match(r"^/repos/([^/]+)/([^/]+)", r.path)
        if match:
            reached.add(f"{match[1]}/{match[2]}".lower())
        elif r.path == "/search/issues":
            reached |= standin.search_scope(parse_qs(r.query).get("q", [""])[0])
        else:
            reached.add(f"outside any repository: {r.path}")
    return reached


def capability(standin: GithubStandin) -> GithubCapability:
    return GithubCapability(GithubApp(standin.app_id, standin.private_key_pem, api_url=standin.url,
                                      min_write_interval=0, sleep=time.sleep))


def make_run(standin: GithubStandin, allow: dict[str, str] = ALLOW) -> RunContext:
    payload = pull_request_event(standin, REPO, 1)
    flow = Flow(name="review", module="x.wasm", allow=Allow(github=allow))
    event = Event("pull_request", json.dumps(payload).encode(), {"x-github-event": "pull_request"}, "d-1", "github")
    return RunContext(flow=flow, event=event, run_id="r1", deadline=time.monotonic() + 30)


def call_raw(cap: GithubCapability, run: RunContext, mem: Memory, req: bytes, body: bytes = b"") -> int:
    rp, rl = mem.put(req)
    bp, bl = mem.put(body) if body else (0, 0)
    out = mem.top
    mem.top += 16
    return cap.github_request(Call(mem, run), rp, rl, bp, bl, out)


def refused(cap: GithubCapability, run: RunContext, mem: Memory, req: dict[str, Any], body: Any = None) -> HostError:
    with pytest.raises(HostError) as err:
        call_raw(cap, run, mem, json.dumps(req).encode(), json.dumps(body).encode() if body is not None else b"")
    return err.value


def served(cap: GithubCapability, run: RunContext, mem: Memory, req: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    rp, rl = mem.put(json.dumps(req).encode())
    out = mem.top
    mem.top += 16
    assert cap.github_request(Call(mem, run), rp, rl, 0, 0, out) == Code.OK
    h1, l1, h2, l2 = struct.unpack("<IIII", mem.read(out, 16))
    return json.loads(run.take_result(h1, l1)), json.loads(run.take_result(h2, l2))


PATH_BYPASSES = [
    "//evil.example/repos/{repo}/pulls/1",  # checked as /repos/{repo}/..., sent as //evil.example/...
    f"//repos/{OTHER}/issues",
    "/repos/{repo}/../../" + OTHER + "/issues",
    "/repos/{repo}/issues/%2e%2e/%2E%2E/%2e%2e/" + OTHER + "/issues",
    "/repos/{repo}/contents/..%2F..%2F..%2F" + OTHER,
    "/repos/evil-org%2Fsecrets/issues",
    "/repos/{repo}/contents/%252e%252e/%252e%252e",
    f"https://api.github.com/repos/{OTHER}/issues",
    f"http://127.0.0.1:1/repos/{OTHER}/issues",
    "repos/{repo}/issues",
    "/repos/{repo}\\..\\..\\" + OTHER.replace("/", "\\") + "/issues",
    "/repos/{repo}/issues#/../../" + OTHER,
    f"/repos/{OTHER}/issues?next=/repos/{{repo}}/issues",
    f"/search/issues?q=repo:{OTHER}",
    "/repos/{repo}/issues\x00/../../" + OTHER,
    "/repos/{repo}/issues/\t/..",
    "/repos/{repo}/./issues",
    "/repos/{repo}/issues/",
    "/repos/{repo}/issues/1/ṡ",
]

SEARCH_BYPASSES = [
    f"Repo:{OTHER} crash",
    f"REPO:{OTHER} crash",
    f"repo:{REPO} OR repo:{OTHER}",
    f"repo:{REPO} crash OR is:open",
    f"repo:{REPO} crash or roadmap",
    f'repo:"{OTHER}" crash',
    f'"repo:{OTHER}"',
    f"-repo:{REPO} crash",
    f"NOT repo:{REPO}",
    "org:evil-org crash",
    "user:evil-org crash",
    "Owner:evil-org crash",
    f"(repo:{REPO} OR org:evil-org) crash",
    f"repo:{REPO} repo:{OTHER}",
    "repo:evil-org/*",
    f"crash repo:{REPO},repo:{OTHER}",
]


def test_path_bypasses_are_denied_and_nothing_leaves_the_repository(standin: GithubStandin) -> None:
    cap = capability(standin)
    run = make_run(standin)
    cap.open_run(run)
    mem = Memory()
    for path in PATH_BYPASSES:
        err = refused(cap, run, mem, {"path": path})
        assert err.code == Code.DENIED, (path, err)
    for q in SEARCH_BYPASSES:
        err = refused(cap, run, mem, {"path": "/search/issues", "query": {"q": q}})
        assert err.code == Code.DENIED, (q, err)
    err = refused(cap, run, mem, {"path": f"/search/issues?q=repo:{OTHER}", "query": {"q": f"repo:{REPO}"}})
    assert err.code == Code.DENIED and "`query`" in err.message
    assert len(run.denials) == len(PATH_BYPASSES) + len(SEARCH_BYPASSES) + 1
    assert standin.api_calls() == []  # nothing was sent at all


def test_what_is_sent_is_what_was_checked(standin: GithubStandin) -> None:
    """The requests a guest may make go out exactly as checked; a search without a repository is
    limited to the event's."""
    cap = capability(standin)
    run = make_run(standin)
    cap.open_run(run)
    mem = Memory()
    head, pull = served(cap, run, mem, {"path": "/repos/{repo}/pulls/1"})
    assert head["status"] == 200 and pull["number"] == 1
    head, found = served(cap, run, mem, {"path": "/search/issues", "query": {"q": "crash"}})
    assert head["status"] == 200 and [i["title"] for i in found["items"]] == ["crash on start"]
    head, found = served(cap, run, mem, {"path": "/search/issues", "query": {"q": f'repo:"{REPO.upper()}" is:pr crash'}})
    assert head["status"] == 200 and found["total_count"] == 1
    head, _ = served(cap, run, mem, {"path": "/repos/{repo}/contents/docs/My%20File.md"})
    assert head["status"] == 404  # percent-encoded names are fine; the stand-in has no such file
    assert repos_reached(standin) == {REPO}
    searched = [parse_qs(r.query)["q"][0] for r in standin.api_calls() if r.path == "/search/issues"]
    assert searched == [f"crash repo:{REPO}", f'repo:"{REPO.upper()}" is:pr crash']
    assert [r.path for r in standin.api_calls()][-1] == f"/repos/{REPO}/contents/docs/My File.md"


def test_normalise_path_and_search_query_units() -> None:
    assert normalise_path("/repos/a/b/compare/main...feature") == "/repos/a/b/compare/main...feature"
    assert normalise_path("/repos/a/b/git/refs/heads/feature/x") == "/repos/a/b/git/refs/heads/feature/x"
    for bad in PATH_BYPASSES:
        with pytest.raises(ValueError):
            normalise_path(bad.replace("{repo}", REPO))
    assert search_query("crash", [REPO]) == f"crash repo:{REPO}"
    assert search_query(f"repo:{REPO} crash -label:bug NOT wontfix", [REPO]) == f"repo:{REPO} crash -label:bug NOT wontfix"
    for q in SEARCH_BYPASSES:
        with pytest.raises(ValueError):
            search_query(q, [REPO])
    with pytest.raises(ValueError):
        classify("GET", "/search/issues", {"q": ["crash", "repo:x/y"]}, [REPO])


def github_section(standin: GithubStandin) -> dict[str, Any]:
    return {"app_id": standin.app_id, "private_key": standin.private_key_pem, "webhook_secret": "unused",
            "api_url": standin.url, "bot_login": "wasmflow-review[bot]", "min_write_interval": 0}


def request_wat(req: dict[str, Any]) -> str:
    """A guest making one `github_request` and trapping when it is refused."""
    data = json.dumps(req).encode()
    escaped = "".join(f"\\{b:02x}" for b in data)
    return f"""(module
 (import "wasmflow" "github_request" (func $gh (param i32 i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 1024) "{escaped}")
 (func (export "_start")
   (if (call $gh (i32.const 1024) (i32.const {len(data)}) (i32.const 0) (i32.const 0) (i32.const 0))
     (then unreachable))))"""


@pytest.mark.parametrize("req", [
    {"path": "/repos/{repo}/pulls/1"},  # the control: allowed, and it works end to end
    {"path": "//evil.example/repos/{repo}/pulls/1"},
    {"path": "/repos/{repo}/issues/%2e%2e/%2e%2e/%2e%2e/" + OTHER + "/issues"},
    {"path": "/search/issues", "query": {"q": f"Repo:{OTHER} crash"}},
    {"path": "/search/issues", "query": {"q": f"repo:{REPO} crash OR is:open"}},
    {"path": "/search/issues", "query": {"q": f'repo:"{OTHER}"'}},
], ids=["allowed", "double-slash", "encoded-dots", "Repo-case", "OR", "quoted"])
def test_a_guest_run_ends_denied_on_each_bypass(engine_name: str, planted_secret: bytes, tmp_path: Path,
                                                standin: GithubStandin, req: dict[str, Any]) -> None:
    payload = pull_request_event(standin, REPO, 1)
    event = Event("pull_request", json.dumps(payload).encode(), {"x-github-event": "pull_request"}, "d-1", "github")
    result = run_flow(engine_name, tmp_path, request_wat(req), event, github=github_section(standin),
                      allow={"github": ALLOW})
    assert_no_leak(result, planted_secret)
    if req["path"] == "/repos/{repo}/pulls/1":
        assert result.status is Status.OK, result.error
        assert [r.path for r in standin.api_calls()] == [f"/repos/{REPO}/pulls/1"]
    else:
        assert result.status is Status.DENIED, (result.status, result.error)
        assert result.denials and standin.api_calls() == []


# -- class 13: malformed arguments are INVALID, with a message and no traceback ------------------------

MALFORMED: list[tuple[Any, Any]] = [
    ({"path": 5}, None),
    ({"path": ["/repos/{repo}/pulls/1"]}, None),
    ({"path": "/repos/{repo}/pulls/1", "headers": ["Authorization: token x"]}, None),
    ({"path": "/repos/{repo}/pulls/1", "headers": {"Authorization": "token x"}}, None),
    ({"path": "/repos/{repo}/pulls/1", "method": 5}, None),
    ({"path": "/repos/{repo}/pulls/1", "accept": {"x": 1}}, None),
    ({"path": "/repos/{repo}/pulls/1", "max_pages": "abc"}, None),
    ({"path": "/repos/{repo}/pulls/1", "max_pages": 1.5}, None),
    ({"path": "/repos/{repo}/pulls/1", "paginate": "yes"}, None),
    ({"path": "/repos/{repo}/pulls/1/files", "query": {"per_page": "abc"}}, None),
    ({"path": "/repos/{repo}/pulls/1/files", "query": {"page": -1}}, None),
    ({"path": "/repos/{repo}/pulls/1/files", "query": ["per_page", 5]}, None),
    ({"path": "/repos/{repo}/pulls/1/files", "query": {"state": None}}, None),
    ({"path": "/repos/{repo}/pulls/1/files", "query": {"state": {"a": 1}}}, None),
    ({"path": "/repos/{repo}/issues/1/comments", "method": "POST"}, "just a string"),
    ({"path": "/repos/{repo}/issues/1/comments", "method": "POST"}, 42),
    ([1, 2], None),
    ("/repos/{repo}/pulls/1", None),
]


def test_malformed_arguments_are_invalid_without_a_traceback(standin: GithubStandin, caplog: pytest.LogCaptureFixture) -> None:
    cap = capability(standin)
    run = make_run(standin, {"pull_requests": "read", "issues": "write"})
    cap.open_run(run)
    mem = Memory()
    caplog.set_level(logging.DEBUG)
    for req, body in MALFORMED:
        err = refused(cap, run, mem, req, body)
        assert err.code == Code.INVALID, (req, body, err)
        assert err.message and "Traceback" not in err.message
    for raw_req, raw_body in [(b"[" * 100_000, b""), (b'{"path": "/repos/{repo}/issues/1/comments", "method": "POST"}',
                                                      b"[" * 100_000), (b"\xff\xfe", b""),
                              (b'{"path": "/repos/{repo}/issues/1/comments", "method": "POST"}', b"\xff{")]:
        with pytest.raises(HostError) as err:
            call_raw(cap, run, mem, raw_req, raw_body)
        assert err.value.code == Code.INVALID, (raw_req[:20], raw_body[:20], err.value)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert run.denials == [] and standin.api_calls() == []
