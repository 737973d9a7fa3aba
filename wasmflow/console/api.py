"""The console's JSON API under /api/: what the pages call, and what scripts call with a Bearer token.

Every action the console offers is here (and a CLI command): replay a run or a delivery, replay every
dead run matching a filter, cancel a run. Reads run on a thread (SQLAlchemy is synchronous) so a slow
query never stalls the webhook ingress sharing the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial
from typing import Any, Callable, Optional, TypeVar

from aiohttp import web

from wasmflow.console.auth import HOW_KEY
from wasmflow.console.queries import (EventFilter, QueryError, RunFilter, dead_run_ids, list_events, list_runs,
                                      llm_tokens_since, run_detail)
from wasmflow.console.services import ConsoleServices

SERVICES_KEY = web.AppKey("wasmflow_console_services", ConsoleServices)
MAX_BULK = 10_000
T = TypeVar("T")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args))


def actor(request: web.Request) -> str:
    """Who asked, as recorded on a cancelled run: the console (a session) or a script (the token)."""
    return "console" if request.get(HOW_KEY) == "session" else "api"


def services(request: web.Request) -> ConsoleServices:
    return request.app[SERVICES_KEY]


async def get_flows(request: web.Request) -> web.Response:
    return web.json_response({"flows": await off_loop(services(request).flow_summaries)})


async def get_runs(request: web.Request) -> web.Response:
    try:
        f = RunFilter.from_query(request.query)
        return web.json_response(await off_loop(list_runs, services(request).db, f))
    except QueryError as exc:
        return _error(400, str(exc))


def activity(svc: ConsoleServices, run_id: str) -> Optional[list[dict[str, Any]]]:
    """The run's host activity (GitHub calls, HTTP, kv, LLM, WASI-NN), or None where it is not recorded."""
    if svc.transcript is None:
        return None
    try:
        found = svc.transcript(run_id)
        return list(found) if found is not None else None
    except Exception:  # an old run without a transcript, a format from a newer version
        return None


def detail_with_activity(svc: ConsoleServices, run_id: str) -> Optional[dict[str, Any]]:
    run = run_detail(svc.db, run_id)
    if run is not None:
        run["activity"] = activity(svc, run["id"])
    return run


async def get_run(request: web.Request) -> web.Response:
    run = await off_loop(detail_with_activity, services(request), request.match_info["run_id"][:64])
    if run is None:
        return _error(404, "no such run")
    return web.json_response(run)


async def _replay(request: web.Request, ref: str) -> web.Response:
    svc = services(request)
    if svc.replay is None:
        return _error(501, "replay is not available on this server")
    try:
        queued = await off_loop(svc.replay, ref)
    except svc.replay_errors as exc:
        return _error(409, str(exc))
    return web.json_response({"queued": queued}, status=202)


async def replay_run(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"][:64]
    if await off_loop(run_detail, services(request).db, run_id) is None:
        return _error(404, "no such run")
    return await _replay(request, run_id)


async def replay_delivery(request: web.Request) -> web.Response:
    return await _replay(request, request.match_info["delivery"][:128])


async def cancel_run(request: web.Request) -> web.Response:
    svc = services(request)
    if svc.cancel is None:
        return _error(501, "cancel is not available on this server")
    result = await off_loop(svc.cancel, request.match_info["run_id"][:64], actor(request))
    outcome = getattr(result, "outcome", "unknown")
    body = {"run_id": getattr(result, "run_id", None), "outcome": outcome, "state": getattr(result, "state", None)}
    if outcome == "not_found":
        return _error(404, "no such run")
    return web.json_response(body, status=202 if outcome in ("cancelled", "cancelling") else 409)


async def _filter_from_body(request: web.Request) -> RunFilter:
    if request.content_type == "application/json":
        try:
            raw = await request.json()
        except ValueError:
            raise QueryError("the body is not JSON") from None
        if not isinstance(raw, dict):
            raise QueryError("the body must be a JSON object of filters (flow, status, repo, trigger, since, until)")
        raw = {k: v for k, v in raw.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    else:
        raw = dict(await request.post())
    wanted = {k: str(raw[k]) for k in ("flow", "status", "repo", "trigger", "since", "until") if k in raw}
    return RunFilter.from_query(wanted)


def replay_dead(svc: ConsoleServices, f: RunFilter, dry_run: bool) -> dict[str, Any]:
    """Replay every dead run matching `f` that no later replay took over; each refusal is reported."""
    ids = dead_run_ids(svc.db, f, cap=MAX_BULK)
    if dry_run or svc.replay is None:
        return {"matched": len(ids), "queued": [], "failed": [], "dry_run": True}
    queued, failed = [], []
    for run_id in ids:
        try:
            queued.extend(svc.replay(run_id))
        except svc.replay_errors as exc:
            failed.append({"run_id": run_id, "error": str(exc)})
    return {"matched": len(ids), "queued": queued, "failed": failed, "dry_run": False}


async def post_replay_dead(request: web.Request) -> web.Response:
    svc = services(request)
    if svc.replay is None:
        return _error(501, "replay is not available on this server")
    try:
        f = await _filter_from_body(request)
    except QueryError as exc:
        return _error(400, str(exc))
    dry_run = request.query.get("dry_run") in ("1", "true", "yes")
    result = await off_loop(replay_dead, svc, f, dry_run)
    return web.json_response(result, status=200 if dry_run else 202)


async def get_events(request: web.Request) -> web.Response:
    try:
        f = EventFilter.from_query(request.query)
    except QueryError as exc:
        return _error(400, str(exc))
    body = await off_loop(list_events, services(request).db, f)
    body["received"] = ingress_counts(services(request))
    return web.json_response(body)


def ingress_counts(svc: ConsoleServices) -> dict[str, float]:
    """Events this process received by outcome (accepted, duplicate, ignored, bad_signature, ...)."""
    if svc.ingress_counts is None:
        return {}
    try:
        return dict(svc.ingress_counts())
    except Exception:
        return {}


def models_body(svc: ConsoleServices) -> dict[str, Any]:
    return {"models": svc.model_stats(), "configured": sorted(svc.flows.models),
            "llm_tokens_24h": llm_tokens_since(svc.db, time.time() - 86400)}


async def get_models(request: web.Request) -> web.Response:
    return web.json_response(await off_loop(models_body, services(request)))


async def api_not_found(request: web.Request) -> web.Response:
    return _error(404, "no such API endpoint (see docs/console.md)")


def add_api_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/flows", get_flows)
    r.add_get("/api/runs", get_runs)
    r.add_get("/api/runs/{run_id}", get_run)
    r.add_post("/api/runs/{run_id}/replay", replay_run)
    r.add_post("/api/runs/{run_id}/cancel", cancel_run)
    r.add_post("/api/deliveries/{delivery}/replay", replay_delivery)
    r.add_post("/api/replay-dead", post_replay_dead)
    r.add_get("/api/events", get_events)
    r.add_get("/api/models", get_models)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
