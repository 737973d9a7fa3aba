"""GitHub API calls made by the host, as the GitHub App's installation, for the event's repository.

Why the host and not the guest: the installation token is a credential for every repository the App
is installed on, so it never enters a guest (flows.network's proxy leaked that boundary). The host
holds the App key, mints installation tokens with PyGithub (`Auth.AppAuth` + `GithubIntegration`),
caches them until shortly before they expire, refreshes them on a 401, and makes each request itself
after checking it against two limits the flow cannot widen from inside the sandbox:

* scope: `/repos/{owner}/{repo}/...` of the repository named in the event (plus any listed in
  `allow.github_repos`), and `/search/issues` limited to those repositories (`search_query`);
  the path is normalised once (`normalise_path`) and the URL sent is built from exactly what was
  checked, so no spelling (`//host/...`, `%2e%2e`, a query in the path) means one thing to the check
  and another to GitHub;
* permission: the endpoint family's GitHub App permission (`pulls` → `pull_requests`, `issues`,
  comments, labels, reactions → `issues`, `contents`/`compare`/`commits` → `contents`, ...) must be
  declared in the flow's `allow.github` at `read` (GET) or `write` (anything else).

Rate limits are honoured inside the run's deadline: `Retry-After`, `X-RateLimit-Remaining: 0` until
`X-RateLimit-Reset`, and secondary limits (403/429 with "secondary rate limit"), each with a bounded
wait; a wait that would not fit in the run is an `UPSTREAM` error so the platform's retry takes over.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import re
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BeforeValidator

from wasmflow.fields import INT64_MAX, FieldError, Section, abbreviate, duration_in

from .spec import Call, Capability, Code, HostError, HostFunction, RunContext, Setup, check_range, read_json, write_result

log = logging.getLogger("wasmflow.github")

MAX_BODY = 8 * 1024 * 1024
MAX_REQUESTS = 300  # HTTP requests per run, pages of a paginated call included
MAX_PAGES = 30
TOKEN_REFRESH_MARGIN = 300.0  # seconds before expiry at which a cached installation token is renewed
MAX_RATE_WAIT = 60.0  # longest single wait for a rate limit inside a run
SECONDARY_DEFAULT_WAIT = 60.0  # GitHub: "wait at least one minute" when no retry-after is given
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}
TRUSTED_TRIGGERS = ("github", "manual")  # events whose payload may name the repository and installation
MEDIA_TYPES = {
    "json": "application/vnd.github+json",
    "diff": "application/vnd.github.diff",
    "patch": "application/vnd.github.patch",
    "raw": "application/vnd.github.raw+json",
    "text": "application/vnd.github.text+json",
    "html": "application/vnd.github.html+json",
    "full": "application/vnd.github.full+json",
}
PERMISSIONS = ("pull_requests", "issues", "contents", "metadata", "checks", "statuses", "actions", "deployments")
# The first path segment after /repos/{owner}/{repo}/ → the GitHub App permission that covers it.
FAMILIES = {
    "pulls": "pull_requests",
    "issues": "issues",
    "labels": "issues",
    "milestones": "issues",
    "assignees": "issues",
    "contents": "contents",
    "compare": "contents",
    "commits": "contents",
    "git": "contents",
    "branches": "contents",
    "tags": "contents",
    "readme": "contents",
    "releases": "contents",
    "check-runs": "checks",
    "check-suites": "checks",
    "statuses": "statuses",
    "actions": "actions",
    "deployments": "deployments",
    "languages": "metadata",
    "topics": "metadata",
    "collaborators": "metadata",
}
# Response headers a guest may see (everything else, cookies included, stays in the host).
PASS_HEADERS = ("link", "etag", "last-modified", "content-type", "retry-after", "x-github-request-id",
                "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-used",
                "x-ratelimit-resource")
_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")
# RFC 3986 path characters (pchar and "/"): no space, no `?`/`#`, no backslash, nothing outside ASCII.
_PATH_CHARS = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_REPO_NAME = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")
# A search term: `key:"quoted value"`, a quoted phrase, or a run of non-space characters.
_SEARCH_TERM = re.compile(r'[^\s"]*"[^"]*"\S*|\S+')
_SCOPE_KEY = re.compile(r"(?:^|[^a-z0-9_])(?:repo|org|user|owner|repository)\s*:")
_REPO_QUALIFIER = re.compile(r'^repo:(?:"([^"]+)"|([^"\s]+))$', re.I)
REQUEST_FIELDS = ("method", "path", "query", "accept", "paginate", "max_pages")
_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="([^"]+)"')


def load_private_key(value: str, base_dir: Path) -> str:
    """The App's PEM from flows.yaml: the PEM itself (from an env var, `\\n` escapes allowed) or a path."""
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return text.replace("\\n", "\n") + "\n"
    path = Path(text)
    if not path.is_absolute():
        path = base_dir / path
    try:
        return path.read_text()
    except OSError as exc:
        raise ValueError(f"github.private_key: cannot read {path}: {exc.strerror}") from None


def parse_links(header: str | None) -> dict[str, str]:
    """`Link: <url>; rel="next", ...` as {rel: url}."""
    return {rel: url for url, rel in _LINK.findall(header or "")}


@dataclass(frozen=True)
class Scope:
    """What one request touches: the App permission it needs and at which level."""

    permission: str
    level: str  # "read" | "write"
    repo: str


def normalise_path(path: str) -> str:
    """The path as it will be sent, or ValueError: one spelling only, checked once.

    A path starts with a single `/` (no scheme, no host, no `//host`), has only RFC 3986 path
    characters (a query goes in `query`; no fragment, backslash, space or control character), and no
    segment that is empty, `.` or `..`, or that decodes to one or to a `/`, `\\`, `?`, `#` or `%`
    (`%2e%2e`, `%2F`, `%252e`): whatever a server or client library decodes, it cannot step outside
    the repository. Percent-encoded names (`My%20File.md`) are kept as they are.
    """
    if not path.startswith("/") or path.startswith("//"):
        raise ValueError("a path starts with a single / and names no host: /repos/OWNER/NAME/...")
    if not _PATH_CHARS.match(path):
        raise ValueError("the path has characters a path may not carry (put query parameters in `query`; no "
                         "fragment, backslash, space or control character; percent-encode anything else)")
    if _BAD_ESCAPE.search(path):
        raise ValueError("the path has a % that is not a percent-escape")
    for segment in path[1:].split("/"):
        try:
            decoded = urllib.parse.unquote(segment, errors="strict")
        except UnicodeDecodeError:
            raise ValueError("the path has a percent-escape that is not UTF-8") from None
        if segment in ("", ".", "..") or decoded in (".", "..") or any(c in decoded for c in "/\\?#%") \
                or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
            raise ValueError("the path has an empty, dot or encoded-separator segment (//, a trailing /, ., .., "
                             "%2e%2e, %2F); name the endpoint directly")
    return path


def search_query(q: str, repos: list[str]) -> str:
    """The issue-search query to send: limited to this run's repositories, or ValueError saying why not.

    GitHub reads qualifier keys in any case and values quoted or not, ORs several `repo:`s, and scopes
    nothing an `OR` or parentheses put beside them; so: `OR` and parentheses are refused, every
    `repo:`/`org:`/`user:`/`owner:` (in any case, negated, quoted or glued to other text) must be a
    plain `repo:OWNER/NAME` of one of `repos`, and a query naming no repository gets `repo:` of the
    event's repository (`repos[0]`) appended.
    """
    named = False
    previous = ""
    for term in _SEARCH_TERM.findall(q):
        negated, previous = previous.upper() == "NOT", term
        unquoted = re.sub(r'"[^"]*"', "", term)
        if "(" in unquoted or ")" in unquoted:
            raise ValueError("parentheses are not allowed in a search (they group an OR)")
        if term.upper() in ("OR", "||", "|"):
            raise ValueError("OR is not allowed in a search: it would reach past this run's repositories; "
                             "make one search per alternative")
        if not _SCOPE_KEY.search(term.replace('"', "").lower().lstrip("-!")):
            continue
        match = None if negated else _REPO_QUALIFIER.match(term)
        if match is None:
            raise ValueError(f"search term {term!r}: a search may be limited only with repo:OWNER/NAME "
                             "(no org:, user:, owner:, -repo:, NOT repo: or repo: inside other text)")
        value = match.group(1) or match.group(2)
        if not _REPO_NAME.match(value) or not _repo_allowed(value, repos):
            raise ValueError(f"search names repository {value}, outside this run's repositories")
        named = True
    if named:
        return q
    if not repos or not _REPO_NAME.match(repos[0]):
        raise ValueError("name the repository to search with repo:OWNER/NAME")
    return f"{q} repo:{repos[0]}".strip()


def classify(method: str, path: str, query: dict[str, list[str]], repos: list[str]) -> Scope:
    """The permission a request needs, or ValueError saying why it is out of the flow's reach.

    `repos` are `owner/name` patterns the run may touch (the event's repository first). The path must
    be in `normalise_path`'s one spelling, under `/repos/OWNER/NAME/...` or `/search/issues`, whose
    single `q` must already be what `search_query` sends.
    """
    level = "read" if method in ("GET", "HEAD") else "write"
    normalise_path(path)
    parts = path[1:].split("/")
    if parts == ["search", "issues"]:
        if level != "read":
            raise ValueError("search is read-only")
        qs = query.get("q", [])
        if len(qs) != 1:
            raise ValueError("a search takes exactly one q")
        if search_query(qs[0], repos) != qs[0]:
            raise ValueError("the search names no repository")
        return Scope("issues", "read", repos[0])
    if len(parts) < 3 or parts[0] != "repos":
        raise ValueError(f"{path} is not a repository endpoint (/repos/OWNER/NAME/...) or /search/issues")
    if not all(_SEGMENT.match(p) and p not in (".", "..") for p in parts[1:3]):
        raise ValueError(f"malformed repository in {path!r}")
    repo = f"{parts[1]}/{parts[2]}"
    if not _repo_allowed(repo, repos):
        raise ValueError(f"{repo} is not this run's repository ({repos[0] if repos else 'none'})")
    if len(parts) == 3:
        if level != "read":
            raise ValueError("changing the repository itself is not offered")
        return Scope("metadata", "read", repo)
    family = parts[3]
    permission = FAMILIES.get(family)
    if permission is None:
        raise ValueError(f"endpoint family /{family} is not offered to guests")
    if family == "pulls" and len(parts) >= 6 and parts[4] == "comments" and parts[-1] == "reactions":
        permission = "pull_requests"
    if permission == "metadata" and level != "read":
        raise ValueError(f"/{family} is read-only for guests")
    return Scope(permission, level, repo)


def _repo_allowed(repo: str, patterns: list[str]) -> bool:
    repo = repo.lower()
    return any(fnmatch.fnmatchcase(repo, p.lower()) for p in patterns)


def permission_granted(allow: dict[str, str], scope: Scope) -> bool:
    """`write` implies `read`; `metadata: read` is implicit for every App, as on GitHub."""
    if scope.permission == "metadata":
        return True
    granted = allow.get(scope.permission)
    return granted == "write" or (granted == "read" and scope.level == "read")


@dataclass
class _RateState:
    remaining: Optional[int] = None
    reset: float = 0.0  # unix time


@dataclass
class GithubResponse:
    status: int
    headers: dict[str, str]
    text: str


def is_timeout(exc: BaseException) -> bool:
    """Whether a failed request ran out of time, by the exception's type: requests' `Timeout`, or the
    urllib3 or socket timeout it carries (a body read that times out arrives as requests'
    `ConnectionError` wrapping urllib3's `ReadTimeoutError`). urllib3's `NewConnectionError` (refused,
    unreachable) derives from its `ConnectTimeoutError` for history's sake and is not a timeout."""
    import requests
    import urllib3

    seen: Optional[BaseException] = exc
    for _ in range(8):  # the chain of causes and wrapped exceptions, bounded
        if seen is None or isinstance(seen, urllib3.exceptions.NewConnectionError):
            return False
        if isinstance(seen, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return True
        reason = getattr(seen, "reason", None)  # urllib3's MaxRetryError
        wrapped = next((a for a in (*seen.args, reason) if isinstance(a, BaseException)), None)
        seen = wrapped or seen.__cause__ or seen.__context__
    return False


class GithubApp:
    """Process-wide GitHub App client: JWTs, installation tokens (cached), the bot's login, requests.

    One per process, shared by every run; thread-safe. Tests and the demo point `api_url` at the
    stand-in; GitHub Enterprise Server uses `https://HOST/api/v3`.
    """

    def __init__(self, app_id: str | int, private_key_pem: str, api_url: str = "https://api.github.com",
                 bot_login: Optional[str] = None, min_write_interval: float = 1.0, timeout: int = 30,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        from github import Auth, GithubIntegration

        self.app_id = str(app_id)
        self.api_url = api_url.rstrip("/")
        self._auth = Auth.AppAuth(self.app_id, private_key_pem)
        self._integration = GithubIntegration(
            auth=self._auth, base_url=self.api_url, retry=0, timeout=timeout,
            seconds_between_requests=None, seconds_between_writes=None, user_agent="wasmflow",
        )
        self._bot_login = bot_login
        self.min_write_interval = min_write_interval
        self.timeout = timeout
        self._sleep = sleep
        self._tokens: dict[int, tuple[str, float]] = {}
        self._rate: dict[int, _RateState] = {}
        self._last_write: dict[int, float] = {}
        self._lock = threading.Lock()
        self._token_locks: dict[int, threading.Lock] = {}
        self.token_fetches = 0  # how many installation tokens were minted (tests and metrics)

    @classmethod
    def from_flows(cls, flows: Any, base_dir: Path) -> Optional["GithubApp"]:
        """The App of flows.yaml's `github:` section, or None when the file has none."""
        app = getattr(flows, "github", None)
        if app is None:
            return None
        return cls(app.app_id, load_private_key(app.private_key, Path(base_dir)), api_url=app.api_url,
                   bot_login=app.bot_login, min_write_interval=getattr(app, "min_write_interval", 1.0))

    # -- tokens -------------------------------------------------------------------------------------

    def installation_token(self, installation_id: int, force: bool = False) -> str:
        """A token for the installation, minted through `POST /app/installations/{id}/access_tokens`.

        Cached until `TOKEN_REFRESH_MARGIN` seconds before its expiry, so a run never starts with a token
        that dies mid-run; one lock per installation so concurrent runs mint it once.
        """
        with self._lock:
            lock = self._token_locks.setdefault(installation_id, threading.Lock())
        with lock:
            cached = self._tokens.get(installation_id)
            if cached and not force and cached[1] - time.time() > TOKEN_REFRESH_MARGIN:
                return cached[0]
            from github import GithubException

            try:
                auth = self._integration.get_access_token(installation_id)
            except GithubException as exc:
                raise HostError(Code.UPSTREAM, f"GitHub refused an installation token for {installation_id}: "
                                               f"{exc.status} {_message(exc.data)}") from None
            except Exception as exc:  # connection refused, DNS, TLS
                raise HostError(Code.UPSTREAM, f"cannot reach GitHub for an installation token: {exc}") from None
            expires = auth.expires_at
            expires_ts = expires.timestamp() if isinstance(expires, datetime) else time.time() + 3600
            self._tokens[installation_id] = (auth.token, expires_ts)
            self.token_fetches += 1
            return auth.token

    def invalidate(self, installation_id: int) -> None:
        with self._lock:
            self._tokens.pop(installation_id, None)

    def bot_login(self) -> Optional[str]:
        """The App's bot account (`slug[bot]`): configured, or read once from `GET /app`."""
        if self._bot_login is None:
            try:
                self._bot_login = f"{self._integration.get_app().slug}[bot]"
            except Exception as exc:
                log.warning("cannot read the App's slug from GET /app: %s", exc)
                return None
        return self._bot_login

    # -- requests -----------------------------------------------------------------------------------

    def _requester(self, timeout: float) -> Any:
        """PyGithub's Requester (requests underneath: `is_timeout` knows what it raises)."""
        from github import Github

        gh = Github(base_url=self.api_url, timeout=max(1, int(timeout)), retry=0, user_agent="wasmflow",
                    seconds_between_requests=None, seconds_between_writes=None)
        return gh.requester

    def request(self, installation_id: int, method: str, url: str, *, accept: str, body: Any = None,
                deadline: float = float("inf"), on_wait: Callable[[float], None] = lambda s: None,
                on_call: Callable[[str], None] = lambda m: None, requester: Any = None) -> GithubResponse:
        """One API request as the installation, with token refresh on 401 and rate-limit waits.

        `url` is a path (`/repos/...?...`) or an absolute URL of the API (a `Link` header's). Waits stay
        inside `deadline` (a `time.monotonic()` value); past it the call ends with `UPSTREAM`/`TIMEOUT`.
        """
        refreshed = False
        secondary_tries = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostError(Code.TIMEOUT, "the run's deadline has passed")
            self._wait_for_budget(installation_id, method, deadline, on_wait)
            token = self.installation_token(installation_id)
            headers = {"Authorization": f"token {token}", "Accept": accept, "X-GitHub-Api-Version": "2022-11-28"}
            if requester is None:  # one per run is passed in, so a run's calls share a connection
                requester = self._requester(min(self.timeout, max(1.0, deadline - time.monotonic())))
            on_call(method)
            try:
                status, resp_headers, text = requester.requestJson(method, url, headers=headers, input=body)
            except HostError:
                raise
            except Exception as exc:
                if is_timeout(exc) and deadline - time.monotonic() <= 0:
                    raise HostError(Code.TIMEOUT, f"GitHub {method} {url}: the run's deadline passed") from None
                raise HostError(Code.UPSTREAM, f"GitHub {method} {url}: {exc}") from None
            finally:
                if method not in ("GET", "HEAD"):
                    with self._lock:
                        self._last_write[installation_id] = time.monotonic()
            resp_headers = {k.lower(): str(v) for k, v in resp_headers.items()}
            self._note_rate(installation_id, resp_headers)
            if status == 401 and not refreshed:  # revoked or expired early: mint a new token once
                self.invalidate(installation_id)
                self.installation_token(installation_id, force=True)
                refreshed = True
                continue
            wait = rate_limit_wait(status, resp_headers, text, secondary_tries)
            if wait is None:
                return GithubResponse(status, resp_headers, text)
            secondary_tries += 1
            left = deadline - time.monotonic() - 1.0
            if wait > MAX_RATE_WAIT or wait > left or secondary_tries > 4:
                raise HostError(Code.UPSTREAM, f"GitHub rate limit on {method} {url}: retry in {wait:.0f} s, "
                                               f"which does not fit in this run; the platform will retry")
            log.info("GitHub rate limit (%s): waiting %.1f s", status, wait)
            on_wait(wait)
            self._sleep(wait)

    def _note_rate(self, installation_id: int, headers: dict[str, str]) -> None:
        if "x-ratelimit-remaining" not in headers:
            return
        try:
            state = _RateState(int(float(headers["x-ratelimit-remaining"])), float(headers.get("x-ratelimit-reset", 0)))
        except ValueError:
            return
        with self._lock:
            self._rate[installation_id] = state

    def _wait_for_budget(self, installation_id: int, method: str, deadline: float, on_wait: Callable[[float], None]) -> None:
        """Before sending: wait out an exhausted primary limit, and space content-creating requests."""
        with self._lock:
            state = self._rate.get(installation_id)
            last_write = self._last_write.get(installation_id)
        if state is not None and state.remaining == 0:
            wait = state.reset - time.time() + 1.0
            if wait > 0:
                if wait > MAX_RATE_WAIT or wait > deadline - time.monotonic() - 1.0:
                    raise HostError(Code.UPSTREAM, f"GitHub's rate limit for this installation resets in "
                                                   f"{wait:.0f} s, later than this run can wait")
                on_wait(wait)
                self._sleep(wait)
        if method not in ("GET", "HEAD") and last_write is not None and self.min_write_interval > 0:
            wait = last_write + self.min_write_interval - time.monotonic()
            if wait > 0:
                self._sleep(min(wait, self.min_write_interval))


def rate_limit_wait(status: int, headers: dict[str, str], text: str, tries: int) -> Optional[float]:
    """Seconds to wait before repeating a rate-limited request, or None if the response is not one.

    GitHub signals limits with 403 or 429: `Retry-After` wins; else `X-RateLimit-Remaining: 0` waits
    until `X-RateLimit-Reset`; else a secondary limit ("secondary rate limit" in the message) waits a
    minute, doubling on repeats as GitHub's docs ask.
    """
    if status not in (403, 429):
        return None
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            pass
    if headers.get("x-ratelimit-remaining") == "0":
        try:
            return max(0.0, float(headers.get("x-ratelimit-reset", "0")) - time.time()) + 1.0
        except ValueError:
            return SECONDARY_DEFAULT_WAIT
    lowered = text.lower()
    if "secondary rate limit" in lowered or "abuse" in lowered or status == 429:
        return SECONDARY_DEFAULT_WAIT * (2 ** tries)
    return None


def _message(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("message", ""))
    return str(data or "")


@dataclass
class _RunGithub:
    repos: list[str]
    installation_id: Optional[int]
    calls: int = 0
    writes: int = 0
    waited: float = 0.0
    paths: list[str] = field(default_factory=list)
    requester: Any = None  # PyGithub's Requester for this run (its connection pool), made on first use


class GithubCapability(Capability):
    """`github_request` and `github_info` for guests; the flow's `allow.github` says what they may do."""

    name = "github"

    def __init__(self, app: Optional[GithubApp]) -> None:
        self.app = app
        self.problem: Optional[str] = None  # why the App is unusable, when flows.yaml names one

    @classmethod
    def build(cls, setup: Setup) -> "GithubCapability":
        return cls.from_flows(setup.flows, setup.base_dir, setup.state_dir)

    @classmethod
    def from_flows(cls, flows: Any, base_dir: Path, state_dir: Optional[Path] = None) -> "GithubCapability":
        """Built even without a `github:` section, so a guest's calls get DENIED instead of a link error.

        An App key that cannot be read does not stop the process (other flows keep working): it is
        logged once here, and every GitHub call of a run says why it was refused.
        """
        try:
            return cls(GithubApp.from_flows(flows, base_dir))
        except ValueError as exc:
            unset = str(getattr(flows.github, "app_id", "")) in ("", "0")  # flows.yaml's `${GITHUB_APP_ID:-0}`
            log.log(logging.INFO if unset else logging.ERROR, "GitHub App disabled: %s", exc)
            cap = cls(None)
            cap.problem = str(exc)
            return cap

    def functions(self) -> list[HostFunction]:
        return [
            HostFunction("wasmflow", "github_request", "ptr len ptr len ptr", ("i32",), self.github_request),
            HostFunction("wasmflow", "github_info", "ptr", ("i32",), self.github_info),
        ]

    def _state(self, run: RunContext) -> "_RunGithub":
        """The run's GitHub state, built on its first GitHub call: most runs never make one, and this
        parses the whole event body (webhook payloads run to megabytes)."""
        state: Optional[_RunGithub] = run.state.get("github")
        if state is not None:
            return state
        # Only a signed GitHub delivery (or the operator's own `wasmflow run`) may name the repository and
        # installation: an HTTP trigger's body comes from anyone, so it never opens GitHub access.
        payload = run.event.json() if run.event.trigger in TRUSTED_TRIGGERS else None
        repos: list[str] = []
        installation: Optional[int] = None
        if isinstance(payload, dict):
            repo = (payload.get("repository") or {}).get("full_name")
            if isinstance(repo, str) and "/" in repo:
                repos.append(repo)
            inst = (payload.get("installation") or {}).get("id")
            if isinstance(inst, int):
                installation = inst
        repos.extend(getattr(run.flow.allow, "github_repos", []) or [])
        state = run.state["github"] = _RunGithub(repos=repos, installation_id=installation)
        return state

    def close_run(self, run: RunContext) -> None:
        state: Optional[_RunGithub] = run.state.get("github")
        if state is not None and state.requester is not None:
            try:
                state.requester.close()
            except Exception:  # closing a pool must not fail the run's cleanup
                pass
        if state is not None and state.calls:
            run.logs.append((time.time(), "debug", f"wasmflow: {state.calls} GitHub API calls "
                                                   f"({state.writes} writes), {state.waited:.1f} s rate-limit waits"))

    # -- host functions -----------------------------------------------------------------------------

    def github_info(self, call: Call, out: int) -> int:
        state = self._state(call.run)
        info = {
            "repository": state.repos[0] if state.repos else None,
            "installation_id": state.installation_id,
            "app_id": self.app.app_id if self.app else None,
            "bot_login": self.app.bot_login() if self.app else None,
            "api_url": self.app.api_url if self.app else None,
            "permissions": dict(call.run.flow.allow.github),
        }
        return write_result(call, out, json.dumps(info).encode())

    def github_request(self, call: Call, req_ptr: int, req_len: int, body_ptr: int, body_len: int, out: int) -> int:
        run = call.run
        state = self._state(run)
        check_range(call.memory.size(), out, 16)
        spec, body = self._read_request(call, req_ptr, req_len, body_ptr, body_len)
        method = spec["method"]
        if self.app is None:
            if self.problem:
                run.logs.append((time.time(), "error", f"wasmflow: GitHub App unusable: {self.problem}"))
                raise HostError(Code.UPSTREAM, self.problem)
            raise run.deny("flows.yaml has no github: section (no GitHub App configured)")
        if not state.repos:
            raise run.deny("this run's event names no repository, so no GitHub call is in scope")
        if state.installation_id is None:
            raise run.deny("this run's event has no installation id (not a GitHub App delivery)")
        path = spec["path"].replace("{repo}", state.repos[0])
        query = spec["query"]
        paginate, max_pages, accept = spec["paginate"], spec["max_pages"], spec["accept"]
        if paginate and method == "GET" and not any(k == "per_page" for k, _ in query):
            query = [*query, ("per_page", "100")]
        url = self._check(run, method, path, query)

        pages: list[GithubResponse] = []
        truncated = False
        while True:
            response = self._send(call, method, url, accept, body)
            if pages and not 200 <= response.status < 300:
                pages = [response]  # a later page failed: the guest sees that failure, not a partial list
                break
            pages.append(response)
            nxt = parse_links(response.headers.get("link")).get("next")
            if not (paginate and nxt and 200 <= response.status < 300):
                break
            if len(pages) >= max_pages:
                truncated = True
                break
            next_path, next_query = self._same_api(nxt)
            url = self._check(run, method, next_path, next_query)

        status, headers = pages[-1].status, pages[-1].headers
        if len(pages) > 1:
            merged: Any = None
            for page in pages:
                try:
                    data = json.loads(page.text)
                except ValueError:
                    raise HostError(Code.UPSTREAM, "GitHub answered a page that is not JSON") from None
                if isinstance(data, list):
                    merged = (merged or []) + data
                elif isinstance(data, dict) and isinstance(data.get("items"), list):
                    if merged is None:
                        merged = dict(data)
                    else:
                        merged["items"] = merged["items"] + data["items"]
                else:
                    raise HostError(Code.UPSTREAM, "a paginated response was neither a list nor {items: [...]}")
            data_bytes = json.dumps(merged).encode()
            status = pages[0].status
        else:
            data_bytes = pages[0].text.encode("utf-8")
        if len(data_bytes) > MAX_BODY:
            raise HostError(Code.TOO_LARGE, "response body over 8 MiB")
        head = {
            "status": status,
            "headers": {k: v for k, v in headers.items() if k in PASS_HEADERS},
            "pages": len(pages),
            "truncated": truncated,
        }
        h1, l1 = run.put_result(json.dumps(head).encode())
        h2, l2 = run.put_result(data_bytes)
        call.memory.write(out, struct.pack("<IIII", h1, l1, h2, l2))
        return Code.OK

    def _read_request(self, call: Call, req_ptr: int, req_len: int, body_ptr: int, body_len: int) -> tuple[dict[str, Any], Any]:
        """The guest's request and body, checked for shape: anything malformed is INVALID, saying what.

        Returns the request with every field present and typed (`query` as a list of string pairs) and
        the body (None, or a JSON object or array).
        """
        try:
            spec = read_json(call.memory, req_ptr, req_len)
        except RecursionError:
            raise HostError(Code.INVALID, "the request JSON nests too deeply") from None
        if not isinstance(spec, dict):
            raise HostError(Code.INVALID, 'the request must be a JSON object such as {"path": "/repos/{repo}/pulls/1"}')
        unknown = sorted(set(spec) - set(REQUEST_FIELDS))
        if unknown:
            raise HostError(Code.INVALID, f"unknown request field(s) {', '.join(unknown)}: a request has "
                                          f"{', '.join(REQUEST_FIELDS)} (the host sets GitHub's headers itself)")
        if not isinstance(spec.get("path"), str):
            raise HostError(Code.INVALID, '"path" must be a string such as "/repos/{repo}/pulls/1"')
        method = spec.get("method", "GET")
        if not isinstance(method, str) or method.upper() not in METHODS:
            raise HostError(Code.INVALID, f"method must be one of {', '.join(sorted(METHODS))}")
        accept = spec.get("accept", "json")
        if not isinstance(accept, str):
            raise HostError(Code.INVALID, "accept must be a string: json/diff/patch/raw/text/html/full or a GitHub media type")
        accept = MEDIA_TYPES.get(accept, accept)
        if not accept.startswith("application/vnd.github") and accept != "application/json":
            raise HostError(Code.INVALID, "accept must be json/diff/patch/raw/text/html/full or a GitHub media type")
        paginate = spec.get("paginate", False)
        if not isinstance(paginate, bool):
            raise HostError(Code.INVALID, "paginate must be true or false")
        max_pages = spec.get("max_pages", 10)
        if isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 1:
            raise HostError(Code.INVALID, f"max_pages must be a whole number from 1 (at most {MAX_PAGES} are fetched)")
        query = _query_pairs({} if spec.get("query") is None else spec["query"])
        if body_len > MAX_BODY:
            raise HostError(Code.TOO_LARGE, "request body over 8 MiB")
        body: Any = None
        if body_len:
            try:
                body = json.loads(call.memory.read(body_ptr, body_len))
            except RecursionError:
                raise HostError(Code.INVALID, "the request body nests too deeply") from None
            except ValueError:
                raise HostError(Code.INVALID, "the request body must be JSON (UTF-8)") from None
            if not isinstance(body, (dict, list)):
                raise HostError(Code.INVALID, "the request body must be a JSON object or array")
        checked = {"method": method.upper(), "path": spec["path"], "query": query, "accept": accept,
                   "paginate": paginate, "max_pages": min(max_pages, MAX_PAGES)}
        return checked, body

    def _check(self, run: RunContext, method: str, path: str, query: list[tuple[str, str]]) -> str:
        """The URL to send for `path` and `query`, built from exactly what passed the scope and permission
        checks (a search's `q` limited to the run's repositories); refusals are denials."""
        state = self._state(run)
        try:
            path = normalise_path(path)
            if path == "/search/issues":
                query = [(k, search_query(v, state.repos) if k == "q" else v) for k, v in query]
            multi: dict[str, list[str]] = {}
            for key, value in query:
                multi.setdefault(key, []).append(value)
            scope = classify(method, path, multi, state.repos)
        except ValueError as exc:
            raise run.deny(f"GitHub {method} {path[:200]!r}: {exc}") from None
        if not permission_granted(dict(run.flow.allow.github), scope):
            raise run.deny(f"GitHub {method} {path} needs `{scope.permission}: {scope.level}` in the flow's "
                           f"allow.github (it has {dict(run.flow.allow.github) or 'nothing'})")
        return path + (f"?{urllib.parse.urlencode(query)}" if query else "")

    def _same_api(self, url: str) -> tuple[str, list[tuple[str, str]]]:
        """A `Link` URL as a path under the API root and its query; a link to another host is refused."""
        if self.app is None:  # github_request refuses the call before
            raise HostError(Code.INTERNAL, "no GitHub App configured")
        base = urllib.parse.urlsplit(self.app.api_url)
        target = urllib.parse.urlsplit(url)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc):
            raise HostError(Code.UPSTREAM, f"pagination link to another host: {target.netloc}")
        path = target.path
        prefix = base.path.rstrip("/")
        if prefix and path.startswith(prefix + "/"):
            path = path[len(prefix):]
        return path, urllib.parse.parse_qsl(target.query, keep_blank_values=True)

    def _send(self, call: Call, method: str, url: str, accept: str, body: Any) -> GithubResponse:
        run = call.run
        state = self._state(run)
        if self.app is None or state.installation_id is None:  # github_request refuses the call before
            raise HostError(Code.INTERNAL, "no GitHub App configured, or no installation id in the event")
        if state.calls >= MAX_REQUESTS:
            raise HostError(Code.LIMIT, f"more than {MAX_REQUESTS} GitHub requests in one run")

        def counted(m: str) -> None:
            state.calls += 1
            if m not in ("GET", "HEAD"):
                state.writes += 1
            state.paths.append(f"{m} {url.split('?')[0]}")

        def waited(seconds: float) -> None:
            state.waited += seconds

        if state.requester is None:
            state.requester = self.app._requester(min(self.app.timeout, max(1.0, run.remaining())))
        return self.app.request(state.installation_id, method, url, accept=accept, body=body,
                                deadline=run.deadline, on_wait=waited, on_call=counted, requester=state.requester)


def _query_pairs(query: Any) -> list[tuple[str, str]]:
    """A guest's `query` object as (name, value) strings, or INVALID: values are strings, numbers or
    booleans (`true`/`false`), and `page`/`per_page` are whole numbers (per_page 1..100)."""
    if not isinstance(query, dict):
        raise HostError(Code.INVALID, 'query must be an object such as {"state": "open", "per_page": 50}')
    pairs: list[tuple[str, str]] = []
    for key, value in query.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (str, int, float)):
            text = str(value)
        else:
            raise HostError(Code.INVALID, f"query {key!r}: values are strings, numbers or booleans")
        if key in ("page", "per_page"):
            if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1 or (key == "per_page" and int(text) > 100):
                raise HostError(Code.INVALID, f"query {key}: a whole number" + (" from 1 to 100" if key == "per_page" else " from 1"))
        pairs.append((key, text))
    return pairs


# --- flows.yaml: `allow.github` and `allow.github_repos` of a flow, `github:` of the file -------------

# GitHub's repository and organization permission names for Apps, as its REST API spells them (account
# permissions such as email_addresses are not for an installation's token and are left out).
GITHUB_PERMISSIONS = frozenset({
    # repository
    "actions", "actions_variables", "administration", "artifact_metadata", "attestations", "checks",
    "codespaces", "codespaces_lifecycle_admin", "codespaces_metadata", "codespaces_secrets", "contents",
    "custom_properties", "dependabot_secrets", "deployments", "discussions", "environments", "issues",
    "merge_queues", "metadata", "packages", "pages", "pull_requests", "repository_advisories",
    "repository_custom_properties", "repository_hooks", "repository_projects", "secret_scanning_alerts",
    "secrets", "security_events", "single_file", "statuses", "team_discussions", "vulnerability_alerts",
    "workflows",
    # organization
    "custom_properties_for_organizations", "members", "organization_actions_variables",
    "organization_administration", "organization_announcement_banners", "organization_campaigns",
    "organization_codespaces", "organization_codespaces_secrets", "organization_codespaces_settings",
    "organization_copilot_agent_settings", "organization_copilot_seat_management",
    "organization_custom_org_roles", "organization_custom_properties", "organization_custom_roles",
    "organization_dependabot_secrets", "organization_events", "organization_hooks", "organization_packages",
    "organization_personal_access_token_requests", "organization_personal_access_tokens", "organization_plan",
    "organization_projects", "organization_secrets", "organization_self_hosted_runners",
    "organization_user_blocking",
})


def _check_github_permissions(value: Any) -> Any:
    """Keys of `allow.github` must be GitHub App permissions: a typo would otherwise grant nothing, silently."""
    if not isinstance(value, dict):
        return value
    for key in value:
        if isinstance(key, str) and key in GITHUB_PERMISSIONS:
            continue
        close = difflib.get_close_matches(str(key), sorted(GITHUB_PERMISSIONS), n=1, cutoff=0.6)
        hint = f", did you mean {close[0]!r}?" if close else ""
        if not close:
            family = FAMILIES.get(str(key))
            hint = f" ({key} is an API path; its permission is {family!r})" if family else ""
        raise FieldError(f"{abbreviate(key)} is not a GitHub App permission{hint} (expected a repository or "
                         "organization permission such as pull_requests, issues, contents, checks, metadata)",
                         (key,))
    return value


def _check_app_id(value: Any) -> Any:
    """The App's numeric id (0: no App, as `${GITHUB_APP_ID:-0}` gives) or, as text, its id or client id."""
    number = int(value) if isinstance(value, str) and value.strip().isdigit() and len(value) < 40 else value
    if isinstance(value, (bool, float)) or (isinstance(number, int) and not 0 <= number <= INT64_MAX):
        raise ValueError(f"expected the App's id, an integer from 0 to {INT64_MAX}, got {abbreviate(value)}")
    if isinstance(value, str) and len(value) > 64:
        raise ValueError(f"expected the App's id or client id (at most 64 characters), got {abbreviate(value)}")
    return value


class GithubAllow(Section):
    """The capability's part of a flow's `allow:` (flows/model.py's `Allow` is made of such parts)."""

    github: Annotated[dict[str, Literal["read", "write"]],  # App permission → level, e.g. {pull_requests: write}
                      BeforeValidator(_check_github_permissions)] = {}
    github_repos: list[str] = []  # more repositories (owner/name globs) than the event's own


class GithubAppSettings(Section):
    """`github:` of flows.yaml: the App the platform acts as (`GithubApp` above is its client)."""

    app_id: Annotated[Union[int, str], BeforeValidator(_check_app_id)]
    private_key: str  # a path to a PEM file, or the PEM itself
    webhook_secret: str
    api_url: str = "https://api.github.com"
    # GitHub's web pages (the App manifest form): derived from api_url when unset (github.com for
    # api.github.com, https://HOST for https://HOST/api/v3); set it for other layouts.
    web_url: Optional[str] = None
    bot_login: Optional[str] = None
    min_write_interval: duration_in(0.0, 60.0) = 1.0  # GitHub asks for a second between content-creating requests
