"""Who may see the console: an operator token, exchanged for a session cookie, and CSRF on every change.

The console and its JSON API sit on the same aiohttp app as the webhook ingress, so one middleware
decides for every request: the public paths (`/webhooks/*`, `/flows/*`, `/metrics`, `/healthz`, the
OpenAI-compatible `/v1/*`, the console's static files and its login page) pass untouched; every other
path - the console's pages, `/api/*`, and any route mounted later such as `/setup` - needs either

- a session cookie (HttpOnly, SameSite=Lax) obtained at `/login` with the operator token, or
- `Authorization: Bearer <token>` (scripts, on any protected path).

A request that changes state (any method but GET/HEAD/OPTIONS) with a session cookie must also carry the
session's CSRF token, in the `X-CSRF-Token` header or a `csrf_token` form field; the middleware checks it
before the handler runs, so a route added under `/setup` is covered without doing anything. A Bearer
request carries no ambient credential, so it needs no CSRF token.

Missing credentials get 401, wrong ones 403, and the body says only that: no page, no data, no hint of
the token. Tokens are compared in constant time (on their SHA-256 digests, so the length leaks nothing
either). Without a configured token, `wasmflow up` generates a one-time token for its login link: it
logs in once and is then spent; scripts need a configured token.
"""

from __future__ import annotations

import hashlib
import html
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional
from urllib.parse import quote

from aiohttp import web

SESSION_COOKIE = "wasmflow_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Paths served without a console login: their own authentication (webhook signatures) or none by design.
PUBLIC_PREFIXES = ("/webhooks/", "/flows/", "/v1/", "/static/")
PUBLIC_PATHS = frozenset({"/metrics", "/healthz", "/login", "/favicon.ico"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def tokens_equal(presented: Optional[str], expected: Optional[str]) -> bool:
    """Constant-time comparison of two tokens; a missing one never matches."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(_digest(presented), _digest(expected))


def is_public(path: str) -> bool:
    """Whether `path` is served without a console login (see the module docstring)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@dataclass
class Session:
    csrf: str
    expires_at: float


@dataclass
class ConsoleAuth:
    """The operator token, the one-time login token when none is configured, and the live sessions.

    Sessions live in this process's memory: a restart logs everyone out, which is what a restart of a
    single-operator control plane should do.
    """

    token: Optional[str] = None
    one_time: Optional[str] = None
    sessions: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, token: Optional[str]) -> "ConsoleAuth":
        """With `token` configured, that token; without, a fresh one-time login token (`login_token`)."""
        if token:
            return cls(token=token)
        return cls(one_time=secrets.token_urlsafe(32))

    @property
    def login_token(self) -> Optional[str]:
        """The token a login link carries: the configured one, else the unspent one-time token."""
        return self.token or self.one_time

    def login(self, presented: Optional[str]) -> Optional[str]:
        """Exchange a token for a new session id, or None when it is wrong (or a spent one-time token)."""
        with self._lock:
            if tokens_equal(presented, self.token):
                pass
            elif tokens_equal(presented, self.one_time):
                self.one_time = None  # spent: the link printed at start-up logs in once
            else:
                return None
            self._expire()
            while len(self.sessions) >= MAX_SESSIONS:
                self.sessions.pop(min(self.sessions, key=lambda k: self.sessions[k].expires_at))
            session_id = secrets.token_urlsafe(32)
            self.sessions[session_id] = Session(secrets.token_urlsafe(32), time.time() + SESSION_SECONDS)
            return session_id

    def session(self, session_id: Optional[str]) -> Optional[Session]:
        if not session_id:
            return None
        with self._lock:
            found = self.sessions.get(session_id)
            if found is None or found.expires_at < time.time():
                self.sessions.pop(session_id, None)
                return None
            return found

    def logout(self, session_id: Optional[str]) -> None:
        with self._lock:
            self.sessions.pop(session_id or "", None)

    def bearer_ok(self, presented: Optional[str]) -> bool:
        """Only a configured token works as a Bearer token (the one-time token is for the login link)."""
        return tokens_equal(presented, self.token)

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, s in self.sessions.items() if s.expires_at < now]:
            del self.sessions[key]


AUTH_KEY = web.AppKey("wasmflow_console_auth", ConsoleAuth)
# Set on each request the middleware let through: how it authenticated ("session" or "bearer"), and the session.
HOW_KEY = web.RequestKey("console_auth", str)
SESSION_KEY = web.RequestKey("console_session", Session)


def authenticated(request: web.Request) -> bool:
    """Whether the login middleware let this request through (a session or a Bearer token)."""
    return HOW_KEY in request


def csrf_token(request: web.Request) -> str:
    """The CSRF token to embed in a page's forms (`<input name="csrf_token">`) or send as `X-CSRF-Token`.

    Empty for a request authenticated by a Bearer token (it needs none) or not authenticated at all.
    """
    session = request.get(SESSION_KEY)
    return session.csrf if isinstance(session, Session) else ""


async def check_csrf(request: web.Request) -> None:
    """Raise 403 unless a state-changing, cookie-authenticated request carries its session's CSRF token.

    The login middleware already calls this before any handler of a protected path, so a handler never
    has to; calling it again is harmless. Safe methods and Bearer requests pass.
    """
    if request.method in SAFE_METHODS or request.get(HOW_KEY) == "bearer":
        return
    session = request.get(SESSION_KEY)
    if not isinstance(session, Session):
        raise _forbidden(request, "not logged in")
    presented = request.headers.get(CSRF_HEADER)
    if presented is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        value = form.get(CSRF_FIELD)
        presented = value if isinstance(value, str) else None
    if not tokens_equal(presented, session.csrf):
        raise _forbidden(request, "missing or wrong CSRF token: reload the page and try again")


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/") or "application/json" in request.headers.get("Accept", "")


def _forbidden(request: web.Request, why: str) -> web.HTTPForbidden:
    if _wants_json(request):
        return web.HTTPForbidden(text=f'{{"error": "{why}"}}', content_type="application/json")
    return web.HTTPForbidden(text=f"403 forbidden: {why}\n", content_type="text/plain")


def _unauthorized(request: web.Request) -> web.StreamResponse:
    if _wants_json(request):
        return web.json_response({"error": "login required: send Authorization: Bearer <console token>"},
                                 status=401, headers={"WWW-Authenticate": 'Bearer realm="wasmflow"'})
    if request.method in SAFE_METHODS:  # a page: send the browser to the login form, coming back here
        location = html.escape("/login?next=" + quote(request.path_qs, safe=""))
        body = (f'<!doctype html><meta http-equiv="refresh" content="0; url={location}">'
                f'<title>Log in</title><p>401: log in to the wasmflow console: <a href="{location}">log in</a>')
        return web.Response(status=401, text=body, content_type="text/html", headers=SECURITY_HEADERS)
    return web.Response(status=401, text="401 login required\n", content_type="text/plain")


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _bearer(request: web.Request) -> Optional[str]:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


@web.middleware
async def login_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let public paths through; demand a session (plus CSRF on changes) or a Bearer token elsewhere."""
    if is_public(request.path):
        response = await handler(request)
        if request.path == "/login":
            response.headers.update(SECURITY_HEADERS)
        return response
    auth = request.app[AUTH_KEY]
    bearer = _bearer(request)
    if bearer is not None:
        if not auth.bearer_ok(bearer):
            raise _forbidden(request, "wrong token")
        request[HOW_KEY] = "bearer"
    else:
        session = auth.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return _unauthorized(request)
        request[HOW_KEY] = "session"
        request[SESSION_KEY] = session
        await check_csrf(request)
    response = await handler(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def set_session_cookie(request: web.Request, response: web.StreamResponse, session_id: str) -> None:
    response.set_cookie(SESSION_COOKIE, session_id, max_age=SESSION_SECONDS, path="/", httponly=True,
                        samesite="Lax", secure=request.secure)


def install(app: web.Application, auth: ConsoleAuth) -> None:
    """Put the login middleware on `app` (before it starts) and keep `auth` where the routes find it."""
    app[AUTH_KEY] = auth
    app.middlewares.append(login_middleware)
