"""A loopback stand-in for GitHub's REST API, for tests and the demo.

It speaks GitHub's wire format for the endpoints wasmflow's GitHub host functions and the bots use:
App installation tokens (the JWT's RS256 signature is checked with the App's public key), pull
requests (JSON and the diff/patch media types), pull request files and commits with pagination `Link`
headers, compare, reviews with inline comments (lines outside the diff are refused with 422, as GitHub
does), issue comments (list, create, update), reactions, labels, issues and issue search. It records
every request and every write so tests can assert what a run did, and can inject failures (rate limits,
revoked tokens, 5xx) to test the host's handling.

Run it in-process (`GithubStandin().start()`, a background thread with its own event loop) or as
`python -m wasmflow.devtools.github_standin` for manual experiments.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from aiohttp import web

from .github_manifest_standin import ManifestStandin, generate_app_key  # noqa: F401  (generate_app_key: for tests)
from .github_review_standin import ReviewStandin
from wasmflow.loopback import LoopbackServer

JSON_BODY = web.RequestKey("json_body", object)  # the parsed request body, set by the middleware

ISO = "%Y-%m-%dT%H:%M:%SZ"


def iso(ts: Optional[float] = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), tz=timezone.utc).strftime(ISO)



def fake_sha(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


@dataclass
class FileChange:
    """One file of a pull request, as `GET /pulls/{n}/files` returns it."""

    filename: str
    patch: Optional[str]
    status: str = "modified"  # added | modified | removed | renamed
    previous_filename: Optional[str] = None

    def counts(self) -> tuple[int, int]:
        adds = dels = 0
        for line in (self.patch or "").splitlines():
            if line.startswith("+"):
                adds += 1
            elif line.startswith("-"):
                dels += 1
        return adds, dels

    def new_side_lines(self) -> set[int]:
        """Lines of the new file that appear in the patch (added or context): where inline comments may go."""
        lines: set[int] = set()
        new = 0
        for line in (self.patch or "").splitlines():
            m = re.match(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,\d+)? @@", line)
            if m:
                new = int(m.group(1))
                continue
            if line.startswith("-") or line.startswith("\\"):
                continue
            lines.add(new)
            new += 1
        return lines


@dataclass
class PullRequest:
    number: int
    title: str
    body: str
    user: str
    head_sha: str
    base_sha: str
    files: list[FileChange]
    head_ref: str = "feature"
    base_ref: str = "main"
    draft: bool = False
    user_type: str = "User"
    state: str = "open"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    snapshots: dict[str, list[FileChange]] = field(default_factory=dict)  # head sha → files
    commits: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Issue:
    number: int
    title: str
    body: str
    user: str
    state: str = "open"
    labels: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    user_type: str = "User"


@dataclass
class Repo:
    owner: str
    name: str
    id: int
    pulls: dict[int, PullRequest] = field(default_factory=dict)
    issues: dict[int, Issue] = field(default_factory=dict)
    comments: dict[int, dict[str, Any]] = field(default_factory=dict)  # issue comments by id
    reviews: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # PR number → reviews
    review_comments: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_number: int = 1

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


# A search term: `key:"quoted value"`, a quoted phrase, or a run of non-space characters.
_SEARCH_TOKEN = re.compile(r'[^\s"]*"[^"]*"\S*|\S+')


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    status: int
    body: Any
    auth: str  # "jwt", "installation", "none"


class GithubStandin(ManifestStandin, ReviewStandin, LoopbackServer):
    """The stand-in server and its state. All public methods are thread-safe for use from tests."""

    def __init__(self, app_id: int = 4242, app_slug: str = "wasmflow-review", public_key_pem: Optional[str] = None,
                 installation_id: int = 77, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app_id = app_id
        self.app_slug = app_slug
        self.installation_id = installation_id
        if public_key_pem is None:
            self.private_key_pem, self.public_key_pem = generate_app_key()
        else:
            self.private_key_pem, self.public_key_pem = "", public_key_pem
        super().__init__(host, port)
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, float] = {}  # installation token → expiry (unix time)
        self.requests: list[Recorded] = []
        self.failures: list[dict[str, Any]] = []
        self.hooks: list[dict[str, Any]] = []
        self.token_ttl = 3600.0
        self._ids = 1000
        self._lock = threading.RLock()

    # -- state for tests ----------------------------------------------------------------------------

    def _next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def add_repo(self, full_name: str) -> Repo:
        owner, name = full_name.split("/")
        with self._lock:
            repo = self.repos.get(full_name.lower())
            if repo is None:
                repo = Repo(owner, name, id=self._next_id())
                self.repos[full_name.lower()] = repo
            return repo

    def add_pull(self, full_name: str, title: str, files: list[FileChange], body: str = "", user: str = "octocat",
                 draft: bool = False, user_type: str = "User", number: Optional[int] = None) -> PullRequest:
        repo = self.add_repo(full_name)
        with self._lock:
            number = number or repo.next_number
            repo.next_number = max(repo.next_number, number + 1)
            head = fake_sha(f"{full_name}#{number}@1")
            pr = PullRequest(number, title, body, user, head, fake_sha(f"{full_name}@base"), list(files),
                             draft=draft, user_type=user_type)
            pr.snapshots[head] = list(files)
            pr.commits.append(self._commit(head, title, user))
            repo.pulls[number] = pr
            repo.issues[number] = Issue(number, title, body, user, user_type=user_type)
            return pr

    def push(self, full_name: str, number: int, files: list[FileChange], message: str = "more changes") -> str:
        """New commits on the PR's branch: the head moves and the file list becomes `files`."""
        repo = self.add_repo(full_name)
        with self._lock:
            pr = repo.pulls[number]
            head = fake_sha(f"{full_name}#{number}@{len(pr.snapshots) + 1}")
            pr.head_sha, pr.files, pr.updated_at = head, list(files), time.time()
            pr.snapshots[head] = list(files)
            pr.commits.append(self._commit(head, message, pr.user))
            return head

    def add_issue(self, full_name: str, title: str, body: str = "", user: str = "octocat",
                  labels: Optional[list[str]] = None, number: Optional[int] = None) -> Issue:
        repo = self.add_repo(full_name)
        with self._lock:
            number = number or repo.next_number
            repo.next_number = max(repo.next_number, number + 1)
            issue = Issue(number, title, body, user, labels=list(labels or []))
            repo.issues[number] = issue
            return issue

    def add_comment(self, full_name: str, number: int, body: str, user: str = "octocat", user_type: str = "User") -> dict[str, Any]:
        repo = self.add_repo(full_name)
        with self._lock:
            return self._new_comment(repo, number, body, {"login": user, "type": user_type})

    def comments(self, full_name: str, number: int) -> list[dict[str, Any]]:
        repo = self.add_repo(full_name)
        with self._lock:
            return [dict(c) for c in repo.comments.values() if c["_number"] == number]

    def reviews(self, full_name: str, number: int) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.add_repo(full_name).reviews.get(number, [])]

    def writes(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method not in ("GET", "HEAD") and r.auth == "installation"]

    def api_calls(self) -> list[Recorded]:
        """Requests made with an installation token (the runs' calls, not token minting)."""
        with self._lock:
            return [r for r in self.requests if r.auth == "installation"]

    def fail_next(self, path_pattern: str, status: int, times: int = 1, headers: Optional[dict[str, str]] = None,
                  message: str = "injected failure", method: Optional[str] = None) -> None:
        """The next `times` requests whose path matches the regex get this answer instead."""
        with self._lock:
            self.failures.append({"pattern": re.compile(path_pattern), "status": status, "times": times,
                                  "headers": headers or {}, "message": message, "method": method})

    def before_next(self, method: str, path_pattern: str, action: Any) -> None:
        """Call `action()` once, just before the next matching request is handled: how tests stage what
        another actor (a concurrent run, a person) did at that moment."""
        with self._lock:
            self.hooks.append({"method": method, "pattern": re.compile(path_pattern), "action": action})

    def revoke_tokens(self) -> None:
        """Every installation token issued so far now answers 401, as after a revocation."""
        with self._lock:
            self.tokens.clear()

    def mint_token(self, ttl: Optional[float] = None) -> str:
        """An installation token issued directly (for tests of the stand-in through plain PyGithub)."""
        with self._lock:
            token = "ghs_" + secrets.token_hex(18)
            self.tokens[token] = time.time() + (ttl or self.token_ttl)
            return token

    # -- payload helpers ----------------------------------------------------------------------------

    def pull_json(self, repo: Repo, pr: PullRequest, base: str) -> dict[str, Any]:
        adds = sum(f.counts()[0] for f in pr.files)
        dels = sum(f.counts()[1] for f in pr.files)
        api = f"{base}/repos/{repo.full_name}"
        return {
            "url": f"{api}/pulls/{pr.number}",
            "id": 10_000 + pr.number,
            "node_id": f"PR_{repo.id}_{pr.number}",
            "html_url": f"https://github.com/{repo.full_name}/pull/{pr.number}",
            "diff_url": f"https://github.com/{repo.full_name}/pull/{pr.number}.diff",
            "patch_url": f"https://github.com/{repo.full_name}/pull/{pr.number}.patch",
            "issue_url": f"{api}/issues/{pr.number}",
            "comments_url": f"{api}/issues/{pr.number}/comments",
            "review_comments_url": f"{api}/pulls/{pr.number}/comments",
            "commits_url": f"{api}/pulls/{pr.number}/commits",
            "statuses_url": f"{api}/statuses/{pr.head_sha}",
            "number": pr.number,
            "state": pr.state,
            "locked": False,
            "title": pr.title,
            "user": self._user(pr.user, pr.user_type),
            "body": pr.body,
            "labels": [],
            "milestone": None,
            "active_lock_reason": None,
            "created_at": iso(pr.created_at),
            "updated_at": iso(pr.updated_at),
            "closed_at": None,
            "merged_at": None,
            "merge_commit_sha": None,
            "assignee": None,
            "assignees": [],
            "requested_reviewers": [],
            "requested_teams": [],
            "head": {"label": f"{repo.owner}:{pr.head_ref}", "ref": pr.head_ref, "sha": pr.head_sha,
                     "user": self._user(repo.owner, "Organization"), "repo": self.repo_json(repo, base)},
            "base": {"label": f"{repo.owner}:{pr.base_ref}", "ref": pr.base_ref, "sha": pr.base_sha,
                     "user": self._user(repo.owner, "Organization"), "repo": self.repo_json(repo, base)},
            "_links": {"self": {"href": f"{api}/pulls/{pr.number}"},
                       "html": {"href": f"https://github.com/{repo.full_name}/pull/{pr.number}"}},
            "author_association": "CONTRIBUTOR",
            "auto_merge": None,
            "draft": pr.draft,
            "merged": False,
            "mergeable": True,
            "rebaseable": True,
            "mergeable_state": "clean",
            "merged_by": None,
            "comments": sum(1 for c in repo.comments.values() if c["_number"] == pr.number),
            "review_comments": len(repo.review_comments.get(pr.number, [])),
            "maintainer_can_modify": False,
            "commits": len(pr.commits),
            "additions": adds,
            "deletions": dels,
            "changed_files": len(pr.files),
        }

    def repo_json(self, repo: Repo, base: str) -> dict[str, Any]:
        return {
            "id": repo.id,
            "node_id": f"R_{repo.id}",
            "name": repo.name,
            "full_name": repo.full_name,
            "private": False,
            "owner": self._user(repo.owner, "Organization"),
            "html_url": f"https://github.com/{repo.full_name}",
            "description": "A repository served by the wasmflow GitHub stand-in",
            "fork": False,
            "url": f"{base}/repos/{repo.full_name}",
            "default_branch": "main",
            "visibility": "public",
            "language": "Rust",
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": iso(),
            "pushed_at": iso(),
        }

    def issue_json(self, repo: Repo, issue: Issue, base: str) -> dict[str, Any]:
        data: dict[str, Any] = {
            "url": f"{base}/repos/{repo.full_name}/issues/{issue.number}",
            "repository_url": f"{base}/repos/{repo.full_name}",
            "html_url": f"https://github.com/{repo.full_name}/issues/{issue.number}",
            "id": 20_000 + issue.number,
            "node_id": f"I_{repo.id}_{issue.number}",
            "number": issue.number,
            "title": issue.title,
            "user": self._user(issue.user, issue.user_type),
            "labels": [self._label(repo, name) for name in issue.labels],
            "state": issue.state,
            "locked": False,
            "assignee": None,
            "assignees": [],
            "milestone": None,
            "comments": sum(1 for c in repo.comments.values() if c["_number"] == issue.number),
            "created_at": iso(issue.created_at),
            "updated_at": iso(issue.created_at),
            "closed_at": None,
            "author_association": "NONE",
            "active_lock_reason": None,
            "body": issue.body,
            "reactions": {"url": f"{base}/repos/{repo.full_name}/issues/{issue.number}/reactions", "total_count": 0},
            "state_reason": None,
        }
        if issue.number in repo.pulls:
            data["pull_request"] = {
                "url": f"{base}/repos/{repo.full_name}/pulls/{issue.number}",
                "html_url": f"https://github.com/{repo.full_name}/pull/{issue.number}",
                "diff_url": f"https://github.com/{repo.full_name}/pull/{issue.number}.diff",
                "patch_url": f"https://github.com/{repo.full_name}/pull/{issue.number}.patch",
                "merged_at": None,
            }
        return data

    def bot_user(self) -> dict[str, Any]:
        return self._user(f"{self.app_slug}[bot]", "Bot")

    def _user(self, login: str, kind: str = "User") -> dict[str, Any]:
        uid = int(hashlib.sha1(login.encode()).hexdigest()[:7], 16)
        return {"login": login, "id": uid, "node_id": f"U_{uid}", "avatar_url": f"https://avatars.example/{uid}",
                "url": f"https://api.github.com/users/{login}", "html_url": f"https://github.com/{login}",
                "type": kind, "site_admin": False}

    def _label(self, repo: Repo, name: str) -> dict[str, Any]:
        if name not in repo.labels:
            repo.labels[name] = {"id": self._next_id(), "node_id": f"LA_{name}", "url": "", "name": name,
                                 "color": "ededed", "default": False, "description": None}
        return repo.labels[name]

    def _commit(self, sha: str, message: str, user: str) -> dict[str, Any]:
        return {"sha": sha, "node_id": f"C_{sha[:8]}",
                "commit": {"message": message, "author": {"name": user, "email": f"{user}@example.com", "date": iso()},
                           "committer": {"name": user, "email": f"{user}@example.com", "date": iso()}},
                "author": self._user(user), "committer": self._user(user), "parents": []}

    def _new_comment(self, repo: Repo, number: int, body: str, user: dict[str, Any], app: bool = False) -> dict[str, Any]:
        cid = self._next_id()
        now = iso()
        comment = {
            "id": cid, "node_id": f"IC_{cid}",
            "url": f"/repos/{repo.full_name}/issues/comments/{cid}",
            "html_url": f"https://github.com/{repo.full_name}/issues/{number}#issuecomment-{cid}",
            "issue_url": f"/repos/{repo.full_name}/issues/{number}",
            "body": body, "user": user if "id" in user else self._user(user["login"], user.get("type", "User")),
            "created_at": now, "updated_at": now, "author_association": "NONE",
            "performed_via_github_app": ({"id": self.app_id, "slug": self.app_slug, "name": self.app_slug}
                                         if app else None),
            "reactions": {"total_count": 0, "+1": 0, "-1": 0, "laugh": 0, "hooray": 0, "confused": 0,
                          "heart": 0, "rocket": 0, "eyes": 0},
            "_number": number,
        }
        repo.comments[cid] = comment
        return comment

    # -- the server ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        r = app.router
        r.add_post("/app/installations/{inst}/access_tokens", self.h_access_token)
        r.add_get("/app", self.h_app)
        r.add_get("/repos/{o}/{r}", self.h_repo)
        r.add_get("/repos/{o}/{r}/pulls/{n:\\d+}", self.h_pull)
        r.add_get("/repos/{o}/{r}/pulls/{n:\\d+}/files", self.h_pull_files)
        r.add_get("/repos/{o}/{r}/pulls/{n:\\d+}/commits", self.h_pull_commits)
        r.add_get("/repos/{o}/{r}/pulls/{n:\\d+}/reviews", self.h_reviews)
        r.add_post("/repos/{o}/{r}/pulls/{n:\\d+}/reviews", self.h_create_review)
        r.add_get("/repos/{o}/{r}/pulls/{n:\\d+}/comments", self.h_review_comments)
        r.add_get("/repos/{o}/{r}/compare/{basehead}", self.h_compare)
        r.add_get("/repos/{o}/{r}/issues", self.h_issues)
        r.add_get("/repos/{o}/{r}/issues/{n:\\d+}", self.h_issue)
        r.add_get("/repos/{o}/{r}/issues/{n:\\d+}/comments", self.h_comments)
        r.add_post("/repos/{o}/{r}/issues/{n:\\d+}/comments", self.h_create_comment)
        r.add_get("/repos/{o}/{r}/issues/comments/{cid:\\d+}", self.h_comment)
        r.add_patch("/repos/{o}/{r}/issues/comments/{cid:\\d+}", self.h_update_comment)
        r.add_delete("/repos/{o}/{r}/issues/comments/{cid:\\d+}", self.h_delete_comment)
        r.add_post("/repos/{o}/{r}/issues/comments/{cid:\\d+}/reactions", self.h_comment_reaction)
        r.add_post("/repos/{o}/{r}/issues/{n:\\d+}/reactions", self.h_issue_reaction)
        r.add_get("/repos/{o}/{r}/issues/{n:\\d+}/labels", self.h_issue_labels)
        r.add_post("/repos/{o}/{r}/issues/{n:\\d+}/labels", self.h_add_labels)
        r.add_get("/repos/{o}/{r}/labels", self.h_labels)
        r.add_get("/search/issues", self.h_search_issues)
        self.add_manifest_routes(r)  # the App manifest flow: GitHub's web form and the code conversion
        self.add_review_routes(r)  # check runs, collaborator permission, contents per ref, PR edits
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.is_manifest_path(request.path):  # web pages and the manifest conversion: no token, not JSON
            try:
                web_resp = await handler(request)
            except web.HTTPException as exc:
                web_resp = self._error(exc.status, exc.reason)
            return self._record(request, None, "web", web_resp)
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return self._record(request, None, "none", self._error(400, "Problems parsing JSON"))
        request[JSON_BODY] = body
        auth_kind = "none"
        header = request.headers.get("Authorization", "")
        if request.path.startswith("/app"):
            auth_kind = "jwt"
            problem = self._check_jwt(header)
            if problem:
                return self._record(request, body, auth_kind, self._error(401, problem))
        else:
            auth_kind = "installation"
            token = header.split(" ", 1)[1] if " " in header else ""
            with self._lock:
                expiry = self.tokens.get(token)
            if expiry is None or expiry < time.time():
                return self._record(request, body, auth_kind, self._error(401, "Bad credentials"))
        with self._lock:
            for failure in self.failures:
                if failure["times"] > 0 and failure["pattern"].search(request.path) and \
                        (failure["method"] is None or failure["method"] == request.method):
                    failure["times"] -= 1
                    resp = self._error(failure["status"], failure["message"])
                    for k, v in failure["headers"].items():
                        resp.headers[k] = v
                    return self._record(request, body, auth_kind, resp)
        with self._lock:
            due = [h for h in self.hooks if h["method"] == request.method and h["pattern"].search(request.path)]
            self.hooks = [h for h in self.hooks if h not in due]
        for hook in due:
            hook["action"]()
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            resp = self._error(exc.status, exc.reason)
        resp.headers.setdefault("X-RateLimit-Limit", "5000")
        resp.headers.setdefault("X-RateLimit-Remaining", "4999")
        resp.headers.setdefault("X-RateLimit-Reset", str(int(time.time()) + 3600))
        resp.headers.setdefault("X-GitHub-Request-Id", secrets.token_hex(8).upper())
        return self._record(request, body, auth_kind, resp)

    def _record(self, request: web.Request, body: Any, auth: str, resp: web.StreamResponse) -> web.StreamResponse:
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, request.query_string, resp.status, body, auth))
        return resp

    def _check_jwt(self, header: str) -> Optional[str]:
        import jwt

        if not header.startswith("Bearer "):
            return "A JSON web token could not be decoded"
        try:
            claims = jwt.decode(header[7:], self.public_key_pem, algorithms=["RS256"],
                                options={"require": ["iat", "exp", "iss"]}, leeway=60)
        except jwt.PyJWTError as exc:
            return f"A JSON web token could not be decoded ({exc})"
        if str(claims["iss"]) != str(self.app_id):
            return "Integration not found"
        if claims["exp"] - claims["iat"] > 660:
            return "'Expiration time' claim ('exp') is too far in the future"
        return None

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"message": message, "documentation_url": "https://docs.github.com/rest",
                                  "status": str(status)}, status=status)

    def _base(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    def _repo(self, request: web.Request) -> Repo:
        repo = self.repos.get(f"{request.match_info['o']}/{request.match_info['r']}".lower())
        if repo is None:
            raise web.HTTPNotFound(reason="Not Found")
        return repo

    def _pr(self, request: web.Request) -> tuple[Repo, PullRequest]:
        repo = self._repo(request)
        pr = repo.pulls.get(int(request.match_info["n"]))
        if pr is None:
            raise web.HTTPNotFound(reason="Not Found")
        return repo, pr

    def _paginate(self, request: web.Request, items: list[Any], wrap: Optional[dict[str, Any]] = None) -> web.Response:
        try:
            per_page = max(1, min(int(request.query.get("per_page", 30)), 100))
            page = max(1, int(request.query.get("page", 1)))
        except ValueError:
            raise web.HTTPUnprocessableEntity(reason="Invalid per_page or page")
        last = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page: page * per_page]
        links = []

        def link(p: int, rel: str) -> str:
            query = dict(request.query)
            query["page"] = str(p)
            query["per_page"] = str(per_page)
            from urllib.parse import urlencode

            return f'<{self._base(request)}{request.path}?{urlencode(query)}>; rel="{rel}"'

        if page > 1:
            links += [link(page - 1, "prev"), link(1, "first")]
        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        payload: Any = chunk if wrap is None else {**wrap, "items": chunk}
        resp = web.json_response(payload)
        if links:
            resp.headers["Link"] = ", ".join(links)
        return resp

    async def h_access_token(self, request: web.Request) -> web.Response:
        if int(request.match_info["inst"]) != self.installation_id:
            return self._error(404, "Not Found")
        token = self.mint_token()
        perms = {"pull_requests": "write", "issues": "write", "contents": "read", "metadata": "read"}
        return web.json_response({"token": token, "expires_at": iso(self.tokens[token]), "permissions": perms,
                                  "repository_selection": "all"}, status=201)

    async def h_app(self, request: web.Request) -> web.Response:
        return web.json_response({"id": self.app_id, "slug": self.app_slug, "node_id": f"A_{self.app_id}",
                                  "name": self.app_slug, "owner": self._user("octo-org", "Organization"),
                                  "description": "wasmflow code review", "external_url": "https://example.com",
                                  "html_url": f"https://github.com/apps/{self.app_slug}",
                                  "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
                                  "permissions": {"pull_requests": "write", "issues": "write", "contents": "read"},
                                  "events": ["pull_request", "issue_comment", "issues"], "installations_count": 1})

    async def h_repo(self, request: web.Request) -> web.Response:
        return web.json_response(self.repo_json(self._repo(request), self._base(request)))

    async def h_pull(self, request: web.Request) -> web.Response:
        with self._lock:
            repo, pr = self._pr(request)
            accept = request.headers.get("Accept", "")
            if "diff" in accept or "patch" in accept:
                media = "application/vnd.github.patch" if "patch" in accept else "application/vnd.github.diff"
                return web.Response(text=unified_diff(pr.files), content_type=media, charset="utf-8")
            return web.json_response(self.pull_json(repo, pr, self._base(request)))

    async def h_pull_files(self, request: web.Request) -> web.Response:
        with self._lock:
            _, pr = self._pr(request)
            items = [file_json(f, pr.head_sha) for f in pr.files][:3000]  # GitHub lists at most 3,000 files
        return self._paginate(request, items)

    async def h_pull_commits(self, request: web.Request) -> web.Response:
        with self._lock:
            _, pr = self._pr(request)
            items = list(pr.commits)
        return self._paginate(request, items)

    async def h_reviews(self, request: web.Request) -> web.Response:
        with self._lock:
            repo, pr = self._pr(request)
            items = [{k: v for k, v in r.items() if not k.startswith("_")} for r in repo.reviews.get(pr.number, [])]
        return self._paginate(request, items)

    async def h_review_comments(self, request: web.Request) -> web.Response:
        with self._lock:
            repo, pr = self._pr(request)
            items = list(repo.review_comments.get(pr.number, []))
        return self._paginate(request, items)

    async def h_create_review(self, request: web.Request) -> web.Response:
        data = request[JSON_BODY] or {}
        with self._lock:
            repo, pr = self._pr(request)
            event = data.get("event", "PENDING")
            if event not in ("APPROVE", "REQUEST_CHANGES", "COMMENT", "PENDING"):
                return self._error(422, "Unprocessable Entity: event")
            commit = data.get("commit_id", pr.head_sha)
            if commit not in pr.snapshots:
                return self._error(422, "Unprocessable Entity: commit_id is not part of the pull request")
            files = {f.filename: f for f in pr.snapshots[commit]}
            comments = data.get("comments") or []
            for c in comments:
                f = files.get(c.get("path"))
                line = c.get("line")
                if f is None or not isinstance(line, int) or c.get("side", "RIGHT") != "RIGHT" \
                        or line not in f.new_side_lines():
                    return web.json_response({"message": "Unprocessable Entity",
                                              "errors": ["Pull request review thread line must be part of the diff"],
                                              "status": "422"}, status=422)
                if not c.get("body"):
                    return self._error(422, "Unprocessable Entity: comment body is empty")
                start = c.get("start_line")  # a multi-line comment: start_line < line, both in the diff
                if start is not None and (not isinstance(start, int) or start >= line or start not in f.new_side_lines()):
                    return self._error(422, "Unprocessable Entity: start_line must be part of the diff and before line")
            rid = self._next_id()
            review = {"id": rid, "node_id": f"PRR_{rid}", "user": self.bot_user(), "body": data.get("body", ""),
                      "state": "COMMENTED" if event == "COMMENT" else event, "commit_id": commit,
                      "html_url": f"https://github.com/{repo.full_name}/pull/{pr.number}#pullrequestreview-{rid}",
                      "submitted_at": iso(), "author_association": "NONE", "_comments": comments}
            repo.reviews.setdefault(pr.number, []).append(review)
            for c in comments:
                repo.review_comments.setdefault(pr.number, []).append(
                    {"id": self._next_id(), "pull_request_review_id": rid, "path": c["path"], "line": c["line"],
                     "side": "RIGHT", "body": c["body"], "commit_id": commit, "user": self.bot_user(),
                     "created_at": iso(), "updated_at": iso()})
            return web.json_response({k: v for k, v in review.items() if not k.startswith("_")})

    async def h_compare(self, request: web.Request) -> web.Response:
        basehead = request.match_info["basehead"]
        if "..." not in basehead:
            return self._error(404, "Not Found")
        base, head = basehead.split("...", 1)
        with self._lock:
            repo = self._repo(request)
            for pr in repo.pulls.values():
                if base in pr.snapshots and head in pr.snapshots:
                    before = {f.filename: f for f in pr.snapshots[base]}
                    after = {f.filename: f for f in pr.snapshots[head]}
                    changed = [file_json(f, head) for name, f in after.items()
                               if name not in before or before[name].patch != f.patch]
                    changed += [file_json(FileChange(name, None, "removed"), head) for name in before if name not in after]
                    shas = list(pr.snapshots)
                    commits = [c for c in pr.commits if c["sha"] in shas[shas.index(base) + 1: shas.index(head) + 1]]
                    return web.json_response({"status": "ahead", "ahead_by": len(commits), "behind_by": 0,
                                              "total_commits": len(commits), "commits": commits, "files": changed,
                                              "base_commit": {"sha": base}, "merge_base_commit": {"sha": base}})
        return self._error(404, "Not Found")

    async def h_issues(self, request: web.Request) -> web.Response:
        state = request.query.get("state", "open")
        with self._lock:
            repo = self._repo(request)
            issues = sorted(repo.issues.values(), key=lambda i: -i.number)
            items = [self.issue_json(repo, i, self._base(request)) for i in issues if state == "all" or i.state == state]
        return self._paginate(request, items)

    async def h_issue(self, request: web.Request) -> web.Response:
        with self._lock:
            repo = self._repo(request)
            issue = repo.issues.get(int(request.match_info["n"]))
            if issue is None:
                return self._error(404, "Not Found")
            return web.json_response(self.issue_json(repo, issue, self._base(request)))

    async def h_comments(self, request: web.Request) -> web.Response:
        number = int(request.match_info["n"])
        with self._lock:
            repo = self._repo(request)
            if number not in repo.issues:
                return self._error(404, "Not Found")
            items = [_public(c) for c in sorted(repo.comments.values(), key=lambda c: c["id"]) if c["_number"] == number]
        return self._paginate(request, items)

    async def h_create_comment(self, request: web.Request) -> web.Response:
        number = int(request.match_info["n"])
        body = (request[JSON_BODY] or {}).get("body")
        if not isinstance(body, str) or not body:
            return self._error(422, "Validation Failed: body")
        if len(body) > 65536:
            return self._error(422, "Validation Failed: body is too long (maximum is 65536 characters)")
        with self._lock:
            repo = self._repo(request)
            if number not in repo.issues:
                return self._error(404, "Not Found")
            comment = self._new_comment(repo, number, body, self.bot_user(), app=True)
            return web.json_response(_public(comment), status=201)

    async def h_comment(self, request: web.Request) -> web.Response:
        with self._lock:
            comment = self._repo(request).comments.get(int(request.match_info["cid"]))
            if comment is None:
                return self._error(404, "Not Found")
            return web.json_response(_public(comment))

    async def h_update_comment(self, request: web.Request) -> web.Response:
        body = (request[JSON_BODY] or {}).get("body")
        if not isinstance(body, str) or not body:
            return self._error(422, "Validation Failed: body")
        if len(body) > 65536:
            return self._error(422, "Validation Failed: body is too long (maximum is 65536 characters)")
        with self._lock:
            comment, refusal = self._own_comment(self._repo(request), request)
            if refusal is not None:
                return refusal
            comment["body"], comment["updated_at"] = body, iso()
            comment.setdefault("_edits", 0)
            comment["_edits"] += 1
            return web.json_response(_public(comment))

    async def h_delete_comment(self, request: web.Request) -> web.Response:
        with self._lock:
            repo = self._repo(request)
            comment, refusal = self._own_comment(repo, request)
            if refusal is not None:
                return refusal
            del repo.comments[comment["id"]]
            return web.Response(status=204)

    def _own_comment(self, repo: Repo, request: web.Request) -> tuple[Any, Optional[web.Response]]:
        """The comment of the URL, or GitHub's answer: 404 if absent, 403 if the App did not write it."""
        comment = repo.comments.get(int(request.match_info["cid"]))
        if comment is None:
            return None, self._error(404, "Not Found")
        if comment["user"]["login"] != self.bot_user()["login"]:
            return None, self._error(403, "Resource not accessible by integration")
        return comment, None

    async def h_comment_reaction(self, request: web.Request) -> web.Response:
        content = (request[JSON_BODY] or {}).get("content")
        with self._lock:
            comment = self._repo(request).comments.get(int(request.match_info["cid"]))
            if comment is None:
                return self._error(404, "Not Found")
            return self._react(comment["reactions"], content)

    async def h_issue_reaction(self, request: web.Request) -> web.Response:
        content = (request[JSON_BODY] or {}).get("content")
        with self._lock:
            repo = self._repo(request)
            if int(request.match_info["n"]) not in repo.issues:
                return self._error(404, "Not Found")
            return self._react({}, content)

    def _react(self, counts: dict[str, int], content: Any) -> web.Response:
        if content not in ("+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"):
            return self._error(422, "Validation Failed: content")
        counts[content] = counts.get(content, 0) + 1
        counts["total_count"] = counts.get("total_count", 0) + 1
        rid = self._next_id()
        return web.json_response({"id": rid, "node_id": f"REA_{rid}", "user": self.bot_user(), "content": content,
                                  "created_at": iso()}, status=201)

    async def h_issue_labels(self, request: web.Request) -> web.Response:
        with self._lock:
            repo = self._repo(request)
            issue = repo.issues.get(int(request.match_info["n"]))
            if issue is None:
                return self._error(404, "Not Found")
            return web.json_response([self._label(repo, n) for n in issue.labels])

    async def h_add_labels(self, request: web.Request) -> web.Response:
        data = request[JSON_BODY]
        labels = data.get("labels") if isinstance(data, dict) else data
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            return self._error(422, "Validation Failed: labels")
        with self._lock:
            repo = self._repo(request)
            issue = repo.issues.get(int(request.match_info["n"]))
            if issue is None:
                return self._error(404, "Not Found")
            for name in labels:
                if name not in issue.labels:
                    issue.labels.append(name)
            return web.json_response([self._label(repo, n) for n in issue.labels])

    async def h_labels(self, request: web.Request) -> web.Response:
        with self._lock:
            repo = self._repo(request)
            items = list(repo.labels.values())
        return self._paginate(request, items)

    def search_scope(self, q: str) -> set[str]:
        """The repositories (lowercase `owner/name`) GitHub would search for `q`, as GitHub reads it.

        Qualifier keys in any case, values quoted or not; `repo:` names one repository, `org:`/`user:`/
        `owner:` every repository of an owner, `-repo:` (or `NOT repo:`) excludes; with no scope
        qualifier at all, or an `OR` beside one, every repository is searched (on GitHub: every public
        one). Tests use it to prove that no request ever reached a repository outside a run's scope.
        """
        with self._lock:
            every = set(self.repos)
        included: set[str] = set()
        excluded: set[str] = set()
        scoped = widened = False
        negate_next = False
        for token in _SEARCH_TOKEN.findall(q):
            bare = token.strip("()")
            if bare.upper() == "OR":
                widened = True
                continue
            if bare.upper() == "NOT":
                negate_next = True
                continue
            negated, negate_next = negate_next or bare.startswith("-"), False
            key, _, value = bare.lstrip("-").partition(":")
            key, value = key.strip('"').lower(), value.strip('"').lower()
            if key not in ("repo", "org", "user", "owner") or not value:
                continue
            names = {value} if key == "repo" else {r for r in every if r.split("/")[0] == value}
            if negated:
                excluded |= names
            else:
                scoped = True
                included |= names
        if widened or not scoped:
            included = set(every)
        return included - excluded

    async def h_search_issues(self, request: web.Request) -> web.Response:
        q = request.query.get("q", "")
        if not q:
            return self._error(422, "Validation Failed: q")
        terms = q.split()
        repos = sorted(self.search_scope(q))
        kind = next((t[3:] for t in terms if t.startswith("is:") and t[3:] in ("issue", "pr")), None)
        state = next((t.split(":", 1)[1] for t in terms if t.startswith(("state:", "is:open", "is:closed"))
                      and t.split(":", 1)[1] in ("open", "closed")), None)
        words = [t.lower().strip('"') for t in terms if ":" not in t and t.upper() not in ("OR", "NOT", "AND")]
        with self._lock:
            items = []
            for name in repos:
                repo = self.repos.get(name)
                if repo is None:
                    continue
                for issue in sorted(repo.issues.values(), key=lambda i: -i.number):
                    is_pr = issue.number in repo.pulls
                    if (kind == "issue" and is_pr) or (kind == "pr" and not is_pr):
                        continue
                    if state and issue.state != state:
                        continue
                    text = f"{issue.title} {issue.body}".lower()
                    if words and not any(w in text for w in words):
                        continue
                    item = self.issue_json(repo, issue, self._base(request))
                    item["score"] = 1.0
                    items.append(item)
        return self._paginate(request, items, wrap={"total_count": len(items), "incomplete_results": False})


def _public(comment: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in comment.items() if not k.startswith("_")}


def file_json(f: FileChange, sha: str) -> dict[str, Any]:
    adds, dels = f.counts()
    data: dict[str, Any] = {
        "sha": fake_sha(f"{f.filename}@{sha}"),
        "filename": f.filename,
        "status": f.status,
        "additions": adds,
        "deletions": dels,
        "changes": adds + dels,
        "blob_url": f"https://github.com/blob/{sha}/{f.filename}",
        "raw_url": f"https://github.com/raw/{sha}/{f.filename}",
        "contents_url": f"/contents/{f.filename}?ref={sha}",
    }
    if f.patch is not None:
        data["patch"] = f.patch
    if f.previous_filename:
        data["previous_filename"] = f.previous_filename
    return data


def unified_diff(files: list[FileChange]) -> str:
    """The `application/vnd.github.diff` body of a pull request."""
    out = []
    for f in files:
        old = f.previous_filename or f.filename
        out.append(f"diff --git a/{old} b/{f.filename}")
        if f.status == "added":
            out += ["new file mode 100644", "--- /dev/null", f"+++ b/{f.filename}"]
        elif f.status == "removed":
            out += ["deleted file mode 100644", f"--- a/{old}", "+++ /dev/null"]
        else:
            out += [f"--- a/{old}", f"+++ b/{f.filename}"]
        if f.patch:
            out.append(f.patch.rstrip("\n"))
    return "\n".join(out) + "\n"


def added_file(filename: str, lines: list[str]) -> FileChange:
    """A new file of `lines` as GitHub's patch for it."""
    patch = f"@@ -0,0 +1,{len(lines)} @@\n" + "\n".join("+" + line for line in lines)
    return FileChange(filename, patch, "added")


def main() -> None:  # pragma: no cover - manual use
    import argparse

    parser = argparse.ArgumentParser(description="GitHub REST stand-in on loopback")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    standin = GithubStandin(port=args.port).start()
    print(f"GitHub stand-in on {standin.url}; App id {standin.app_id}, installation {standin.installation_id}")
    print(standin.private_key_pem)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        standin.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
