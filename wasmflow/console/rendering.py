"""The console's Jinja2 environment: templates shipped in the package, autoescaped, extendable by others.

Another part of wasmflow that serves pages under the console's login (the GitHub App set-up at `/setup`)
registers its own template folder with `register_templates` and extends `base.html`, which defines the
blocks `title`, `content`, `head`, `scripts` and `nav_extra`. `render` fills in what every page needs:
the CSRF token for its forms and whether the visitor is logged in.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

import jinja2
from aiohttp import web

from wasmflow.console.auth import HOW_KEY, SECURITY_HEADERS, csrf_token

_loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader("wasmflow.console", "templates")]
_env = jinja2.Environment(loader=jinja2.ChoiceLoader(_loaders), autoescape=True, undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True)


def _when(ts: Optional[float]) -> str:
    """A unix time as UTC text (the page's script rewrites it in the reader's time zone)."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(float(ts), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ms(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1f}"


def _short(value: Optional[str], n: int = 12) -> str:
    return (value or "")[:n]


_env.filters.update(when=_when, ms=_ms, short=_short)


def register_templates(package: str, folder: str = "templates") -> None:
    """Add `package`'s template folder; its templates may `{% extends "base.html" %}`."""
    if all(getattr(existing, "package_name", None) != package for existing in _loaders):
        _loaders.append(jinja2.PackageLoader(package, folder))  # the ChoiceLoader reads this same list


def environment() -> jinja2.Environment:
    return _env


def render(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    """Render template `name` for `request` as an HTML response with the console's security headers."""
    context.setdefault("section", "")
    context.setdefault("logged_in", HOW_KEY in request)
    context.setdefault("csrf_token", csrf_token(request))
    body = _env.get_template(name).render(**context)
    return web.Response(text=body, status=status, content_type="text/html", headers=SECURITY_HEADERS)
