"""Registering the GitHub App in one click: GitHub's App manifest flow.

What the App needs follows from flows.yaml: the events are those of the flows' GitHub triggers (and the
permissions GitHub requires before it delivers them), the permissions the union of the flows'
`allow.github`. The operator's browser posts the manifest to GitHub (`POST {web}/settings/apps/new`, or an
organization's), GitHub creates the App and sends the browser back to `redirect_url` with a one-time code,
and wasmflow trades the code for the App's id, private key, webhook secret and client credentials
(`POST {api}/app-manifests/{code}/conversions`, no authentication: the code is the secret). They are
stored owner-only in the state directory, where the loader finds them (`wasmflow.flows.github_credentials`).

The console's `/setup` and `wasmflow github register` share everything here; only the page differs.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, urlsplit

import aiohttp

from wasmflow.flows.github_credentials import DEFAULT_API_URL, CredentialsError, StoredApp, load_app, save_app
from wasmflow.flows.model import FlowsFile

WEBHOOK_PATH = "/webhooks/github"
CALLBACK_PATH = "/setup/callback"
STATE_TTL = 3600.0  # GitHub's code lives an hour; a state older than that cannot meet a live code
MAX_NAME = 34  # GitHub's limit for an App's name
_ORG = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})$")
_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_API_VERSION = "2022-11-28"
MAX_ANSWER = 1024**2  # a conversion answer is ~4 KB; more is not GitHub

# The permission GitHub requires before an App may subscribe to an event (read is enough). Events every
# App gets without subscribing (ping, installation, ...) are in ALWAYS_DELIVERED.
EVENT_PERMISSIONS: dict[str, str] = {
    "check_run": "checks", "check_suite": "checks",
    "commit_comment": "contents", "create": "contents", "delete": "contents", "push": "contents",
    "release": "contents", "fork": "contents", "gollum": "contents",
    "deployment": "deployments", "deployment_status": "deployments",
    "discussion": "discussions", "discussion_comment": "discussions",
    "issues": "issues", "issue_comment": "issues", "milestone": "issues",
    "label": "metadata", "public": "metadata", "repository": "metadata", "star": "metadata",
    "watch": "metadata", "member": "metadata",
    "pull_request": "pull_requests", "pull_request_review": "pull_requests",
    "pull_request_review_comment": "pull_requests", "pull_request_review_thread": "pull_requests",
    "status": "statuses",
    "workflow_run": "actions", "workflow_job": "actions", "workflow_dispatch": "actions",
    "merge_group": "merge_queues", "page_build": "pages", "package": "packages", "registry_package": "packages",
    "code_scanning_alert": "security_events", "secret_scanning_alert": "secret_scanning_alerts",
    "dependabot_alert": "vulnerability_alerts", "repository_advisory": "repository_advisories",
    "project": "repository_projects", "project_card": "repository_projects",
    "project_column": "repository_projects",
}
ALWAYS_DELIVERED = frozenset({"ping", "installation", "installation_repositories", "installation_target",
                              "github_app_authorization", "meta"})


class ManifestError(Exception):
    """The registration cannot go on; the message says why and what to do (shown as is to the operator)."""


@dataclass(frozen=True)
class ManifestPlan:
    """What the App will be, before GitHub sees it: shown by /setup and `wasmflow github register`."""

    name: str
    homepage: str
    webhook_url: str
    redirect_url: str
    events: list[str]
    permissions: dict[str, str]
    flows: list[str]  # the flows that use GitHub
    notes: list[str] = field(default_factory=list)  # what the operator should know (loopback URL, ...)
    org: Optional[str] = None
    description: str = "wasmflow: sandboxed WebAssembly agents on GitHub events"

    def manifest(self) -> dict[str, Any]:
        """The JSON GitHub's form takes in its `manifest` field (GitHub's documented parameters)."""
        return {
            "name": self.name,
            "url": self.homepage,
            "description": self.description,
            "hook_attributes": {"url": self.webhook_url, "active": True},
            "redirect_url": self.redirect_url,
            "public": False,
            "default_events": list(self.events),
            "default_permissions": dict(self.permissions),
        }


def normalise_public_url(value: str) -> str:
    """`https://host[:port][/prefix]` without a trailing slash; ManifestError for anything else."""
    text = (value or "").strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or \
            parts.fragment or "@" in parts.netloc:
        raise ManifestError(f"the public URL must look like https://wasmflow.example.com (where GitHub can "
                            f"reach `wasmflow up`), got {text[:80]!r}; pass --public-url or set WASMFLOW_PUBLIC_URL")
    return text.rstrip("/")


def web_base_url(api_url: str, web_url: Optional[str] = None) -> str:
    """GitHub's web address for an API base URL: github.com for api.github.com, https://HOST for GitHub
    Enterprise Server's https://HOST/api/v3, SUBDOMAIN.ghe.com for api.SUBDOMAIN.ghe.com; anything else
    (a stand-in serving both) is its own web address. An explicit `web_url` wins."""
    if web_url and web_url.strip():
        return web_url.strip().rstrip("/")
    api = (api_url or DEFAULT_API_URL).strip().rstrip("/")
    parts = urlsplit(api)
    if parts.path.rstrip("/").endswith("/api/v3"):
        return api[: -len("/api/v3")]
    if parts.hostname and parts.hostname.startswith("api.") and parts.path in ("", "/"):
        return f"{parts.scheme}://{parts.netloc[4:]}"
    return api


def default_name(public_url: str) -> str:
    """`wasmflow HOST`, cut to GitHub's 34 characters: App names are unique across GitHub."""
    host = urlsplit(public_url).hostname or "local"
    return f"wasmflow {host}"[:MAX_NAME].strip()


def check_org(org: Optional[str]) -> Optional[str]:
    if org is None or not org.strip():
        return None
    org = org.strip()
    if not _ORG.match(org):
        raise ManifestError(f"{org[:60]!r} is not a GitHub organization name (letters, digits and -, at most 39)")
    return org


def plan(flows: FlowsFile, public_url: str, redirect_url: Optional[str] = None, name: Optional[str] = None,
         org: Optional[str] = None) -> ManifestPlan:
    """The App the flows need: events from their GitHub triggers, permissions from their `allow.github`
    (the higher level wins) plus read access for each subscribed event GitHub requires it for."""
    public = normalise_public_url(public_url)
    notes: list[str] = []
    events: set[str] = set()
    permissions: dict[str, str] = {}
    users: list[str] = []
    for flow in flows.flows:
        triggers = [t.github for t in flow.on if t.github is not None]
        if not triggers and not flow.allow.github:
            continue
        users.append(flow.name)
        for level_name, level in flow.allow.github.items():
            if permissions.get(level_name) != "write":
                permissions[level_name] = level
        for trigger in triggers:
            for event in trigger.events:
                base = event.split(".", 1)[0]
                if base == "*":
                    notes.append(f"flow {flow.name} triggers on every event (*): subscribe to the ones it "
                                 "needs on the App's settings page after it is created")
                elif base not in ALWAYS_DELIVERED:
                    events.add(base)
    for event in sorted(events):
        needed = EVENT_PERMISSIONS.get(event)
        if needed is None:
            notes.append(f"event {event}: wasmflow does not know which permission GitHub requires for it; "
                         "if GitHub refuses the manifest, add that permission to the flow's allow.github")
        elif needed not in permissions:
            permissions[needed] = "read"
    if permissions and "metadata" not in permissions:
        permissions["metadata"] = "read"  # every App with repository access has it; GitHub adds it anyway
    host = urlsplit(public).hostname or ""
    if _is_local(host):
        notes.append(f"{public} is a loopback address: GitHub cannot deliver webhooks to it; pass the address "
                     "GitHub can reach (--public-url or WASMFLOW_PUBLIC_URL)")
    elif urlsplit(public).scheme != "https":
        notes.append("the public URL is not https: webhook payloads would cross the internet in clear text")
    if not users:
        notes.append("no flow uses GitHub (no github trigger, no allow.github): the App would receive nothing")
    return ManifestPlan(
        name=(name or default_name(public)).strip()[:MAX_NAME], homepage=public,
        webhook_url=public + WEBHOOK_PATH, redirect_url=redirect_url or public + CALLBACK_PATH,
        events=sorted(events), permissions=dict(sorted(permissions.items())), flows=users, notes=notes,
        org=check_org(org))


def _is_local(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.") or host.endswith(".localhost")


def form_action(web_url: str, state: str, org: Optional[str] = None) -> str:
    """Where the browser posts the manifest: the user's new-App page, or the organization's."""
    base = web_url.rstrip("/")
    org = check_org(org)
    path = f"/organizations/{quote(org)}/settings/apps/new" if org else "/settings/apps/new"
    return f"{base}{path}?state={quote(state)}"


class PendingStates:
    """The `state` nonces of registrations under way: one per page shown, each good for one callback
    within STATE_TTL. A callback whose state is not here was not started by this wasmflow (or was
    already used), and is refused: it could carry someone else's App."""

    def __init__(self, ttl: float = STATE_TTL, limit: int = 1000) -> None:
        self.ttl, self.limit = ttl, limit
        self._states: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self) -> str:
        state = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._states = {s: t for s, t in self._states.items() if now - t < self.ttl}
            while len(self._states) >= self.limit:  # pages reloaded many times: forget the oldest
                self._states.pop(next(iter(self._states)))
            self._states[state] = now
        return state

    def take(self, state: Optional[str]) -> bool:
        """True once for a state issued less than `ttl` ago; False for anything else."""
        if not state:
            return False
        with self._lock:
            issued = self._states.pop(state, None)
        return issued is not None and time.monotonic() - issued < self.ttl


def check_code(code: Optional[str]) -> str:
    text = (code or "").strip()
    if not _CODE.match(text):
        raise ManifestError("the callback has no valid code from GitHub; start again at /setup "
                            "(or `wasmflow github register`)")
    return text


async def exchange(api_url: str, code: str, timeout: float = 30.0) -> dict[str, Any]:
    """GitHub's answer to `POST {api}/app-manifests/{code}/conversions`: the new App with its secrets.

    404 is GitHub's answer for a code it does not know: used already, expired (after an hour), or never
    issued; 422 when it refuses the App. Each becomes a ManifestError saying what to do.
    """
    code = check_code(code)
    url = f"{api_url.rstrip('/')}/app-manifests/{quote(code)}/conversions"
    headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": _API_VERSION,
               "User-Agent": "wasmflow"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.post(url, headers=headers) as resp:
                status = resp.status
                raw = await resp.content.read(MAX_ANSWER + 1)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ManifestError(f"cannot reach GitHub's API at {api_url}: {type(exc).__name__} {exc}".rstrip()
                            + "; check the API URL (github.api_url) and the network, then start again") from None
    try:
        body = json.loads(raw) if len(raw) <= MAX_ANSWER else None
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        body = None
    message = str(body.get("message", ""))[:200] if isinstance(body, dict) else ""
    if status == 404:
        raise ManifestError("GitHub does not know this code: it was used already or it expired (a code lasts "
                            "one hour). The App may exist already: look under Settings → Developer settings → "
                            "GitHub Apps; otherwise start again at /setup.")
    if status == 422:
        raise ManifestError(f"GitHub refused to create the App ({message or 'validation failed'}); start again "
                            "at /setup")
    if status != 201 or not isinstance(body, dict):
        raise ManifestError(f"GitHub answered {status} to the code exchange{': ' + message if message else ''}; "
                            "try again in a minute")
    problems = _answer_problems(body)
    if problems:
        raise ManifestError(f"GitHub's answer to the code exchange is not usable ({', '.join(problems)}); nothing "
                            "was stored: check the API URL (github.api_url)")
    return body


def _answer_problems(body: dict[str, Any]) -> list[str]:
    """What is missing or malformed in a conversion answer: it is stored and shown, so it is checked."""
    problems = [f"no {k}" for k in ("slug", "pem", "webhook_secret", "client_id", "client_secret", "html_url")
                if not isinstance(body.get(k), str) or not body[k] or len(body[k]) > 16384]
    app_id = body.get("id")
    if not isinstance(app_id, int) or isinstance(app_id, bool) or not 0 < app_id < 2**63:
        problems.append("no App id")
    if "no pem" not in problems and not body["pem"].lstrip().startswith("-----BEGIN"):
        problems.append("the key is not a PEM")
    if "no html_url" not in problems and urlsplit(body["html_url"]).scheme not in ("http", "https"):
        problems.append("the App's address is not http(s)")
    return problems


async def register(state_dir: Path, api_url: str, web_url: str, code: str) -> StoredApp:
    """Exchange the code and store the App's credentials owner-only in `state_dir`."""
    conversion = await exchange(api_url, code)
    return save_app(state_dir, conversion, api_url, web_url)


class Registrar:
    """One place that knows this installation's GitHub: the flows, where credentials go, GitHub's API and
    web addresses and the public URL. `/setup` and `wasmflow github register` each hold one."""

    user_errors: tuple[type[Exception], ...] = (ManifestError, CredentialsError)

    def __init__(self, flows: FlowsFile, state_dir: Path, public_url: Optional[str] = None,
                 api_url: Optional[str] = None, web_url: Optional[str] = None,
                 states: Optional[PendingStates] = None) -> None:
        section = flows.github
        self.flows = flows
        self.state_dir = Path(state_dir)
        self.api_url = (api_url or (section.api_url if section else "") or DEFAULT_API_URL).rstrip("/")
        self.web_url = web_base_url(self.api_url, web_url or (section.web_url if section else None))
        self.public_url = public_url.strip() if public_url and public_url.strip() else None
        self.states = states or PendingStates()

    def plan(self, public_url: Optional[str] = None, org: Optional[str] = None,
             redirect_url: Optional[str] = None, name: Optional[str] = None) -> ManifestPlan:
        """The App for `public_url` (default: the one this registrar was given)."""
        url = public_url or self.public_url
        if not url:
            raise ManifestError("no public URL: pass --public-url https://HOST (the address GitHub reaches "
                                "`wasmflow up` at) or set WASMFLOW_PUBLIC_URL")
        return plan(self.flows, url, redirect_url=redirect_url, name=name, org=org)

    def form_action(self, state: str, org: Optional[str] = None) -> str:
        return form_action(self.web_url, state, org)

    def stored(self) -> Optional[StoredApp]:
        """The App registered before, if any (CredentialsError when its files are unusable)."""
        return load_app(self.state_dir)

    async def register(self, code: str) -> StoredApp:
        return await register(self.state_dir, self.api_url, self.web_url, code)
