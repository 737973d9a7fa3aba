"""What the manifest-flow tests share: a flows.yaml that uses GitHub, and a console app serving /setup.

The console app is assembled the way `wasmflow up` mounts it (the console's login middleware and login
routes, /setup with a Registrar over the flows), on a real aiohttp server on loopback.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional

from aiohttp import web

from wasmflow.console.auth import ConsoleAuth, install
from wasmflow.console.login import add_login_routes
from wasmflow.console.setup import add_setup_routes
from wasmflow.loopback import LoopbackServer
from wasmflow.flows.loader import LoadedFlows, load_flows
from wasmflow.platform.github_manifest import Registrar

TOKEN = "console-test-token-0123456789"

FLOWS_YAML = """\
state_dir: state
github:
  app_id: ${GITHUB_APP_ID:-0}
  private_key: ${GITHUB_APP_PRIVATE_KEY:-state/github-app.pem}
  webhook_secret: ${GITHUB_WEBHOOK_SECRET:-}
  api_url: ${GITHUB_API_URL:-https://api.github.com}
flows:
  - name: hello
    module: hello.wasm
    on:
      - github: {events: [ping, push, issues.opened]}
      - http
  - name: code-review
    module: review.wasm
    on:
      - github: {events: [pull_request.opened, pull_request.synchronize, issue_comment.created]}
    allow:
      github: {pull_requests: write, issues: write, contents: read}
  - name: nightly
    module: nightly.wasm
    on:
      - schedule: {cron: "0 3 * * *"}
    allow:
      github: {checks: read, issues: read}
  - name: local-only
    module: local.wasm
    on:
      - http
"""
# What the flows above need: the events of their GitHub triggers (ping is delivered to every App), the
# union of allow.github (write beats read), read access for push (contents), and metadata.
EXPECTED_EVENTS = ["issue_comment", "issues", "pull_request", "push"]
EXPECTED_PERMISSIONS = {"checks": "read", "contents": "read", "issues": "write", "metadata": "read",
                        "pull_requests": "write"}


def write_flows(tmp_path: Path, text: str = FLOWS_YAML) -> Path:
    path = tmp_path / "flows.yaml"
    path.write_text(text)
    return path


class SetupServer(LoopbackServer):
    """The console's login and /setup for `flows`, served on loopback."""

    def __init__(self, loaded: LoadedFlows, api_url: str, public_url: Optional[str] = None) -> None:
        super().__init__()
        self.registrar = Registrar(loaded.file, loaded.state_dir, public_url=public_url, api_url=api_url)
        self.auth = ConsoleAuth.create(TOKEN)

    def app(self) -> web.Application:
        app = web.Application()
        install(app, self.auth)
        add_login_routes(app)
        add_setup_routes(app, self.registrar)
        static = Path(__file__).resolve().parent.parent / "wasmflow" / "console" / "static"
        app.router.add_static("/static/", static)
        return app


def load(path: Path, env: dict[str, str]) -> LoadedFlows:
    return load_flows(path, env=env)


class Forms(HTMLParser):
    """Every <form> of a page with its action and inputs, and every element id with its href."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, dict[str, Any]] = {}
        self.links: dict[str, str] = {}
        self._current: Optional[dict[str, Any]] = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = {"action": a.get("action", ""), "method": a.get("method", "get"), "fields": {}}
            self.forms[a.get("id", f"form{len(self.forms)}")] = self._current
        elif tag == "input" and self._current is not None and "name" in a:
            self._current["fields"][a["name"]] = a.get("value", "")
        elif tag == "a" and "id" in a:
            self.links[a["id"]] = a.get("href", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def parse(html_text: str) -> Forms:
    forms = Forms()
    forms.feed(html_text)
    return forms


def text_of(html_text: str) -> str:
    """The page's text, tags removed and whitespace squeezed, for asserting messages."""
    import html

    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", html_text))).strip()
