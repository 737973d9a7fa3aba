"""`/login` and `/logout`: the operator token in, a session cookie out."""

from __future__ import annotations

from typing import Optional

from aiohttp import web

from wasmflow.console.auth import AUTH_KEY, SESSION_COOKIE, set_session_cookie
from wasmflow.console.rendering import render


def _local_next(value: Optional[str]) -> str:
    """Where to go after logging in: a path on this server only (never `//host` or `http://...`)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or len(value) > 2000:
        return "/"
    return value


async def _exchange(request: web.Request, token: Optional[str], next_path: str) -> web.StreamResponse:
    session_id = request.app[AUTH_KEY].login(token)
    if session_id is None:
        return render(request, "login.html", status=403, next=next_path, logged_in=False,
                      error="That token is not valid (a one-time link logs in once). Check the token and try again.")
    response = web.Response(status=303, headers={"Location": next_path})
    set_session_cookie(request, response, session_id)
    return response


async def login_page(request: web.Request) -> web.StreamResponse:
    """GET /login shows the form; GET /login?token=... (the link `wasmflow up` prints) logs in at once."""
    next_path = _local_next(request.query.get("next"))
    if "token" in request.query:
        return await _exchange(request, request.query.get("token"), next_path)
    return render(request, "login.html", status=200, next=next_path, logged_in=False, error="")


async def login_post(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    token = form.get("token")
    next_value = form.get("next")
    return await _exchange(request, token if isinstance(token, str) else None,
                           _local_next(next_value if isinstance(next_value, str) else None))


async def logout(request: web.Request) -> web.StreamResponse:
    request.app[AUTH_KEY].logout(request.cookies.get(SESSION_COOKIE))
    response = web.Response(status=303, headers={"Location": "/login"})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def add_login_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login_post)
    app.router.add_post("/logout", logout)
