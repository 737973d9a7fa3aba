"""HTTP ingress: GitHub webhooks in, HTTP-triggered flows, health and metrics.

The webhook handler does the least a durable acknowledgement needs, in this order: cap the size, check
the HMAC of the raw bytes (nothing unauthenticated is parsed), parse, match flows, store the event and its
runs (group-committed by `BatchWriter`), answer 202. No flow runs inside the request, so the answer comes
in milliseconds, far inside GitHub's 10 seconds, however slow the guests are.

Every error is a short JSON body with a 4xx/5xx status; a traceback goes to the log, never to a client.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from concurrent.futures import Executor
from typing import Any, Optional
from urllib.parse import parse_qs

import sqlalchemy as sa
from aiohttp import web

from wasmflow.engine.base import RunResult, Status
from wasmflow.flows.model import Retry
from wasmflow.host_functions.spec import Event
from wasmflow.platform.matching import GithubEventInfo, match_github
from wasmflow.platform.metrics import CONTENT_TYPE_LATEST, Metrics
from wasmflow.platform.queue import ClaimedRun, Queue
from wasmflow.platform.store import RUNNING, BatchWriter, NewEvent, NewRun, queue_depth

log = logging.getLogger("wasmflow.ingress")

DEFAULT_MAX_BODY = 25 * 1024 * 1024  # GitHub does not send payloads over 25 MB
_EVENT_NAME = re.compile(r"^[a-z_]{1,64}$")
_DELIVERY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Headers a guest may not set on an HTTP trigger's response: the server frames the response itself.
_HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive", "upgrade", "te", "trailer",
               "proxy-connection"}


def sign(secret: bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: Optional[str]) -> bool:
    """Constant-time check of `X-Hub-Signature-256` over the raw body."""
    if not header:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode("utf-8", "replace"))


def error(http_status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=http_status)


class Ingress:
    """The request handlers; `add_routes` puts them on an aiohttp app.

    `run_pool` executes HTTP-triggered flows (bounded, off the event loop); `db_pool` runs blocking
    database reads for /metrics and /healthz. Event writes go through the `writer` thread.
    """

    def __init__(self, runtime: Any, writer: BatchWriter, queue: Queue, metrics: Metrics, run_pool: Executor,
                 db_pool: Executor, webhook_secret: Optional[str], max_body: int = DEFAULT_MAX_BODY) -> None:
        self.runtime = runtime
        self.writer = writer
        self.queue = queue
        self.metrics = metrics
        self.run_pool = run_pool
        self.db_pool = db_pool
        self.secret = webhook_secret.encode() if webhook_secret else None
        self.max_body = max_body

    def add_routes(self, app: web.Application) -> None:
        if self.secret is None:
            log.warning("no webhook secret configured (github.webhook_secret in flows.yaml or "
                        "GITHUB_WEBHOOK_SECRET): every GitHub delivery will be refused with 401")
        app.router.add_post("/webhooks/github", self.github_webhook)
        app.router.add_route("*", "/flows/{name}", self.flow_http)
        app.router.add_route("*", "/flows/{name}/{subpath:.*}", self.flow_http)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_handler)

    # --- GitHub -------------------------------------------------------------------------------------

    def _count(self, outcome: str, source: str = "github") -> None:
        self.metrics.events_received.labels(source=source, outcome=outcome).inc()

    async def _read_body(self, request: web.Request) -> Optional[bytes]:
        """The raw body, or None when it is over the cap (by its Content-Length or as it streams in)."""
        if request.content_length is not None and request.content_length > self.max_body:
            return None
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None

    async def github_webhook(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        if body is None:
            self._count("too_large")
            return error(413, f"body over {self.max_body} bytes")
        if self.secret is None:
            self._count("bad_signature")
            return error(401, "no webhook secret configured on this server")
        if not verify_signature(self.secret, body, request.headers.get("X-Hub-Signature-256")):
            self._count("bad_signature")
            return error(401, "missing or wrong X-Hub-Signature-256")
        name = request.headers.get("X-GitHub-Event", "")
        delivery = request.headers.get("X-GitHub-Delivery", "")
        if not _EVENT_NAME.match(name):
            self._count("malformed")
            return error(400, "missing or malformed X-GitHub-Event header")
        if not _DELIVERY.match(delivery):
            self._count("malformed")
            return error(400, "missing or malformed X-GitHub-Delivery header")
        payload_bytes = body
        if request.content_type == "application/x-www-form-urlencoded":  # GitHub's other content type
            payload_bytes = parse_qs(body.decode("utf-8", "replace")).get("payload", [""])[0].encode()
        try:
            payload = json.loads(payload_bytes)
        except ValueError:
            self._count("malformed")
            return error(400, "body is not JSON")
        if not isinstance(payload, dict):
            self._count("malformed")
            return error(400, "body is not a JSON object")

        info = GithubEventInfo.from_payload(name, payload)
        flows = self.runtime.flows
        matched = match_github(flows, info)
        event = NewEvent(
            source="github", name=name, action=info.action, repo=info.repo, dedupe_key=f"github:{delivery}",
            delivery_id=delivery, headers={k.lower(): v for k, v in request.headers.items()}, body=payload_bytes,
            status="accepted" if matched else "ignored",
            note=None if matched else f"no flow takes {info.qualified}" + (f" on {info.repo}" if info.repo else ""),
            runs=[NewRun(flow=f, trigger="github", max_attempts=flows.flow(f).retry.attempts,
                         idempotency_key=delivery) for f in matched],
        )
        try:
            recorded = await self.writer.submit_async(event)
        except Exception:
            log.exception("storing delivery %s failed", delivery)
            self._count("error")
            return error(503, "could not store the event; deliver it again later")
        if recorded.duplicate:
            self._count("duplicate")
        else:
            self._count("accepted" if matched else "ignored")
        return web.json_response(
            {"delivery": delivery, "event": recorded.event_id, "duplicate": recorded.duplicate,
             "runs": list(recorded.run_ids), "ignored": not matched},
            status=202,
        )

    # --- HTTP trigger -------------------------------------------------------------------------------

    async def flow_http(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            flow = self.runtime.flows.flow(name)
        except KeyError:
            return error(404, f"no flow named {name!r}")
        triggers = [t.http for t in flow.on if t.http is not None]
        if not triggers:
            return error(404, f"flow {name!r} has no http trigger")
        methods = sorted({m for t in triggers for m in t.methods})
        if request.method not in methods:
            return web.json_response({"error": f"method {request.method} not allowed"}, status=405,
                                     headers={"Allow": ", ".join(methods)})
        body = await self._read_body(request)
        if body is None:
            self._count("too_large", "http")
            return error(413, f"body over {self.max_body} bytes")
        headers = {k.lower(): v for k, v in request.headers.items()}
        headers.update({":method": request.method, ":path": request.path, ":query": request.query_string})
        run = NewRun(flow=name, trigger="http", max_attempts=1, state=RUNNING, lease_owner=self.queue.owner,
                     lease_expires_at=time.time() + flow.limits.timeout + self.queue.lease_seconds)
        run.idempotency_key = run.id
        stored = NewEvent(source="http", name="http", headers=headers, body=body, status="accepted", runs=[run])
        try:
            await self.writer.submit_async(stored)
        except Exception:
            log.exception("storing the request for flow %s failed", name)
            return error(503, "could not store the request", run_id=run.id)
        self._count("accepted", "http")
        event = Event(name="http", body=body, headers=headers, idempotency_key=run.id, trigger="http")
        loop = asyncio.get_running_loop()
        claimed = ClaimedRun(id=run.id, flow=name, attempt=1, max_attempts=1, trigger="http", event=event,
                             event_id=stored.id)
        try:
            result: RunResult = await loop.run_in_executor(
                self.run_pool, lambda: self.runtime.run(name, event, run_id=run.id, attempt=1))
        except Exception as exc:
            log.exception("run %s of %s: host error", run.id, name)
            result = RunResult(status=Status.ERROR, run_id=run.id, error=f"host error: {exc}")
        try:
            await loop.run_in_executor(self.db_pool, self.queue.finish, claimed, result, Retry(attempts=1))
        except Exception:
            log.exception("run %s: storing the result failed", run.id)
        self.metrics.runs.labels(flow=name, status=str(result.status)).inc()
        self.metrics.run_duration.labels(flow=name).observe((result.instantiate_ms + result.run_ms) / 1000)
        if not result.ok:
            return error(500, f"flow {name} failed ({result.status})", run_id=run.id, status=str(result.status))
        response = web.Response(status=result.response_status or 200,
                                body=result.response_body if result.response_body is not None else (result.output or b""))
        for key, value in result.response_headers:
            if key.lower() not in _HOP_BY_HOP:
                response.headers.add(key, value)
        response.headers["X-Wasmflow-Run"] = run.id
        return response

    # --- operations ---------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.db_pool, self._ping)
        except Exception as exc:
            return error(503, f"database unavailable: {exc.__class__.__name__}")
        return web.json_response({"status": "ok"})

    def _ping(self) -> None:
        with self.runtime.db.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    async def metrics_handler(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            text = await loop.run_in_executor(self.db_pool, self.metrics.render, lambda: queue_depth(self.runtime.db))
        except sa.exc.SQLAlchemyError:
            text = await loop.run_in_executor(self.db_pool, self.metrics.render)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
