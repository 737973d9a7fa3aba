"""`/setup`: register the GitHub App in one click (GitHub's App manifest flow), under the console's login.

`GET /setup` shows what the App will be (name, webhook URL, events and permissions computed from the flows)
and a button that posts GitHub's manifest form; GitHub creates the App and sends the browser back to
`GET /setup/callback?code=...&state=...`, which refuses a `state` this page did not issue, trades the code
for the App's credentials, stores them and shows the install link.

The console sits below the platform in the layers, so the work itself (computing the manifest, the code
exchange, the credential files) is handed in by the platform as a `Registrar`
(`wasmflow.platform.github_manifest.Registrar`); this module only serves the pages.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Protocol

from aiohttp import web

from wasmflow.console.auth import authenticated
from wasmflow.console.rendering import render

log = logging.getLogger("wasmflow.console.setup")

PUBLIC_URL_ENV = "WASMFLOW_PUBLIC_URL"


class Registrar(Protocol):
    """What /setup needs from the platform (the methods of github_manifest.Registrar)."""

    public_url: Optional[str]
    api_url: str
    web_url: str
    states: Any  # PendingStates: issue() -> str, take(state) -> bool
    user_errors: tuple[type[Exception], ...]  # failures whose message is for the operator, shown as is

    def plan(self, public_url: Optional[str] = None, org: Optional[str] = None,
             redirect_url: Optional[str] = None, name: Optional[str] = None) -> Any: ...

    def form_action(self, state: str, org: Optional[str] = None) -> str: ...

    def stored(self) -> Any: ...

    async def register(self, code: str) -> Any: ...


REGISTRAR_KEY = web.AppKey("wasmflow_setup_registrar", object)


def add_setup_routes(app: web.Application, registrar: Registrar) -> None:
    """Serve /setup and its callback on `app`, which must carry the console's login middleware (the
    handlers refuse to answer a request it did not authenticate, should it ever be missing)."""
    app[REGISTRAR_KEY] = registrar
    app.router.add_get("/setup", setup_page)
    app.router.add_get("/setup/callback", setup_callback)


def _registrar(request: web.Request) -> Registrar:
    if not authenticated(request):  # mounted without the console's login: never serve it open
        raise web.HTTPForbidden(text="403 forbidden: /setup needs the console's login\n")
    return request.app[REGISTRAR_KEY]  # type: ignore[return-value]


def _public_url(request: web.Request, registrar: Registrar) -> tuple[str, bool]:
    """The URL GitHub will call: the configured one, else (shown as a guess) this request's own origin."""
    configured = registrar.public_url or os.environ.get(PUBLIC_URL_ENV, "").strip()
    if configured:
        return configured, True
    return f"{request.scheme}://{request.host}", False


async def setup_page(request: web.Request) -> web.StreamResponse:
    registrar = _registrar(request)
    org = request.query.get("org", "").strip() or None
    public_url, configured = _public_url(request, registrar)
    error, stored, plan, manifest, action = "", None, None, "", ""
    try:
        stored = registrar.stored()
    except registrar.user_errors as exc:  # unusable credential files: say what is wrong, carry on
        error = str(exc)
    try:
        plan = registrar.plan(public_url, org=org)
        state = registrar.states.issue()
        action = registrar.form_action(state, plan.org)
        manifest = json.dumps(plan.manifest())
    except registrar.user_errors as exc:  # a bad public URL or organization name
        error = str(exc)
    return render(request, "setup.html", section="setup", plan=plan, manifest=manifest, action=action,
                  org=org or "", public_url=public_url, configured=configured, stored=stored,
                  api_url=registrar.api_url, web_url=registrar.web_url, error=error)


async def setup_callback(request: web.Request) -> web.StreamResponse:
    registrar = _registrar(request)
    if not registrar.states.take(request.query.get("state")):
        return render(request, "setup_error.html", status=400, section="setup",
                      title="This registration was not started here",
                      message="The callback's state does not match a registration this console started (or it "
                              "was used already, or is more than an hour old), so nothing was stored. Start "
                              "again from the set-up page.")
    try:
        stored = await registrar.register(request.query.get("code", ""))
    except registrar.user_errors as exc:
        return render(request, "setup_error.html", status=400, section="setup",
                      title="GitHub did not hand over the App", message=str(exc))
    except OSError:
        log.exception("storing the GitHub App failed")
        return render(request, "setup_error.html", status=500, section="setup",
                      title="The App could not be stored",
                      message="wasmflow could not write the credentials into its state directory; its log says "
                              "why. GitHub has created the App: find it under Settings, Developer settings, "
                              "GitHub Apps, and generate a key there (docs/github-app.md, the manual path).")
    log.info("registered GitHub App %s (id %s); credentials in %s", stored.slug, stored.app_id, stored.directory)
    return render(request, "setup_done.html", section="setup", stored=stored)

