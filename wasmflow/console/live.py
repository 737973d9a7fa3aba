"""Live runs list: Server-Sent Events carrying the first page of runs whenever it changes.

Each open Runs page holds one `GET /api/live/runs?<filters>` stream. The server reads the page's first
rows (one indexed query) every `interval` seconds and sends them only when they differ from what that
page last got, so a quiet system sends nothing but a keep-alive comment. Streams end when the server
shuts down, so they never hold up a graceful stop.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from wasmflow.console.api import dumps, off_loop, services
from wasmflow.console.queries import QueryError, RunFilter, list_runs

STOPPING_KEY = web.AppKey("wasmflow_console_stopping", asyncio.Event)
INTERVAL = 1.0
KEEPALIVE = 15.0


async def live_runs(request: web.Request) -> web.StreamResponse:
    try:
        f = RunFilter.from_query(request.query)
    except QueryError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    f.cursor = None
    stopping = request.app[STOPPING_KEY]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    last, quiet = None, 0.0
    db = services(request).db
    try:
        while not stopping.is_set():
            page = dumps(await off_loop(list_runs, db, f))
            if page != last:
                await response.write(f"event: runs\ndata: {page}\n\n".encode())
                last, quiet = page, 0.0
            elif quiet >= KEEPALIVE:
                await response.write(b": keep-alive\n\n")
                quiet = 0.0
            try:
                await asyncio.wait_for(stopping.wait(), INTERVAL)
            except asyncio.TimeoutError:
                quiet += INTERVAL
    except ConnectionResetError:  # the page was closed
        pass
    return response


def add_live_routes(app: web.Application) -> None:
    stopping = asyncio.Event()
    app[STOPPING_KEY] = stopping

    async def on_shutdown(_: web.Application) -> None:
        stopping.set()

    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/api/live/runs", live_runs)
