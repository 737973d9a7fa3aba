"""`wasmflow github register`: the one-click App registration for machines without a browser of their own.

It prints what the App will be and a URL to open. That URL is a page served by this command on a
temporary local port whose button posts GitHub's manifest form; GitHub sends the browser back to the same
temporary server, which trades the code for the App's credentials and stores them. Where the browser
cannot reach the machine (no `ssh -L` tunnel), GitHub's redirect fails but its address bar holds the
code: `wasmflow github register --code CODE` finishes the exchange (the code is good for an hour).
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import sys
from pathlib import Path
from typing import Optional

import click
from aiohttp import web
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from wasmflow.cli_support import console, err_console, flows_path_option, resolve_flows_path
from wasmflow.flows.github_credentials import StoredApp
from wasmflow.platform.github_manifest import ManifestError, ManifestPlan, Registrar
from wasmflow.terminal import clean

PUBLIC_URL_ENV = "WASMFLOW_PUBLIC_URL"


@click.group("github")
def github_group() -> None:
    """The GitHub App: register it in one click (GitHub's App manifest flow)."""


@github_group.command("register")
@click.option("--public-url", default=None, help="where GitHub reaches `wasmflow up` (default: $WASMFLOW_PUBLIC_URL)")
@click.option("--org", default=None, help="create the App in this organization (default: your account)")
@click.option("--name", default=None, help="the App's name (default: wasmflow HOST; unique on GitHub)")
@click.option("--code", default=None, help="finish a registration: the code= value of GitHub's redirect")
@click.option("--api-url", default=None, help="GitHub's API (default: flows.yaml's github.api_url)")
@click.option("--web-url", default=None, help="GitHub's web pages (default: derived from the API URL)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address of the temporary callback server")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="its port (default: any free one)")
@click.option("--wait", default=3600, type=click.IntRange(1, 86400), show_default=True,
              help="seconds to wait for GitHub's redirect")
@flows_path_option
def register_command(public_url: Optional[str], org: Optional[str], name: Optional[str], code: Optional[str],
                     api_url: Optional[str], web_url: Optional[str], host: str, port: int, wait: int,
                     flows_path: Optional[Path]) -> None:
    """Create the GitHub App these flows need and store its credentials in the state directory."""
    registrar = _registrar(flows_path, public_url, api_url, web_url)
    previous = _previous(registrar)
    if code is not None:
        stored = _finish(registrar, code)
        _print_stored(stored, previous)
        return
    try:
        stored = asyncio.run(_serve(registrar, host, port, org, name, wait))
    except KeyboardInterrupt:
        err_console.print("[yellow]stopped:[/yellow] nothing was stored")
        sys.exit(130)
    if stored is None:
        err_console.print(f"[red]error:[/red] no redirect from GitHub within {wait} s; nothing was stored. Run the "
                          "command again (or finish with --code CODE if GitHub created the App)")
        sys.exit(1)
    _print_stored(stored, previous)


def _registrar(flows_path: Optional[Path], public_url: Optional[str], api_url: Optional[str],
               web_url: Optional[str]) -> Registrar:
    from wasmflow.flows.loader import FlowsError, load_flows

    try:
        loaded = load_flows(resolve_flows_path(flows_path))
    except FlowsError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    return Registrar(loaded.file, loaded.state_dir, public_url or os.environ.get(PUBLIC_URL_ENV), api_url, web_url)


def _fail(exc: Exception) -> None:
    err_console.print(f"[red]error:[/red] {escape(clean(str(exc)))}", soft_wrap=True)
    sys.exit(1)


def _previous(registrar: Registrar) -> Optional[StoredApp]:
    try:
        return registrar.stored()
    except registrar.user_errors as exc:
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(exc))}", soft_wrap=True)
        return None


def _finish(registrar: Registrar, code: str) -> StoredApp:
    try:
        return asyncio.run(registrar.register(code))
    except registrar.user_errors as exc:
        _fail(exc)
        raise  # unreachable


def _print_plan(registrar: Registrar, plan: ManifestPlan) -> None:
    table = Table(title="The GitHub App to create", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("name", plan.name)
    table.add_row("owner", f"organization {plan.org}" if plan.org else "your GitHub account")
    table.add_row("GitHub", registrar.web_url)
    table.add_row("webhook URL", plan.webhook_url)
    table.add_row("returns to", plan.redirect_url)
    table.add_row("flows", ", ".join(plan.flows) or "none")
    table.add_row("events", ", ".join(plan.events) or "none")
    table.add_row("permissions", ", ".join(f"{k}: {v}" for k, v in plan.permissions.items()) or "none")
    console.print(table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)


def _print_stored(stored: StoredApp, previous: Optional[StoredApp]) -> None:
    table = Table(title="GitHub App registered", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in (("name", stored.name), ("id", str(stored.app_id)), ("owner", stored.owner),
                         ("client id", stored.client_id), ("App page", stored.html_url),
                         ("credentials", str(stored.directory))):
        table.add_row(label, Text(clean(value)))
    console.print(table)
    if previous is not None:
        console.print(f"The App registered before ({escape(clean(previous.name))}, id {previous.app_id}) is kept "
                      f"beside it in {escape(str(previous.directory.parent))}.", soft_wrap=True)
    console.print("Next: install the App on repositories, then restart `wasmflow up`:", soft_wrap=True)
    click.echo(f"install: {clean(stored.install_url)}")


def _form_page(plan: ManifestPlan, action: str) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in (
        ("Name", plan.name), ("Webhook URL", plan.webhook_url), ("Events", ", ".join(plan.events) or "none"),
        ("Permissions", ", ".join(f"{k}: {v}" for k, v in plan.permissions.items()) or "none")))
    return (f"<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>Register the GitHub App · wasmflow</title><h1>Register the GitHub App</h1><table>{rows}</table>"
            f"<form method=post action=\"{html.escape(action)}\" id=manifest-form>"
            f"<input type=hidden name=manifest value=\"{html.escape(json.dumps(plan.manifest()))}\">"
            f"<button type=submit id=create-app>Create the GitHub App on GitHub</button></form></html>")


def _result_page(title: str, text: str, link: Optional[str] = None) -> str:
    extra = f"<p><a id=install-link href=\"{html.escape(link)}\">Install the App</a></p>" if link else ""
    return (f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)} · wasmflow</title>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{extra}</html>")


async def _serve(registrar: Registrar, host: str, port: int, org: Optional[str], name: Optional[str],
                 wait: int) -> Optional[StoredApp]:
    """Serve the form page and the callback on a temporary port until GitHub's redirect is handled."""
    done: asyncio.Future[StoredApp] = asyncio.get_running_loop().create_future()
    state = registrar.states.issue()
    page: dict[str, str] = {}

    async def form(_: web.Request) -> web.Response:
        return web.Response(text=page["html"], content_type="text/html")

    async def callback(request: web.Request) -> web.Response:
        if done.done():
            return web.Response(status=400, content_type="text/html", text=_result_page(
                "Registered already", "This command has stored the App already; it is finished."))
        if request.query.get("state") != state:
            return web.Response(status=400, content_type="text/html", text=_result_page(
                "This registration was not started here",
                "The state does not match the one this command issued; nothing was stored."))
        try:
            stored = await registrar.register(request.query.get("code", ""))
        except registrar.user_errors as exc:
            return web.Response(status=400, content_type="text/html",
                                text=_result_page("GitHub did not hand over the App", str(exc)))
        done.set_result(stored)
        return web.Response(content_type="text/html", text=_result_page(
            "GitHub App registered", f"{stored.name} (id {stored.app_id}) is stored; this window can be closed.",
            stored.install_url))

    app = web.Application()
    app.router.add_get("/", form)
    app.router.add_get("/callback", callback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            _fail(ManifestError(f"cannot listen on {host}:{port} for GitHub's redirect ({exc.strerror}); "
                                "pass another --port"))
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base = f"http://{host if ':' not in host else '[' + host + ']'}:{bound}"
        try:
            plan = registrar.plan(org=org, redirect_url=f"{base}/callback", name=name)
            action = registrar.form_action(state, plan.org)
        except ManifestError as exc:
            _fail(exc)
        page["html"] = _form_page(plan, action)
        _print_plan(registrar, plan)
        console.print("Open this page in a browser (on another machine: `ssh -L "
                      f"{bound}:127.0.0.1:{bound} THIS-HOST` first) and press the button:", soft_wrap=True)
        click.echo(f"open: {base}/")
        console.print("If GitHub's redirect cannot reach this machine, copy the code= value from the browser's "
                      "address bar and run `wasmflow github register --code CODE`.", soft_wrap=True)
        sys.stdout.flush()
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout=wait)
        except asyncio.TimeoutError:
            return None
    finally:
        await runner.cleanup()
