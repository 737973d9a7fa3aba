"""The console's HTML pages: Flows (at /), Runs, Run detail, Events, Models.

Each page is rendered on the server from the same reads the JSON API serves, so it shows at once and
works without JavaScript for reading; the small script in static/console.js adds the live runs list
and the action buttons, which call the JSON API.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from wasmflow.console.api import detail_with_activity, ingress_counts, models_body, off_loop, services
from wasmflow.console.queries import STATES, EventFilter, QueryError, RunFilter, list_events, list_runs
from wasmflow.console.rendering import render


def _bad_filter(request: web.Request, exc: QueryError, section: str) -> web.Response:
    return render(request, "error.html", status=400, section=section, title="Bad filter",
                  message=f"{exc}.", back="/" + section)


async def flows_page(request: web.Request) -> web.Response:
    flows = await off_loop(services(request).flow_summaries)
    return render(request, "flows.html", section="flows", flows=flows, now=time.time())


async def runs_page(request: web.Request) -> web.Response:
    try:
        f = RunFilter.from_query(request.query)
        page = await off_loop(list_runs, services(request).db, f)
    except QueryError as exc:
        return _bad_filter(request, exc, "runs")
    params = f.params()
    next_link = "/runs?" + urlencode({**params, "cursor": page["next_cursor"]}) if page["next_cursor"] else None
    svc = services(request)
    return render(request, "runs.html", section="runs", runs=page["runs"], f=f, states=STATES,
                  flows=[flow.name for flow in svc.flows.flows], next_link=next_link,
                  live_query=urlencode(params), first_page=f.cursor is None,
                  first_link="/runs?" + urlencode(params) if params else "/runs")


async def run_page(request: web.Request) -> web.Response:
    run = await off_loop(detail_with_activity, services(request), request.match_info["run_id"][:64])
    if run is None:
        return render(request, "error.html", status=404, section="runs", title="No such run",
                      message="There is no run with that id (an id prefix must match one run only).", back="/runs")
    svc = services(request)
    return render(request, "run.html", section="runs", run=run, can_cancel=svc.cancel is not None,
                  can_replay=svc.replay is not None)


async def events_page(request: web.Request) -> web.Response:
    try:
        f = EventFilter.from_query(request.query)
        page = await off_loop(list_events, services(request).db, f)
    except QueryError as exc:
        return _bad_filter(request, exc, "events")
    params: dict[str, Any] = {k: v for k, v in (("source", f.source), ("status", f.status), ("repo", f.repo)) if v}
    next_link = "/events?" + urlencode({**params, "before": page["next_before"]}) if page["next_before"] else None
    return render(request, "events.html", section="events", events=page["events"], f=f, next_link=next_link,
                  received=ingress_counts(services(request)), can_replay=services(request).replay is not None)


async def models_page(request: web.Request) -> web.Response:
    body = await off_loop(models_body, services(request))
    return render(request, "models.html", section="models", models=body["models"], configured=body["configured"],
                  tokens=body["llm_tokens_24h"])


def add_page_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", flows_page)
    r.add_get("/runs", runs_page)
    r.add_get("/runs/{run_id}", run_page)
    r.add_get("/events", events_page)
    r.add_get("/models", models_page)
