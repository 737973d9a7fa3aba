"""The GitHub stand-in's part of the App manifest flow: GitHub's web form and the code conversion.

- `POST /settings/apps/new?state=S` and `POST /organizations/{org}/settings/apps/new?state=S` take the
  `manifest` form field, as GitHub's web pages do, check it the way GitHub does (name, url, hook URL,
  redirect URL, permission levels, events allowed by the permissions) and send the browser to the
  manifest's `redirect_url` with `?code=...&state=S`. (GitHub first asks its signed-in user to confirm the
  name; the stand-in's user always does.) A manifest GitHub would refuse gets a 422 page saying why.
- `POST /app-manifests/{code}/conversions` (API, no authentication) answers 201 with GitHub's JSON: id,
  slug, node_id, owner, name, html_url, permissions, events, client_id, client_secret, webhook_secret,
  pem. A code is good once and for `manifest_code_ttl` seconds (an hour, as on GitHub); after that, or
  a second time, it is GitHub's 404 `Not Found`.
- `GET /apps/{slug}/installations/new`: the page the install link opens (a stand-in page, nothing to do).

After a conversion the stand-in *is* the new App: installation tokens are signed by its new key and
`GET /app` names it, so a test can go on from registration to a run that calls the API.
"""

from __future__ import annotations

import html
import json
import re
import secrets
import threading
import time
from typing import Any, Optional
from urllib.parse import urlencode, urlsplit, urlunsplit, parse_qsl

from aiohttp import web

WEB_PATH = re.compile(r"^/(?:settings/apps/new|organizations/[^/]+/settings/apps/new|app-manifests/[^/]+/conversions"
                      r"|apps/[^/]+/installations/new)$")
_LEVELS = {"read", "write"}


class ManifestStandin:
    """Mixed into GithubStandin: its state is created on first use, so the host class needs no setup."""

    manifest_code_ttl = 3600.0
    user_login = "octocat"

    def _manifest_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_manifest")
        if state is None:
            state = self.__dict__.setdefault("_manifest", {"codes": {}, "apps": [], "lock": threading.Lock()})
        return state

    @property
    def registered_apps(self) -> list[dict[str, Any]]:
        """Every App created through the manifest flow (GitHub's conversion JSON), oldest first."""
        state = self._manifest_state()
        with state["lock"]:
            return [dict(a) for a in state["apps"]]

    def expire_manifest_codes(self) -> None:
        """Every code issued so far is now past its hour (to test the expired-code path without waiting)."""
        state = self._manifest_state()
        with state["lock"]:
            for entry in state["codes"].values():
                entry["issued"] -= self.manifest_code_ttl + 1

    @staticmethod
    def is_manifest_path(path: str) -> bool:
        """Paths served without a token: GitHub's web pages and the conversion (the code is the secret)."""
        return bool(WEB_PATH.match(path))

    def add_manifest_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/settings/apps/new", self.h_manifest_form)
        router.add_post("/organizations/{org}/settings/apps/new", self.h_manifest_form)
        router.add_post("/app-manifests/{code}/conversions", self.h_manifest_conversion)
        router.add_get("/apps/{slug}/installations/new", self.h_install_page)

    # -- handlers -----------------------------------------------------------------------------------

    async def h_manifest_form(self, request: web.Request) -> web.Response:
        form = await request.post()
        raw = form.get("manifest")
        if not isinstance(raw, str) or not raw.strip():
            return _page(422, "Invalid GitHub App configuration", "The manifest form field is missing.")
        try:
            manifest = json.loads(raw)
        except ValueError:
            return _page(422, "Invalid GitHub App configuration", "The manifest is not valid JSON.")
        problems = _manifest_problems(manifest)
        if problems:
            return _page(422, "Invalid GitHub App configuration", "; ".join(problems))
        org = request.match_info.get("org")
        code = secrets.token_hex(20)
        state = self._manifest_state()
        with state["lock"]:
            state["codes"][code] = {"manifest": manifest, "owner": org, "issued": time.time()}
        target = urlsplit(manifest["redirect_url"])
        query = parse_qsl(target.query, keep_blank_values=True) + [("code", code)]
        if request.query.get("state") is not None:
            query.append(("state", request.query["state"]))
        return web.Response(status=302, headers={"Location": urlunsplit(target._replace(query=urlencode(query)))})

    async def h_manifest_conversion(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        state = self._manifest_state()
        with state["lock"]:
            entry = state["codes"].pop(code, None)
        if entry is None or time.time() - entry["issued"] > self.manifest_code_ttl:
            return _api_error(404, "Not Found")
        app = self._create_app(entry["manifest"], entry["owner"], f"{request.scheme}://{request.host}")
        with state["lock"]:
            state["apps"].append(app)
        return web.json_response(app, status=201)

    async def h_install_page(self, request: web.Request) -> web.Response:
        slug = request.match_info["slug"]
        known = any(a["slug"] == slug for a in self.registered_apps)
        if not known:
            return _page(404, "Not Found", "No such GitHub App.")
        return _page(200, f"Install {slug}", "Choose the repositories this App may use (stand-in: nothing to do).")

    # -- the new App --------------------------------------------------------------------------------

    def _create_app(self, manifest: dict[str, Any], org: Optional[str], base: str) -> dict[str, Any]:
        private, public = generate_app_key()
        lock = getattr(self, "_lock")
        with lock:
            app_id = self._next_id()  # type: ignore[attr-defined]
            slug = re.sub(r"[^a-z0-9]+", "-", manifest["name"].lower()).strip("-") or f"app-{app_id}"
            self.app_id, self.app_slug = app_id, slug  # type: ignore[attr-defined]
            self.private_key_pem, self.public_key_pem = private, public  # type: ignore[attr-defined]
        owner = {"login": org or self.user_login, "id": app_id + 7, "type": "Organization" if org else "User"}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        permissions = {"metadata": "read", **manifest.get("default_permissions", {})}
        hook = manifest.get("hook_attributes") or {}
        return {
            "id": app_id, "slug": slug, "node_id": f"A_{app_id}", "owner": owner, "name": manifest["name"],
            "description": manifest.get("description", ""), "external_url": manifest["url"],
            "html_url": f"{base}/apps/{slug}", "created_at": now, "updated_at": now,
            "permissions": permissions, "events": list(manifest.get("default_events", [])),
            "installations_count": 0, "client_id": "Iv23li" + secrets.token_hex(7),
            "client_secret": secrets.token_hex(20),
            "webhook_secret": secrets.token_hex(20) if hook.get("url") else None, "pem": private,
        }


def generate_app_key() -> tuple[str, str]:
    """A fresh RSA key pair for an App: (private PEM, as GitHub hands it over once; public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def _manifest_problems(manifest: Any) -> list[str]:
    """GitHub's checks of a manifest, as far as the stand-in needs them."""
    from wasmflow.platform.github_manifest import EVENT_PERMISSIONS

    if not isinstance(manifest, dict):
        return ["the manifest must be a JSON object"]
    problems = []
    name = manifest.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 34:
        blank = not isinstance(name, str) or not name.strip()
        problems.append("Name can't be blank" if blank else "Name is too long (maximum is 34 characters)")
    if not _http_url(manifest.get("url")):
        problems.append("Homepage URL is not a valid URL")
    if not _http_url(manifest.get("redirect_url")):
        problems.append("Redirect URL is not a valid URL")
    hook = manifest.get("hook_attributes")
    if hook is not None and (not isinstance(hook, dict) or not _http_url(hook.get("url"))):
        problems.append("Hook URL is not a valid URL")
    permissions = manifest.get("default_permissions", {})
    if not isinstance(permissions, dict) or any(v not in _LEVELS for v in permissions.values()):
        problems.append("Default permissions must map permission names to read or write")
        permissions = {}
    events = manifest.get("default_events", [])
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        return problems + ["Default events must be a list of event names"]
    unsupported = [e for e in events if EVENT_PERMISSIONS.get(e) not in (None, "metadata")
                   and EVENT_PERMISSIONS[e] not in permissions]
    if unsupported:
        problems.append(f"Default events unsupported: {', '.join(unsupported)} (the App lacks their permission)")
    return problems


def _http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _page(status: int, title: str, text: str) -> web.Response:
    body = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)} · GitHub</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p class=flash>{html.escape(text)}</p></body></html>")
    return web.Response(status=status, text=body, content_type="text/html")


def _api_error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message,
                              "documentation_url": "https://docs.github.com/rest/apps/apps#create-a-github-app-from-a-manifest",
                              "status": str(status)}, status=status)
