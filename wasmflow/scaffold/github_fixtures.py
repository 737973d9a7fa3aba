"""`wasmflow run FLOW --github-fixtures DIR`: a bot's GitHub calls answered from files, its writes shown.

The way Probot users test with fixtures: the guest's GitHub host calls go, as on `wasmflow up`, through
the host's GitHub App client (tokens, permission and repository checks, pagination), but to a loopback
server that answers reads from the JSON files in DIR and accepts every write, recording it. After the run
the writes are printed as a table: what the bot would have commented, reviewed, labelled.

A fixture file holds one answer or a list of them:

    {"request": "GET /repos/octo-org/hello-world/issues/1/comments", "status": 200, "body": []}

`request` is the method and the path (no query string; `*` matches one path segment). A read with no
fixture is answered 404, as GitHub answers an unknown resource, and listed after the run so the missing
fixture is easy to add. A write with no fixture is answered as GitHub would (201 with the created
object), unless a fixture gives its answer (to test how a bot handles a 422, say).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from aiohttp import web
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wasmflow.loopback import LoopbackServer

WRITES = {"POST", "PATCH", "PUT", "DELETE"}
FIXTURE_APP_ID = 1


class FixtureError(Exception):
    """A fixture directory or file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Answer:
    method: str
    pattern: re.Pattern[str]
    status: int
    body: Any
    source: str


@dataclass
class Call:
    """One request the guest's run made, with what it was answered."""

    method: str
    path: str
    status: int
    body: Any
    answered_by: str  # a fixture file, "default" (a write accepted) or "" (a read without a fixture)


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile("^" + "/".join("[^/]+" if part == "*" else re.escape(part) for part in path.split("/")) + "$")


def load_fixtures(directory: Path) -> list[Answer]:
    """Every answer in DIR's `*.json` files (sorted by name; the first match wins)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FixtureError(f"{directory} is not a directory of GitHub fixtures (*.json files)")
    answers: list[Answer] = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FixtureError(f"{path}: not JSON: {exc}") from None
        for n, item in enumerate(data if isinstance(data, list) else [data]):
            where = f"{path.name}[{n}]" if isinstance(data, list) else path.name
            request = item.get("request") if isinstance(item, dict) else None
            parts = request.split() if isinstance(request, str) else []
            if len(parts) != 2 or not parts[1].startswith("/"):
                raise FixtureError(f"{path}: entry {n}: expected {{\"request\": \"GET /repos/OWNER/NAME/...\", "
                                   "\"status\": 200, \"body\": ...}")
            status = item.get("status", 200)
            if not isinstance(status, int) or not 100 <= status <= 599:
                raise FixtureError(f"{path}: entry {n}: status must be an HTTP status (100 to 599), got {status!r}")
            answers.append(Answer(parts[0].upper(), _pattern(parts[1].split("?")[0]), status, item.get("body"), where))
    return answers


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FixtureGithub(LoopbackServer):
    """The loopback GitHub of a fixture run: answers, and the calls it received."""

    def __init__(self, answers: list[Answer]) -> None:
        super().__init__()
        self.answers = answers
        self.calls: list[Call] = []
        self._ids = 1000
        self._lock = threading.Lock()

    # -- answers ------------------------------------------------------------------------------------

    def _next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def _default_write(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """What GitHub answers to a write it accepts: the created or changed object."""
        if method == "DELETE":
            return 204, None
        obj: dict[str, Any] = dict(body) if isinstance(body, dict) else {}
        if path.endswith("/labels") and isinstance(body, dict):
            names = body.get("labels") or []
            return 200, [{"name": str(n), "id": self._next_id()} for n in names]
        new_id = self._next_id()
        obj.update({"id": new_id, "node_id": f"fixture-{new_id}",
                    "user": {"login": "wasmflow-fixtures[bot]", "type": "Bot"},
                    "html_url": f"https://github.com{path.replace('/repos', '', 1)}#fixture-{new_id}",
                    "created_at": _iso(time.time())})
        if "/reviews" in path:
            obj.setdefault("state", {"APPROVE": "APPROVED", "REQUEST_CHANGES": "CHANGES_REQUESTED"}.get(
                str(obj.get("event", "")), "COMMENTED"))
        return (201 if method == "POST" else 200), obj

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return web.json_response({"message": "Problems parsing JSON"}, status=400)
        if request.method == "POST" and re.fullmatch(r"/app/installations/\d+/access_tokens", path):
            return web.json_response({"token": "ghs_fixture" + secrets.token_hex(16),
                                      "expires_at": _iso(time.time() + 3600)}, status=201)
        if request.method == "GET" and path == "/app":
            return web.json_response({"id": FIXTURE_APP_ID, "slug": "wasmflow-fixtures", "name": "wasmflow fixtures"})
        answer = next((a for a in self.answers if a.method == request.method and a.pattern.match(path)), None)
        if answer is not None:
            status, out, by = answer.status, answer.body, answer.source
        elif request.method in WRITES:
            (status, out), by = self._default_write(request.method, path, body), "default"
        else:
            status, out, by = 404, {"message": "Not Found",
                                    "documentation_url": "https://docs.github.com/rest"}, ""
        with self._lock:
            self.calls.append(Call(request.method, path, status, body, by))
        if status == 204 or out is None:
            return web.Response(status=status)
        return web.json_response(out, status=status)

    # -- serving on loopback (LoopbackServer) -------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    # -- what the guest wrote -----------------------------------------------------------------------

    def writes(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method in WRITES]

    def unanswered(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method not in WRITES and not c.answered_by]


def app_private_key() -> str:
    """A throwaway RSA key for the fixture run's App (the fixture server does not check the JWT)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()


def describe(call: Call) -> tuple[str, str, str]:
    """(what, where, content) of a write, in GitHub's terms: comment, review, labels, reaction, ..."""
    body = call.body if isinstance(call.body, dict) else {}
    m = re.match(r"/repos/([^/]+/[^/]+)/(issues|pulls)/(\d+)/(\w+)", call.path)
    where = f"{m.group(1)}#{m.group(3)}" if m else call.path
    if m and m.group(4) == "comments" and call.method == "POST":
        return "comment", where, str(body.get("body", ""))
    if m and m.group(4) == "reviews" and call.method == "POST":
        inline = len(body.get("comments") or [])
        extra = f" (+{inline} inline comment{'s' if inline != 1 else ''})" if inline else ""
        return f"review {body.get('event', 'COMMENT')}".lower(), where, str(body.get("body", "")) + extra
    if m and m.group(4) == "labels":
        labels = body.get("labels") if isinstance(body.get("labels"), list) else []
        return ("labels" if call.method != "DELETE" else "label removed"), where, ", ".join(map(str, labels))
    if m and m.group(4) == "reactions":
        return "reaction", where, str(body.get("content", ""))
    if re.match(r"/repos/[^/]+/[^/]+/issues/comments/\d+$", call.path) and call.method == "PATCH":
        return "comment edited", call.path.rsplit("/", 1)[-1], str(body.get("body", ""))
    return call.method.lower(), call.path, json.dumps(call.body)[:200] if call.body is not None else ""


def print_writes(server: FixtureGithub, console: Console) -> None:
    """The table of what the guest would have written on GitHub, then reads that had no fixture."""
    from wasmflow.terminal import clean

    writes = server.writes()
    if not writes:
        console.print("[dim]--- GitHub: the run wrote nothing ---[/dim]")
    else:
        table = Table(title="what the guest would have written on GitHub", title_justify="left",
                      header_style="bold", show_lines=True)
        for column in ("#", "what", "where", "content", "answer"):
            table.add_column(column, overflow="fold")
        for n, call in enumerate(writes, 1):
            what, where, content = describe(call)
            table.add_row(str(n), escape(what), escape(clean(where)), escape(clean(content)),
                          f"{call.status}" + (f" ({call.answered_by})" if call.answered_by != "default" else ""))
        console.print(table)
    for call in server.unanswered():
        console.print(f"[yellow]no fixture for[/yellow] {call.method} {escape(clean(call.path))} (answered 404): "
                      f'add {{"request": "{call.method} {escape(clean(call.path))}", "status": 200, "body": ...}} '
                      "to a file in the fixtures directory", soft_wrap=True)


class FixtureRun:
    """What `wasmflow run --github-fixtures DIR` adds to a run: the server, the App pointed at it, the report."""

    def __init__(self, directory: Path) -> None:
        self.server = FixtureGithub(load_fixtures(directory)).start()

    def runtime(self, flows_path: Optional[Path], engine: Optional[str]) -> Any:
        """flows.yaml's Runtime with its `github:` App replaced by one reaching the fixture server (no
        write interval: nothing is rate limited locally). Exits 2 with the error when flows.yaml is invalid."""
        import sys

        from wasmflow.cli_support import err_console, resolve_flows_path
        from wasmflow.flows.loader import FlowsError, load_flows
        from wasmflow.flows.model import GithubApp
        from wasmflow.runtime import Runtime

        try:
            loaded = load_flows(resolve_flows_path(flows_path))
        except FlowsError as exc:
            err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            self.stop()
            sys.exit(2)
        app = GithubApp(app_id=FIXTURE_APP_ID, private_key=app_private_key(), webhook_secret="",
                        api_url=self.server.url, min_write_interval=0.0)
        flows = loaded.file.model_copy(update={"github": app})
        return Runtime(flows, loaded.base_dir, engine_override=engine)

    def report(self, console: Optional[Console] = None) -> None:
        print_writes(self.server, console or Console(highlight=False))

    def stop(self) -> None:
        self.server.stop()


def fixture_run(directory: Path) -> FixtureRun:
    """Start a fixture run, or exit 2 saying what is wrong with the directory or a file in it."""
    import sys

    from wasmflow.cli_support import err_console

    try:
        return FixtureRun(directory)
    except FixtureError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
