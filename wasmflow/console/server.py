"""Mount the console on an aiohttp app: login middleware, static files, pages, JSON API, live stream."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

from aiohttp import web

from wasmflow.console import auth as auth_module
from wasmflow.console.api import SERVICES_KEY, add_api_routes, api_not_found
from wasmflow.console.auth import ConsoleAuth
from wasmflow.console.live import add_live_routes
from wasmflow.console.login import add_login_routes
from wasmflow.console.pages import add_page_routes
from wasmflow.console.services import ConsoleServices

STATIC = Path(__file__).resolve().parent / "static"


def mount_console(app: web.Application, services: ConsoleServices, auth: ConsoleAuth) -> None:
    """Add the console to `app` (before it starts). Every path but the public ones now needs a login."""
    auth_module.install(app, auth)
    app[SERVICES_KEY] = services
    app.router.add_static("/static/", STATIC, follow_symlinks=False, append_version=False)
    add_login_routes(app)
    add_live_routes(app)
    add_api_routes(app)
    app.router.add_route("*", "/api/{tail:.*}", api_not_found)
    add_page_routes(app)


def is_loopback(host: str) -> bool:
    """Whether `host` (as given to --host) only listens on this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def login_link(host: str, port: int, token: Optional[str]) -> str:
    """The link to print at start-up (a wildcard bind is reached at 127.0.0.1)."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    base = f"http://{shown}:{port}/login"
    return f"{base}?token={token}" if token else base
